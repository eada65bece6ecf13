package eval

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/metrics"
	"github.com/deskcloud/deskcloud/predictor/trace"
)

const (
	numH = len(predictor.Horizons)
	// howSmoothing is the weight, in samples, of the fleet's rate in the hour-of-week
	// baseline: one hour of 5-minute samples.
	howSmoothing = 12
	// condorIdle is HTCondor's idle threshold.
	condorIdle = 15 * time.Minute
	// recentArrivals is how many arrivals a desktop tracker remembers for persistence.
	recentArrivals = 16
	// maxSilence is how long after its last row a desktop still counts as in the trace, in
	// ms; maxSession and flowWindow are the fleet context's other rules (predictor.Context*).
	maxSilence = int64(predictor.ContextSilence / time.Millisecond)
	maxSession = int64(predictor.ContextSession / time.Millisecond)
	flowWindow = int64(predictor.ContextFlow / time.Millisecond)
)

var (
	horizonMs  [numH]int64
	idleCapMs  = predictor.ExpectedIdleCap.Milliseconds()
	idleCapMin = predictor.ExpectedIdleCap.Minutes()
)

func init() {
	for j, h := range predictor.Horizons {
		horizonMs[j] = h.Milliseconds()
	}
}

// counts is a frequency: positives out of n.
type counts struct{ pos, n float64 }

func (c *counts) add(y bool) {
	c.n++
	if y {
		c.pos++
	}
}

func (c counts) rate(prior float64) float64 {
	if c.n == 0 {
		return prior
	}
	return c.pos / c.n
}

// moment is one scored (or, in the train phase, counted) moment of one desktop, waiting
// for its outcome.
type moment struct {
	at         int64
	cell       uint8
	condor     bool  // idle for less than condorIdle
	persist    uint8 // bit j: an arrival in (at-h_j, at]
	labelsDone bool
	expIdle    float32 // minutes
	p          [numMethods][numH]float32
}

// desktop tracks one desktop through the trace: its model, its state as the baselines see
// it, and its moments waiting for an outcome.
type desktop struct {
	group         int // index of the desktop's group, from its name
	model         *predictor.Model
	state         predictor.State
	lastEvent     int64
	hasActive     bool
	lastActiveEnd int64
	arr           [recentArrivals]int64
	arrN          int
	how           [168][numH]counts
	pend          []moment
	head          int // first moment still waiting for its idle time
	labelHead     int // first moment still waiting for its labels
}

// evaluator holds both phases' state.
type evaluator struct {
	cfg       Config
	pool      *predictor.Pool
	desktops  map[string]*desktop
	list      []*desktop // desktops in the order first seen, for a deterministic sweep
	ph        phase
	phaseTo   int64
	testFrom  int64
	testEnd   int64
	lastTrain int64
	every     int64
	maxH      int64
	nextTick  int64 // the next moment on the cadence not yet swept, 0 before the first row

	workers    int
	due        []*desktop
	fleetCtx   predictor.Context
	groups     map[string]int
	groupLive  []int
	groupInUse []int

	// Baselines' training tables.
	base     [numH]counts
	fleetHow [168][numH]counts
	condor   [2][numH]counts
	persist  [numH][2]counts
	idleSum  float64
	idleN    float64

	// Frozen at the end of training.
	baseP    [numH]float64
	condorP  [2][numH]float64
	persistP [numH][2]float64
	idleMean float64

	acc          [numMethods][numH]*metrics.Accumulator
	idleAbs      [2]float64 // forecast, constant
	idleCount    float64
	trainMoments int64
	testMoments  int64
	droppedSplit int64
	unresolved   int64
	outside      [2]int64
	trainNodes   int
	newInTest    int
}

func newEvaluator(cfg Config) *evaluator {
	e := &evaluator{
		cfg:      cfg,
		pool:     predictor.NewPool(),
		desktops: make(map[string]*desktop),
		groups:   make(map[string]int),
		every:    cfg.Every.Milliseconds(),
		workers:  cfg.Workers,
		maxH:     horizonMs[numH-1],
	}
	for k := range e.acc {
		for j := range e.acc[k] {
			e.acc[k][j] = metrics.NewAccumulator()
		}
	}
	return e
}

// groupOf returns the index of a desktop's group.
func (e *evaluator) groupOf(node string) int {
	name := ""
	if e.cfg.Group != nil {
		name = e.cfg.Group(node)
	}
	g, ok := e.groups[name]
	if !ok {
		g = len(e.groups)
		e.groups[name] = g
		e.groupLive = append(e.groupLive, 0)
		e.groupInUse = append(e.groupInUse, 0)
	}
	return g
}

func (e *evaluator) learning() predictor.Learning {
	switch {
	case e.ph == phaseTrain:
		return predictor.LearnFleet
	case e.cfg.Frozen:
		return predictor.LearnNone
	}
	return predictor.LearnDesktop
}

// record feeds one row, at wall time t (ms), to its desktop, after sweeping every desktop
// through the moments before it.
func (e *evaluator) record(rec trace.Record, t int64) error {
	if err := e.sweep(t); err != nil {
		return err
	}
	d := e.desktops[rec.Node]
	state := rec.State
	if d == nil {
		d = &desktop{model: predictor.NewModel(e.pool, e.learning()), state: state, lastEvent: t, group: e.groupOf(rec.Node)}
		e.desktops[rec.Node] = d
		e.list = append(e.list, d)
		if e.ph == phaseTest {
			e.newInTest++
		}
		return d.model.Observe(rec.Time, state)
	}
	if state == predictor.InUse && d.state.OwnerAway() {
		e.arrival(d, t)
	} else {
		e.resolve(d, t)
	}
	if d.state == predictor.InUse && state != predictor.InUse {
		d.lastActiveEnd, d.hasActive = t, true
	}
	d.state, d.lastEvent = state, t
	if err := d.model.Observe(rec.Time, state); err != nil {
		return fmt.Errorf("desktop %s: %w", rec.Node, err)
	}
	return nil
}

// sweep visits every desktop at each moment on the cadence before t, in time order, so that
// each sees the fleet as it was at that moment. In the test phase, when nothing learns into
// the pool, the desktops of one moment are visited in parallel: each touches only its own
// state.
func (e *evaluator) sweep(t int64) error {
	if e.nextTick == 0 {
		e.nextTick = (t/e.every + 1) * e.every
	}
	for ; e.nextTick < t; e.nextTick += e.every {
		at := e.nextTick
		e.context(at)
		due := e.due[:0]
		for _, d := range e.list {
			if d.state.Harvestable() && at-d.lastEvent <= maxSilence {
				due = append(due, d)
			}
		}
		e.due = due
		if e.ph == phaseTrain || e.workers < 2 || len(due) < 2*minPerWorker {
			for _, d := range due {
				if err := e.tick(d, at, e.contextFor(d)); err != nil {
					return err
				}
			}
			continue
		}
		if err := e.parallel(due, at); err != nil {
			return err
		}
	}
	return nil
}

// minPerWorker is the fewest desktops worth handing to a goroutine.
const minPerWorker = 16

// parallel ticks the due desktops on e.workers goroutines.
func (e *evaluator) parallel(due []*desktop, at int64) error {
	n := min(e.workers, len(due)/minPerWorker)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for w := range n {
		part := due[w*len(due)/n : (w+1)*len(due)/n]
		wg.Go(func() {
			for _, d := range part {
				if err := e.tick(d, at, e.contextFor(d)); err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// context computes the fleet context at time at: the fraction of live desktops in use,
// the fleet's recent arrival rate, and each group's fraction in use.
func (e *evaluator) context(at int64) {
	e.fleetCtx = predictor.NoContext
	if !e.cfg.FleetContext {
		return
	}
	var live, inUse, arrivals int
	for g := range e.groupLive {
		e.groupLive[g], e.groupInUse[g] = 0, 0
	}
	for _, d := range e.list {
		if at-d.lastEvent > maxSilence {
			continue
		}
		live++
		e.groupLive[d.group]++
		if d.state == predictor.InUse && at-d.lastEvent <= maxSession {
			inUse++
			e.groupInUse[d.group]++
		}
		for i := d.arrN - 1; i >= 0 && d.arr[i] > at-flowWindow; i-- {
			arrivals++
		}
	}
	if live == 0 {
		return
	}
	e.fleetCtx.FleetInUse = float64(inUse) / float64(live)
	e.fleetCtx.FleetArrivals = float64(arrivals) / float64(live) * float64(3600*1000) / float64(flowWindow)
}

// contextFor is the context of desktop d, from what context computed.
func (e *evaluator) contextFor(d *desktop) predictor.Context {
	c := e.fleetCtx
	if c.FleetInUse >= 0 && e.groupLive[d.group] > 0 {
		c.GroupInUse = float64(e.groupInUse[d.group]) / float64(e.groupLive[d.group])
	}
	return c
}

// tick is a moment on the cadence at which d is harvestable.
func (e *evaluator) tick(d *desktop, at int64, ctx predictor.Context) error {
	d.model.SetContext(ctx)
	scored := false
	switch e.ph {
	case phaseTrain:
		scored = at+e.maxH < e.phaseTo // else its outcome lies beyond the train rows
	case phaseTest:
		scored = at >= e.testFrom && at <= e.testEnd
	}
	if !scored || e.ph == phaseTrain {
		// The model takes its own learning sample at this moment, with this context.
		if err := d.model.Advance(time.UnixMilli(at).UTC()); err != nil {
			return err
		}
		if !scored {
			return nil
		}
	}
	m := moment{at: at, cell: uint8(hourOfWeek(at))}
	m.condor = d.hasActive && at-d.lastActiveEnd < condorIdle.Milliseconds()
	for j, h := range horizonMs {
		for i := range d.arrN {
			if a := d.arr[i]; a > at-h && a <= at {
				m.persist |= 1 << j
				break
			}
		}
	}
	if e.ph == phaseTest {
		f, err := d.model.Forecast(time.UnixMilli(at).UTC())
		if err != nil {
			return err
		}
		m.expIdle = float32(f.ExpectedIdle.Minutes())
		for j := range numH {
			m.p[mForecast][j] = float32(f.P[j])
			m.p[mPersistence][j] = float32(e.persistP[j][bit(m.persist, j)])
			m.p[mBaseRate][j] = float32(e.baseP[j])
			m.p[mHourOfWeek][j] = float32(e.howRate(d, int(m.cell), j))
			m.p[mCondor][j] = float32(e.condorP[b2i(m.condor)][j])
		}
	}
	d.pend = append(d.pend, m)
	return nil
}

// howRate is the hour-of-week baseline's forecast.
func (e *evaluator) howRate(d *desktop, cell, j int) float64 {
	f := e.fleetHow[cell][j]
	fleet := (f.pos + e.baseP[j]) / (f.n + 1)
	c := d.how[cell][j]
	return (c.pos + howSmoothing*fleet) / (c.n + howSmoothing)
}

// resolve settles the moments whose horizons, or idle cap, ended by t, when d's row at t
// shows that its owner had not arrived. Outcomes are settled only by a desktop's own rows,
// so a moment after its trace stops is never scored.
func (e *evaluator) resolve(d *desktop, t int64) {
	for d.labelHead < len(d.pend) && d.pend[d.labelHead].at+e.maxH <= t {
		e.labels(d, &d.pend[d.labelHead], false, 0)
		d.labelHead++
	}
	for d.head < d.labelHead && d.pend[d.head].at+idleCapMs <= t {
		e.idle(&d.pend[d.head], idleCapMin)
		d.head++
	}
	if d.head == len(d.pend) {
		d.pend, d.head, d.labelHead = d.pend[:0], 0, 0
	} else if d.head > 256 && d.head > len(d.pend)/2 {
		n := copy(d.pend, d.pend[d.head:])
		d.pend, d.labelHead, d.head = d.pend[:n], d.labelHead-d.head, 0
	}
}

// arrival settles every waiting moment of d: the owner arrived at t.
func (e *evaluator) arrival(d *desktop, t int64) {
	for i := d.labelHead; i < len(d.pend); i++ {
		e.labels(d, &d.pend[i], true, t)
	}
	for i := d.head; i < len(d.pend); i++ {
		e.idle(&d.pend[i], min(float64(t-d.pend[i].at)/60000, idleCapMin))
	}
	d.pend, d.head, d.labelHead = d.pend[:0], 0, 0
	if d.arrN == recentArrivals {
		copy(d.arr[:], d.arr[1:])
		d.arrN--
	}
	d.arr[d.arrN] = t
	d.arrN++
}

func (e *evaluator) labels(d *desktop, m *moment, arrived bool, t int64) {
	m.labelsDone = true
	learn := e.ph == phaseTrain || !e.cfg.Frozen
	for j, h := range horizonMs {
		y := arrived && t <= m.at+h
		switch e.ph {
		case phaseTrain:
			e.base[j].add(y)
			e.condor[b2i(m.condor)][j].add(y)
			e.persist[j][bit(m.persist, j)].add(y)
		case phaseTest:
			for k := range numMethods {
				e.acc[k][j].Add(float64(m.p[k][j]), y)
			}
		}
		if learn {
			d.how[m.cell][j].add(y)
			e.fleetHow[m.cell][j].add(y)
		}
	}
	if e.ph == phaseTrain {
		e.trainMoments++
	} else {
		e.testMoments++
	}
}

func (e *evaluator) idle(m *moment, minutes float64) {
	switch e.ph {
	case phaseTrain:
		e.idleSum += minutes
		e.idleN++
	case phaseTest:
		e.idleAbs[0] += abs(float64(m.expIdle) - minutes)
		e.idleAbs[1] += abs(e.idleMean - minutes)
		e.idleCount++
	}
}

// endTraining freezes what the train phase learned before any test row is read.
func (e *evaluator) endTraining() {
	e.trainNodes = len(e.desktops)
	for j := range numH {
		e.baseP[j] = e.base[j].rate(0)
		for c := range 2 {
			e.condorP[c][j] = e.condor[c][j].rate(e.baseP[j])
			e.persistP[j][c] = e.persist[j][c].rate(e.baseP[j])
		}
	}
	if e.idleN > 0 {
		e.idleMean = e.idleSum / e.idleN
	}
	e.ph = phaseTest
	for _, d := range e.list {
		// Moments whose outcome lies in the test rows are dropped, not learned from.
		e.droppedSplit += int64(len(d.pend) - d.labelHead)
		d.pend, d.head, d.labelHead = d.pend[:0], 0, 0
		d.model.SetLearning(e.learning())
	}
}

// hourOfWeek of a UTC wall-clock time in ms, 0 for Sunday 00:00.
func hourOfWeek(ms int64) int {
	const hour = 3600 * 1000
	h := ms / hour
	if ms%hour < 0 {
		h--
	}
	// 1970-01-01 was a Thursday, hour 4*24 of its week.
	return int(((h+4*24)%168 + 168) % 168)
}

func bit(b uint8, j int) int { return int(b>>j) & 1 }

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}
