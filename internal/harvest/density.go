package harvest

import (
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// DensityWindow is the span over which the fleet's arrival density is measured: a whole
// year, so that terms and holidays weigh in it as they do in a year's figures.
const DensityWindow = 52 * 7 * 24 * time.Hour

// densityMinDays is how many days of history the density needs before it is used.
const densityMinDays = 28

// FleetDensity is the fleet's arrival density, day by day: owners' arrivals per hour of
// harvestable desktop (up, owner away), over the year before each day. Like FleetContext
// it is made only of what desktops publish (whether each owner is away, and whether the
// desktop is up), never of their activity; a deployment would work it out where the
// control plane runs.
//
// Why it matters: a VM at full size meets, per hour, the owner's hazard of return, which the
// shrink threshold bounds, so collisions per harvestable hour stay put at fixed thresholds.
// The target is a share of arrivals, though, and when owners come back less often per idle
// hour, the same collisions are a larger share. On the library trace the share at fixed
// thresholds rose from 3.7 % to 4.5 % over the three years before the test year while the
// density fell from 0.26 to 0.22 arrivals per harvestable hour, and their product stayed
// within 5 % (docs/forecast.md, "Arrival density"). Forecast.ArrivalDensity scales the
// thresholds by the density against the one they were chosen at.
type FleetDensity struct {
	first    time.Time // midnight of the first day
	arrivals []float64 // per day
	hours    []float64 // harvestable desktop-hours per day
	cum      []float64 // prefix sums: arrivals then hours, interleaved
}

// NewFleetDensity works out the fleet's daily arrivals and harvestable hours from the
// desktops' events. A desktop's state holds until its next event, as in the simulation;
// a gap of more than a week between two events counts for nothing (the desktop was out of
// the fleet).
func NewFleetDensity(desktops [][]Event) *FleetDensity {
	first, last, ok := eventSpan(desktops)
	if !ok {
		return &FleetDensity{}
	}
	d := &FleetDensity{first: first.Truncate(24 * time.Hour)}
	n := int(last.Sub(d.first)/(24*time.Hour)) + 1
	d.arrivals, d.hours = make([]float64, n), make([]float64, n)
	for _, evs := range desktops {
		for i, e := range evs {
			if i > 0 && e.State == predictor.InUse && evs[i-1].State.OwnerAway() {
				d.arrivals[d.day(e.Time)]++
			}
			if i+1 == len(evs) || !e.State.Harvestable() {
				continue
			}
			end := evs[i+1].Time
			if end.Sub(e.Time) > predictor.ContextSilence {
				continue
			}
			for t := e.Time; t.Before(end); {
				k := d.day(t)
				next := d.first.Add(time.Duration(k+1) * 24 * time.Hour)
				if next.After(end) {
					next = end
				}
				d.hours[k] += next.Sub(t).Hours()
				t = next
			}
		}
	}
	d.cum = make([]float64, 2*(n+1))
	for k := range n {
		d.cum[2*(k+1)] = d.cum[2*k] + d.arrivals[k]
		d.cum[2*(k+1)+1] = d.cum[2*k+1] + d.hours[k]
	}
	return d
}

// eventSpan returns the first and last event times over all desktops.
func eventSpan(desktops [][]Event) (first, last time.Time, ok bool) {
	for _, evs := range desktops {
		if len(evs) == 0 {
			continue
		}
		if !ok || evs[0].Time.Before(first) {
			first = evs[0].Time
		}
		if !ok || evs[len(evs)-1].Time.After(last) {
			last = evs[len(evs)-1].Time
		}
		ok = true
	}
	return first, last, ok
}

func (d *FleetDensity) day(t time.Time) int {
	return int(t.Sub(d.first) / (24 * time.Hour))
}

// At returns the fleet's arrivals per harvestable desktop-hour over the year (or as much of
// it as there is) before the day of t, or 0 when fewer than four weeks are known.
func (d *FleetDensity) At(t time.Time) float64 {
	if len(d.arrivals) == 0 {
		return 0
	}
	end := min(max(d.day(t), 0), len(d.arrivals))
	start := max(end-int(DensityWindow/(24*time.Hour)), 0)
	if end-start < densityMinDays {
		return 0
	}
	a := d.cum[2*end] - d.cum[2*start]
	h := d.cum[2*end+1] - d.cum[2*start+1]
	if h <= 0 {
		return 0
	}
	return a / h
}
