package harvest

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// contextArrivals is how many of a desktop's latest arrivals are kept for the fleet's
// arrival rate. The fleet context's other rules are predictor's (predictor.ContextSilence,
// ContextSession, ContextFlow), shared with the forecast evaluation, so that a pool built
// there with its fleet context reads the same features here.
const contextArrivals = 16

// FleetContext is the fleet context ([predictor.Context]) that the platform would tell each
// desktop's model at every sampling tick (predictor.SampleEvery on the clock) of a
// simulation. It is made only of what the desktops' forecasts publish, whether each owner
// is away (Forecast.OwnerAway), never of their activity: the fraction of the fleet's
// desktops, and of the desktop's group, whose owner is present, and the rate at which
// owners came back over the last quarter hour. The context of a tick counts every event up
// to and including it.
type FleetContext struct {
	first int64     // the first tick, in Unix ms
	n     int       // ticks
	width int       // values per tick: the fleet's two, then one per group
	v     []float32 // per tick: fleet in use, fleet arrivals, each group's in use; -1 unknown
	group []int     // the group of each desktop
}

// contextEvent is one event of one desktop, for the sweep in time order.
type contextEvent struct {
	at      int64
	desktop int
	state   predictor.State
}

// NewFleetContext works out the fleet context of the given desktops at every sampling tick
// from the first event to the last; groups names each desktop's group (its room or node
// pool), nil putting every desktop in one.
func NewFleetContext(desktops [][]Event, groups []string) (*FleetContext, error) {
	if groups != nil && len(groups) != len(desktops) {
		return nil, fmt.Errorf("fleet context: %d groups for %d desktops", len(groups), len(desktops))
	}
	c := &FleetContext{group: make([]int, len(desktops))}
	index := map[string]int{}
	for i := range desktops {
		name := ""
		if groups != nil {
			name = groups[i]
		}
		g, ok := index[name]
		if !ok {
			g = len(index)
			index[name] = g
		}
		c.group[i] = g
	}
	c.width = 2 + len(index)

	var evs []contextEvent
	for i, d := range desktops {
		for _, e := range d {
			evs = append(evs, contextEvent{e.Time.UnixMilli(), i, e.State})
		}
	}
	if len(evs) == 0 {
		return c, nil
	}
	slices.SortStableFunc(evs, func(a, b contextEvent) int { return cmp.Compare(a.at, b.at) })

	every := predictor.SampleEvery.Milliseconds()
	c.first = (floorDiv(evs[0].at, every) + 1) * every
	last := floorDiv(evs[len(evs)-1].at, every) * every
	c.n = max(0, int((last-c.first)/every)+1)
	c.v = make([]float32, c.n*c.width)

	type desk struct {
		seen      bool
		state     predictor.State
		lastEvent int64
		arr       [contextArrivals]int64
		arrN      int
	}
	ds := make([]desk, len(desktops))
	silence, session, flow := predictor.ContextSilence.Milliseconds(), predictor.ContextSession.Milliseconds(), predictor.ContextFlow.Milliseconds()
	live := make([]int, len(index))
	inUseG := make([]int, len(index))
	next := 0
	for k := range c.n {
		at := c.first + int64(k)*every
		for ; next < len(evs) && evs[next].at <= at; next++ {
			e := evs[next]
			d := &ds[e.desktop]
			if d.seen && e.state == predictor.InUse && d.state.OwnerAway() {
				if d.arrN == contextArrivals {
					copy(d.arr[:], d.arr[1:])
					d.arrN--
				}
				d.arr[d.arrN] = e.at
				d.arrN++
			}
			d.seen, d.state, d.lastEvent = true, e.state, e.at
		}
		clear(live)
		clear(inUseG)
		var nLive, inUse, arrivals int
		for i := range ds {
			d := &ds[i]
			if !d.seen || at-d.lastEvent > silence {
				continue
			}
			nLive++
			live[c.group[i]]++
			if d.state == predictor.InUse && at-d.lastEvent <= session {
				inUse++
				inUseG[c.group[i]]++
			}
			for j := d.arrN - 1; j >= 0 && d.arr[j] > at-flow; j-- {
				arrivals++
			}
		}
		row := c.v[k*c.width : (k+1)*c.width]
		for j := range row {
			row[j] = -1
		}
		if nLive == 0 {
			continue
		}
		// As the evaluation does: computed in float64, then held as the model holds it.
		row[0] = float32(float64(inUse) / float64(nLive))
		row[1] = float32(float64(arrivals) / float64(nLive) * float64(time.Hour.Milliseconds()) / float64(flow))
		for g := range live {
			if live[g] > 0 {
				row[2+g] = float32(float64(inUseG[g]) / float64(live[g]))
			}
		}
	}
	return c, nil
}

// tickOf returns the latest sampling tick at or before t, in Unix ms.
func tickOf(t time.Time) int64 {
	every := predictor.SampleEvery.Milliseconds()
	return floorDiv(t.UnixMilli(), every) * every
}

// at returns desktop i's context at the latest tick at or before t; NoContext before the
// first tick.
func (c *FleetContext) at(i int, t time.Time) predictor.Context {
	tk := tickOf(t)
	if c.n == 0 || tk < c.first {
		return predictor.NoContext
	}
	k := min(int((tk-c.first)/predictor.SampleEvery.Milliseconds()), c.n-1)
	row := c.v[k*c.width : (k+1)*c.width]
	return predictor.Context{FleetInUse: float64(row[0]), FleetArrivals: float64(row[1]), GroupInUse: float64(row[2+c.group[i]])}
}

// floorDiv is a / b rounded towards minus infinity, for b > 0.
func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}
