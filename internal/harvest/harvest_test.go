package harvest

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
)

var day0 = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) // a Monday

// officeDesktop returns weeks of a synthetic desktop: on weekdays the owner comes in around
// 09:00, takes a lunch break and leaves around 17:30, with random short visits in the
// evening; the desktop is off on some nights. Nothing here comes from a real trace.
func officeDesktop(seed uint64, weeks int) []Event {
	r := rand.New(rand.NewPCG(seed, 17))
	at := func(d time.Time, minutes, jitter float64) time.Time {
		return d.Add(time.Duration((minutes + r.NormFloat64()*jitter) * float64(time.Minute)))
	}
	evs := []Event{{day0, predictor.Available}}
	for d := range weeks * 7 {
		date := day0.AddDate(0, 0, d)
		if r.Float64() < 0.3 {
			evs = append(evs, Event{date.Add(time.Hour), predictor.Offline}, Event{date.Add(6 * time.Hour), predictor.Restarted})
		}
		if date.Weekday() == time.Saturday || date.Weekday() == time.Sunday {
			continue
		}
		evs = append(evs,
			Event{at(date, 9*60, 20), predictor.InUse},
			Event{at(date, 12*60, 10), predictor.Available},
			Event{at(date, 13*60, 10), predictor.InUse},
			Event{at(date, 17.5*60, 20), predictor.Available})
		if r.Float64() < 0.4 {
			in := at(date, 20*60, 60)
			evs = append(evs, Event{in, predictor.InUse}, Event{in.Add(time.Duration(5+r.IntN(40)) * time.Minute), predictor.Available})
		}
	}
	slices.SortStableFunc(evs, func(a, b Event) int { return a.Time.Compare(b.Time) })
	return evs
}

func fleet(n, weeks int) [][]Event {
	out := make([][]Event, n)
	for i := range out {
		out[i] = officeDesktop(uint64(i)+1, weeks)
	}
	return out
}

func policies() []Policy {
	return []Policy{NewCondor(), NewForecast(10*time.Minute, 0.06, 0.02)}
}

func TestHarvestNeverExceedsIdleTime(t *testing.T) {
	desktops := fleet(6, 6)
	for _, p := range policies() {
		t.Run(p.Name(), func(t *testing.T) {
			for i, evs := range desktops {
				r, err := Simulate(t.Context(), p, [][]Event{evs}, Options{From: day0.AddDate(0, 0, 14)})
				must.NoError(t, err)
				const eps = 1e-9
				must.Positive(t, r.MachineHours, must.Sprintf("desktop %d harvested nothing", i))
				must.LessEq(t, r.HarvestableHours+eps, r.MachineHours, must.Sprintf("desktop %d", i))
				must.LessEq(t, r.AwayHours+eps, r.HarvestableHours)
				must.LessEq(t, r.DesktopHours+eps, r.AwayHours)
				must.LessEq(t, r.MachineHours+eps, r.LostHours)
			}
		})
	}
}

func TestEveryArrivalCountedOnce(t *testing.T) {
	desktops := fleet(5, 5)
	from := day0.AddDate(0, 0, 10)
	to := day0.AddDate(0, 0, 30)
	var want int64
	for _, evs := range desktops {
		for i := 1; i < len(evs); i++ {
			if evs[i].State == predictor.InUse && evs[i-1].State.OwnerAway() && !evs[i].Time.Before(from) && evs[i].Time.Before(to) {
				want++
			}
		}
	}
	for _, p := range policies() {
		t.Run(p.Name(), func(t *testing.T) {
			r, err := Simulate(t.Context(), p, desktops, Options{From: from, To: to})
			must.NoError(t, err)
			must.Eq(t, want, r.Arrivals)
			must.LessEq(t, r.Arrivals, r.Collisions)
			stops := r.Drains + r.Preemptions + r.PowerOffs
			must.LessEq(t, r.Starts, stops, must.Sprint("every stop is of a started VM"))
			must.LessEq(t, stops+int64(r.Desktops), r.Starts, must.Sprint("every VM but the last of a desktop stops"))
		})
	}
}

func TestCondorTimeline(t *testing.T) {
	at := func(h, m int) time.Time { return day0.Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute) }
	evs := []Event{
		{at(8, 0), predictor.InUse},
		{at(9, 0), predictor.Available},  // the VM starts at 09:15
		{at(10, 0), predictor.InUse},     // a collision: suspended, evicted at 10:10
		{at(11, 0), predictor.Available}, // starts again at 11:15
		{at(13, 0), predictor.Offline},   // powered off under the VM
		{at(14, 0), predictor.Restarted}, // idle since 11:00: a VM starts at once
	}
	r, err := Simulate(t.Context(), NewCondor(), [][]Event{evs}, Options{})
	must.NoError(t, err)
	must.Eq(t, int64(1), r.Arrivals)
	must.Eq(t, int64(1), r.Collisions)
	must.Eq(t, int64(3), r.Starts)
	must.Eq(t, int64(1), r.Suspends)
	must.Eq(t, int64(1), r.Preemptions)
	must.Eq(t, int64(1), r.PowerOffs)
	// Ran 09:15-10:00 and 11:15-13:00.
	must.InDelta(t, 0.75+1.75, r.MachineHours, 1e-9)
	// With a checkpoint every 30 minutes, the eviction loses the 15 minutes since 09:45
	// and the power-off the 15 minutes since 12:45; without, the jobs of an hour in
	// progress: 45 minutes, and 45 minutes since 12:15.
	must.InDelta(t, 0.5, r.LostHours, 1e-9)
	must.InDelta(t, 1.5, r.LostHoursNoCheckpoint, 1e-9)
}

func TestCondorDecide(t *testing.T) {
	c := NewCondor()
	now := day0.Add(12 * time.Hour)
	tests := []struct {
		name string
		s    Situation
		want Action
	}{
		{"idle too short", Situation{Now: now, Harvestable: true, OwnerIdle: 14 * time.Minute}, Hold},
		{"idle long enough", Situation{Now: now, Harvestable: true, OwnerIdle: 15 * time.Minute}, Start},
		{"idle but off", Situation{Now: now, OwnerIdle: time.Hour}, Hold},
		{"owner back", Situation{Now: now, Phase: Running, OwnerPresent: true}, Suspend},
		{"owner still away", Situation{Now: now, Phase: Running, Harvestable: true, OwnerIdle: time.Hour}, Hold},
		{"suspended, owner left", Situation{Now: now, Phase: Suspended, PhaseSince: now.Add(-time.Minute), Harvestable: true}, Resume},
		{"suspended a while", Situation{Now: now, Phase: Suspended, PhaseSince: now.Add(-9 * time.Minute), OwnerPresent: true}, Hold},
		{"suspended too long", Situation{Now: now, Phase: Suspended, PhaseSince: now.Add(-10 * time.Minute), OwnerPresent: true}, Evict},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, c.Decide(tc.s))
		})
	}
}

// forecastWith returns a forecast whose every horizon has the given probability of return
// per minute, as a constant hazard.
func forecastWith(perMinute float64) predictor.Forecast {
	f := predictor.Forecast{OwnerAway: true}
	for i, h := range predictor.Horizons {
		f.P[i] = 1 - math.Pow(1-perMinute, h.Minutes())
	}
	return f
}

func TestForecastDecide(t *testing.T) {
	p := NewForecast(10*time.Minute, 0.2, 0.05)
	now := day0.Add(12 * time.Hour)
	quiet, likely, middling := forecastWith(0.001), forecastWith(0.05), forecastWith(0.01)
	tests := []struct {
		name string
		s    Situation
		want Action
	}{
		{"quiet, owner just left", Situation{Now: now, Harvestable: true, OwnerIdle: 30 * time.Second, Forecast: quiet}, Hold},
		{"quiet", Situation{Now: now, Harvestable: true, OwnerIdle: 2 * time.Minute, Forecast: quiet}, Start},
		{"owner likely back", Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: likely}, Hold},
		{"running, quiet", Situation{Now: now, Phase: Running, Harvestable: true, Forecast: quiet}, Hold},
		{"running, between thresholds", Situation{Now: now, Phase: Running, Harvestable: true, Forecast: middling}, Hold},
		{"running, owner likely back", Situation{Now: now, Phase: Running, Harvestable: true, Forecast: likely}, Drain},
		{"running, owner back", Situation{Now: now, Phase: Running, OwnerPresent: true, Forecast: quiet}, Suspend},
		{"suspended too long", Situation{Now: now, Phase: Suspended, PhaseSince: now.Add(-time.Hour), OwnerPresent: true}, Evict},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, p.Decide(tc.s))
		})
	}
}

func TestReturnWithin(t *testing.T) {
	f := forecastWith(0.01)
	for i, h := range predictor.Horizons {
		must.InDelta(t, f.P[i], ReturnWithin(f, h), 1e-12, must.Sprintf("at horizon %s", h))
	}
	// A constant hazard interpolates exactly.
	for _, d := range []time.Duration{30 * time.Second, 10 * time.Minute, 45 * time.Minute, 2 * time.Hour} {
		must.InDelta(t, 1-math.Pow(0.99, d.Minutes()), ReturnWithin(f, d), 1e-9, must.Sprintf("at %s", d))
	}
	must.Eq(t, 1, ReturnWithin(predictor.Forecast{}, time.Minute), must.Sprint("an owner who is present is back"))
}

func TestSimulateIsDeterministic(t *testing.T) {
	desktops := fleet(7, 4)
	for _, p := range policies() {
		a, err := Simulate(t.Context(), p, desktops, Options{Workers: 1})
		must.NoError(t, err)
		b, err := Simulate(t.Context(), p, desktops, Options{Workers: 3})
		must.NoError(t, err)
		must.Eq(t, a, b)
	}
}

func TestForecastPolicyCollidesLess(t *testing.T) {
	// On regular owners the forecast policy must avoid most of the collisions HTCondor's
	// rule runs into.
	desktops := fleet(8, 10)
	opt := Options{From: day0.AddDate(0, 0, 28)}
	condor, err := Simulate(t.Context(), NewCondor(), desktops, opt)
	must.NoError(t, err)
	fc, err := Simulate(t.Context(), NewForecast(10*time.Minute, 0.06, 0.02), desktops, opt)
	must.NoError(t, err)
	t.Logf("condor: %.0f h, %.1f%% collisions; forecast: %.0f h (%.0f%%), %.1f%% collisions",
		condor.MachineHours, 100*condor.CollisionRate(), fc.MachineHours, 100*fc.MachineHours/condor.MachineHours, 100*fc.CollisionRate())
	must.Less(t, condor.CollisionRate()/2, fc.CollisionRate())
	must.Greater(t, condor.MachineHours/2, fc.MachineHours)
}

func TestSimulateRejectsDisorder(t *testing.T) {
	evs := []Event{{day0.Add(time.Hour), predictor.Available}, {day0, predictor.InUse}}
	_, err := Simulate(t.Context(), NewCondor(), [][]Event{evs}, Options{})
	must.Error(t, err)
}
