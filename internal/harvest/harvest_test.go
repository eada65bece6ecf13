package harvest

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
)

var day0 = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) // a Monday

// onDay0 is the time h:m:s on day0.
func onDay0(h, m, s int) time.Time {
	return day0.Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute + time.Duration(s)*time.Second)
}

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

// namedPolicy is a policy with a name for subtests: every forecast policy is "forecast".
type namedPolicy struct {
	name string
	p    Policy
}

// policies returns the policies the invariants are checked on: HTCondor's, the forecast
// policy without its floor layer (shrinking where it drains), with it and drains, the
// default (floor, starts at the floor, no drains), and the default of before starts at the
// floor with them, up to twice the default's threshold.
func policies() []namedPolicy {
	floorStart := NewForecast(10*time.Minute, 0.01, 0.0175, math.Inf(1))
	floorStart.FloorStartBelow = 0.1
	return []namedPolicy{
		{"condor", NewCondor()},
		{"forecast-no-floor", NewForecast(10*time.Minute, 0.02, 0.06, 0.06)},
		{"forecast-floor-drain", NewForecast(10*time.Minute, 0.02, 0.04, 0.08)},
		{"forecast-default", DefaultForecast()},
		{"forecast-floor-start", floorStart},
	}
}

func TestHarvestNeverExceedsIdleTime(t *testing.T) {
	desktops := fleet(6, 6)
	for _, np := range policies() {
		for _, loss := range []float64{0, 0.5, 1} {
			t.Run(fmt.Sprintf("%s/floor-loss-%v", np.name, loss), func(t *testing.T) {
				for i, evs := range desktops {
					r, err := Simulate(t.Context(), np.p, [][]Event{evs}, Options{From: day0.AddDate(0, 0, 14), FloorLoss: loss})
					must.NoError(t, err)
					const eps = 1e-9
					must.Positive(t, r.MachineHours, must.Sprintf("desktop %d harvested nothing", i))
					must.LessEq(t, r.HarvestableHours+eps, r.MachineHours, must.Sprintf("desktop %d", i))
					must.LessEq(t, r.AwayHours+eps, r.HarvestableHours)
					must.LessEq(t, r.DesktopHours+eps, r.AwayHours)
					must.InDelta(t, r.FullHours+r.FloorHours, r.MachineHours, eps, must.Sprint("full and floor hours make the machine-hours"))
					must.LessEq(t, r.HarvestableHours+eps, r.FullHours+r.FloorHours)
					must.Eq(t, 1-loss, r.FloorWork)
					must.InDelta(t, r.FullHours+(1-loss)*r.FloorHours, r.HarvestedHours, eps)
					must.LessEq(t, r.MachineHours+eps, r.HarvestedHours)
					must.LessEq(t, r.HarvestedHours+eps, r.LostHours)
					must.LessEq(t, r.HarvestedHours+eps, r.LostHoursNoCheckpoint)
					if np.p.NeedsForecast() && np.name != "forecast-no-floor" {
						continue
					}
					must.Zero(t, r.FloorHours, must.Sprint("a policy without a floor layer never puts a VM at its floor"))
				}
			})
		}
	}
}

// TestFloorStartOffUnchanged pins the forecast policy with starts at the floor off
// (FloorStartBelow equal to StartBelow) and no fleet context to what the simulator reported
// before either existed (this fleet, the default thresholds of then, measured at the commit
// before them): with the new threshold equal to the start threshold, nothing may change.
func TestFloorStartOffUnchanged(t *testing.T) {
	desktops := fleet(8, 10)
	p := NewForecast(10*time.Minute, 0.01, 0.0175, math.Inf(1))
	p.FloorStartBelow = p.StartBelow
	base := Report{
		Policy: "forecast", Desktops: 8, DesktopHours: 7724.019536651991, AwayHours: 5882.102033014941,
		HarvestableHours: 5262.102033014662, MachineHours: 4749.833369077318, Arrivals: 588, ArrivalsVacant: 252,
		Starts: 451, Suspends: 336, Grows: 165, Preemptions: 324, PowerOffs: 124,
	}
	tests := []struct {
		opt  Options
		edit func(r *Report)
	}{
		{Options{}, func(r *Report) {
			r.FullHours, r.FloorHours, r.FloorWork, r.HarvestedHours = 4190.195933188301, 559.6374358887759, 1, 4749.833369077318
			r.Collisions, r.ArrivalsAtFloor, r.Shrinks = 53, 283, 443
			r.LostHours, r.LostHoursNoCheckpoint = 91.33336907739388, 191.8333690773939
		}},
		{Options{FloorLoss: 0.7, ShrinkTime: 3 * time.Minute}, func(r *Report) {
			r.FullHours, r.FloorHours, r.FloorWork, r.HarvestedHours = 4190.2031082772955, 559.6302607997815, 0.30000000000000004, 4358.0921865172295
			r.Collisions, r.ArrivalsAtFloor, r.Shrinks = 57, 279, 444
			r.LostHours, r.LostHoursNoCheckpoint = 43.90549728855084, 148.09218651751274
		}},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("floor-loss-%v", tc.opt.FloorLoss), func(t *testing.T) {
			opt := tc.opt
			opt.From = day0.AddDate(0, 0, 28)
			r, err := Simulate(t.Context(), p, desktops, opt)
			must.NoError(t, err)
			want := base
			tc.edit(&want)
			must.Eq(t, want, r)
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
	for _, np := range policies() {
		t.Run(np.name, func(t *testing.T) {
			r, err := Simulate(t.Context(), np.p, desktops, Options{From: from, To: to})
			must.NoError(t, err)
			must.Eq(t, want, r.Arrivals)
			must.Eq(t, r.Arrivals, r.Collisions+r.ArrivalsAtFloor+r.ArrivalsVacant, must.Sprintf("every arrival in one class: %+v", r))
			stops := r.Drains + r.Preemptions + r.PowerOffs
			must.LessEq(t, r.Starts, stops, must.Sprint("every stop is of a started VM"))
			must.LessEq(t, stops+int64(r.Desktops), r.Starts, must.Sprint("every VM but the last of a desktop stops"))
			must.LessEq(t, r.Shrinks+r.FloorStarts, r.Grows, must.Sprint("every grow is of a VM shrunk or started at its floor"))
			must.LessEq(t, r.Starts, r.FloorStarts, must.Sprint("starts at the floor are starts"))
			switch np.name {
			case "condor", "forecast-no-floor":
				must.Zero(t, r.ArrivalsAtFloor+r.Shrinks+r.Grows+r.FloorStarts, must.Sprintf("no floor layer: %+v", r))
			case "forecast-default":
				// It starts and grows VMs to full size only below 0.005, which the untrained
				// pool never forecasts for these owners: its VMs start at their floor and
				// stay there.
				must.Positive(t, r.ArrivalsAtFloor, must.Sprint("some owners find a VM at its floor"))
				must.Eq(t, r.Starts, r.FloorStarts, must.Sprint("every VM starts at its floor"))
			default:
				must.Positive(t, r.ArrivalsAtFloor, must.Sprint("some owners find a VM at its floor"))
				must.Positive(t, r.Grows, must.Sprint("some VMs grow back"))
			}
			if f, ok := np.p.(Forecast); ok && f.FloorStartBelow > f.StartBelow {
				must.Positive(t, r.FloorStarts, must.Sprint("some VMs start at their floor"))
			} else {
				must.Zero(t, r.FloorStarts, must.Sprint("no VM starts at its floor"))
			}
		})
	}
}

// TestNoFloorLayerUnchanged pins HTCondor's policy, and the forecast policy with its floor
// layer off, to what the simulator reported before the floor layer existed (this fleet,
// measured at the commit before it): for them the layer must change nothing, whatever
// the floor options. The forecast policy's figures are re-pinned whenever the forecast
// model changes (last: the time-of-day cross and the fleet calendar), with the layer off.
func TestNoFloorLayerUnchanged(t *testing.T) {
	desktops := fleet(8, 10)
	tests := []struct {
		name string
		p    Policy
		want Report
	}{
		{"condor", NewCondor(), Report{
			Policy: "condor", Desktops: 8, DesktopHours: 7724.019536646388, AwayHours: 5882.10203301179,
			HarvestableHours: 5262.102033012353, MachineHours: 5114.575063822874, Arrivals: 588, Collisions: 588,
			Starts: 703, Suspends: 588, Preemptions: 576, PowerOffs: 124,
			LostHours: 174.57506382489362, LostHoursNoCheckpoint: 369.57506382489373,
		}},
		{"forecast-no-floor", NewForecast(10*time.Minute, 0.02, 0.06, 0.06), Report{
			Policy: "forecast", Desktops: 8, DesktopHours: 7724.019536652019, AwayHours: 5882.102033014941,
			HarvestableHours: 5262.102033014662, MachineHours: 4737.480660059882, Arrivals: 588, Collisions: 134,
			Starts: 501, Suspends: 134, Drains: 251, Preemptions: 123, PowerOffs: 124,
			LostHours: 49.03066005996278, LostHoursNoCheckpoint: 192.4806600599628,
		}},
	}
	for _, tc := range tests {
		for _, opt := range []Options{{}, {FloorLoss: 0.7, ShrinkTime: 3 * time.Minute}} {
			t.Run(fmt.Sprintf("%s/floor-loss-%v", tc.name, opt.FloorLoss), func(t *testing.T) {
				opt.From = day0.AddDate(0, 0, 28)
				r, err := Simulate(t.Context(), tc.p, desktops, opt)
				must.NoError(t, err)
				want := tc.want
				// The floor layer's fields follow from the rest.
				want.FullHours, want.HarvestedHours, want.FloorWork = want.MachineHours, want.MachineHours, 1-opt.FloorLoss
				want.ArrivalsVacant = want.Arrivals - want.Collisions
				must.Eq(t, want, r)
			})
		}
	}
}

// scripted is a policy for timelines: it starts a VM (at its floor if atFloor) whenever
// the desktop is harvestable before stopStarts, shrinks it at shrinkAt, grows it at growAt,
// and otherwise acts as HTCondor does on an owner.
type scripted struct {
	shrinkAt, growAt, stopStarts time.Time
	atFloor                      bool
}

func (scripted) Name() string        { return "scripted" }
func (scripted) NeedsForecast() bool { return false }

func (p scripted) Decide(s Situation) Action {
	switch {
	case s.Phase == Vacant && s.Harvestable && s.Now.Before(p.stopStarts):
		if p.atFloor {
			return StartAtFloor
		}
		return Start
	case (s.Phase == Running || s.Phase == AtFloor) && s.OwnerPresent:
		return Suspend
	case s.Phase == Running && !s.Now.Before(p.shrinkAt) && s.Now.Before(p.growAt):
		return Shrink
	case s.Phase == AtFloor && !s.Now.Before(p.growAt):
		return Grow
	case s.Phase == Suspended:
		return NewCondor().suspended(s)
	}
	return Hold
}

func TestFloorTimeline(t *testing.T) {
	p := scripted{shrinkAt: onDay0(10, 0, 0), growAt: onDay0(12, 0, 0), stopStarts: onDay0(13, 30, 0)}
	evs := []Event{
		{onDay0(8, 0, 0), predictor.InUse},
		{onDay0(9, 0, 0), predictor.Available},   // starts at once; shrinks at 10:00, at its floor from 10:01
		{onDay0(10, 0, 30), predictor.InUse},     // still shrinking: a collision; suspended above its floor
		{onDay0(10, 5, 0), predictor.Available},  // resumes at full size; shrinks again at 10:06
		{onDay0(10, 30, 0), predictor.InUse},     // at its floor: not a collision
		{onDay0(10, 35, 0), predictor.Available}, // resumes at its floor; grows at 12:00
		{onDay0(13, 0, 0), predictor.InUse},      // full size: a collision; evicted at 13:10
		{onDay0(14, 0, 0), predictor.Available},  // no more starts
		{onDay0(14, 30, 0), predictor.InUse},     // the desktop is vacant
		{onDay0(15, 0, 0), predictor.Available},
	}
	r, err := Simulate(t.Context(), p, [][]Event{evs}, Options{FloorLoss: 0.5})
	must.NoError(t, err)
	must.Eq(t, int64(4), r.Arrivals)
	must.Eq(t, int64(2), r.Collisions)
	must.Eq(t, int64(1), r.ArrivalsAtFloor)
	must.Eq(t, int64(1), r.ArrivalsVacant)
	must.Eq(t, int64(1), r.Starts)
	must.Eq(t, int64(2), r.Shrinks)
	must.Eq(t, int64(1), r.Grows)
	must.Eq(t, int64(3), r.Suspends)
	must.Eq(t, int64(1), r.Preemptions)
	// Full size 09:00-10:00, 10:05-10:06 and 12:00-13:00: 121 minutes; at the floor (or
	// shrinking to it) 10:00-10:00:30, 10:06-10:30 and 10:35-12:00: 109.5 minutes,
	// credited half.
	full, floor := 121.0/60, 109.5/60
	must.InDelta(t, full, r.FullHours, 1e-9)
	must.InDelta(t, floor, r.FloorHours, 1e-9)
	must.InDelta(t, full+floor, r.MachineHours, 1e-9)
	must.InDelta(t, full+0.5*floor, r.HarvestedHours, 1e-9)
	// Checkpoints every 30 minutes of running: at 09:30, 10:00, 10:39:30, 11:09:30,
	// 11:39:30, 12:09:30 and 12:39:30, so the eviction loses the 20.5 minutes at full size
	// since; without checkpoints it loses the hour-long job in progress: 175.75 minutes of
	// work done (121 + 109.5/2), 55.75 of them into the third job.
	must.InDelta(t, 20.5/60, r.LostHours, 1e-9)
	must.InDelta(t, 55.75/60, r.LostHoursNoCheckpoint, 1e-9)
}

func TestFloorStartTimeline(t *testing.T) {
	p := scripted{atFloor: true, shrinkAt: onDay0(23, 0, 0), growAt: onDay0(11, 0, 0), stopStarts: onDay0(12, 30, 0)}
	evs := []Event{
		{onDay0(8, 0, 0), predictor.InUse},
		{onDay0(9, 0, 0), predictor.Available},   // starts at its floor, which it reaches at 09:01
		{onDay0(9, 30, 0), predictor.InUse},      // at its floor: not a collision; suspended there
		{onDay0(9, 35, 0), predictor.Available},  // resumes at its floor; grows at 11:00
		{onDay0(12, 0, 0), predictor.InUse},      // full size: a collision; evicted at 12:10
		{onDay0(12, 20, 0), predictor.Available}, // starts at its floor again, reached at 12:21
		{onDay0(12, 20, 30), predictor.InUse},    // not there yet: a collision; evicted at 12:31
		{onDay0(13, 0, 0), predictor.Available},  // no more starts
		{onDay0(13, 30, 0), predictor.InUse},     // the desktop is vacant
	}
	r, err := Simulate(t.Context(), p, [][]Event{evs}, Options{FloorLoss: 0.5})
	must.NoError(t, err)
	must.Eq(t, int64(4), r.Arrivals)
	must.Eq(t, int64(2), r.Collisions)
	must.Eq(t, int64(1), r.ArrivalsAtFloor)
	must.Eq(t, int64(1), r.ArrivalsVacant)
	must.Eq(t, int64(2), r.Starts)
	must.Eq(t, int64(2), r.FloorStarts)
	must.Eq(t, int64(0), r.Shrinks, must.Sprint("a start at the floor is not a shrink"))
	must.Eq(t, int64(1), r.Grows)
	must.Eq(t, int64(3), r.Suspends)
	must.Eq(t, int64(2), r.Preemptions)
	// At the floor 09:00-09:30, 09:35-11:00 and 12:20-12:20:30: 115.5 minutes, credited
	// half; full size 11:00-12:00.
	full, floor := 1.0, 115.5/60
	must.InDelta(t, full, r.FullHours, 1e-9)
	must.InDelta(t, floor, r.FloorHours, 1e-9)
	must.InDelta(t, full+floor, r.MachineHours, 1e-9)
	must.InDelta(t, full+0.5*floor, r.HarvestedHours, 1e-9)
	// The first VM checkpoints after every 30 minutes of running, the last at 11:35, so
	// its eviction loses the 25 minutes at full size since; without checkpoints it loses
	// 57.5 of its 117.5 minutes of work (57.5 at the floor's half rate, then 60). The
	// second loses the 15 s of work it did in its 30 s at the floor, either way.
	must.InDelta(t, (25+0.25)/60, r.LostHours, 1e-9)
	must.InDelta(t, (57.5+0.25)/60, r.LostHoursNoCheckpoint, 1e-9)
}

func TestFloorLostWorkAtFloorRate(t *testing.T) {
	// A VM at its floor when the desktop goes off loses the work done since its last
	// checkpoint, at the floor's rate.
	p := scripted{shrinkAt: onDay0(9, 10, 0), growAt: onDay0(23, 0, 0), stopStarts: onDay0(9, 1, 0)}
	evs := []Event{
		{onDay0(8, 0, 0), predictor.InUse},
		{onDay0(9, 0, 0), predictor.Available}, // starts; at its floor from 09:10 (shrinking to 09:11)
		{onDay0(9, 50, 0), predictor.Offline},  // checkpointed at 09:30: 20 minutes at the floor lost
	}
	r, err := Simulate(t.Context(), p, [][]Event{evs}, Options{FloorLoss: 0.75})
	must.NoError(t, err)
	must.Eq(t, int64(1), r.PowerOffs)
	must.InDelta(t, 0.25*20.0/60, r.LostHours, 1e-9)
	must.InDelta(t, (10+0.25*40)/60, r.LostHoursNoCheckpoint, 1e-9)
	must.InDelta(t, (10+0.25*40)/60, r.HarvestedHours, 1e-9)
}

func TestSimulateRejectsFloorLoss(t *testing.T) {
	for _, loss := range []float64{-0.1, 1.5, math.NaN()} {
		_, err := Simulate(t.Context(), NewCondor(), fleet(1, 1), Options{FloorLoss: loss})
		must.ErrorContains(t, err, "floor loss must be between 0 and 1", must.Sprintf("floor loss %v", loss))
	}
}

func TestCondorTimeline(t *testing.T) {
	evs := []Event{
		{onDay0(8, 0, 0), predictor.InUse},
		{onDay0(9, 0, 0), predictor.Available},  // the VM starts at 09:15
		{onDay0(10, 0, 0), predictor.InUse},     // a collision: suspended, evicted at 10:10
		{onDay0(11, 0, 0), predictor.Available}, // starts again at 11:15
		{onDay0(13, 0, 0), predictor.Offline},   // powered off under the VM
		{onDay0(14, 0, 0), predictor.Restarted}, // idle since 11:00: a VM starts at once
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
		{"at floor, owner back", Situation{Now: now, Phase: AtFloor, OwnerPresent: true}, Suspend},
		{"at floor, owner away: no floor layer", Situation{Now: now, Phase: AtFloor, Harvestable: true, OwnerIdle: time.Hour}, Grow},
		{"draining", Situation{Now: now, Phase: Draining, OwnerPresent: true}, Hold},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, c.Decide(tc.s), must.Sprintf("situation %+v", tc.s))
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
	// With a lead of 10 minutes these read about 0.01, 0.07, 0.18 and 0.40.
	quiet, middling, likely, very := forecastWith(0.001), forecastWith(0.007), forecastWith(0.02), forecastWith(0.05)
	layered := NewForecast(10*time.Minute, 0.05, 0.1, 0.3)
	noDrain := NewForecast(10*time.Minute, 0.05, 0.1, math.Inf(1))
	noFloor := NewForecast(10*time.Minute, 0.05, 0.1, 0.1)
	floorStart := NewForecast(10*time.Minute, 0.05, 0.1, 0.3)
	floorStart.FloorStartBelow = 0.2
	now := day0.Add(12 * time.Hour)
	longAgo, justNow := now.Add(-time.Hour), now.Add(-5*time.Minute)
	tests := []struct {
		name string
		p    Forecast
		s    Situation
		want Action
	}{
		{"quiet, owner just left", layered, Situation{Now: now, Harvestable: true, OwnerIdle: 30 * time.Second, Forecast: quiet}, Hold},
		{"quiet", layered, Situation{Now: now, Harvestable: true, OwnerIdle: 2 * time.Minute, Forecast: quiet}, Start},
		{"vacant, between start and shrink", layered, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: middling}, Hold},
		{"vacant, owner likely back", layered, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: very}, Hold},
		{"vacant, off", layered, Situation{Now: now, OwnerIdle: time.Hour, Forecast: quiet}, Hold},

		{"running, quiet", layered, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: quiet}, Hold},
		{"running, between start and shrink", layered, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: middling}, Hold},
		{"running, owner likely back", layered, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: likely}, Shrink},
		{"running, owner very likely back", layered, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: very}, Drain},
		{"running, owner back", layered, Situation{Now: now, Phase: Running, OwnerPresent: true, Forecast: quiet}, Suspend},
		{"running, no forecast", layered, Situation{Now: now, Phase: Running, Harvestable: true}, Drain},

		{"at floor, owner still likely back", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: longAgo, Harvestable: true, Forecast: likely}, Hold},
		{"at floor, between start and shrink", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: longAgo, Harvestable: true, Forecast: middling}, Hold},
		{"at floor, quiet again", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: longAgo, Harvestable: true, Forecast: quiet}, Grow},
		{"at floor, quiet again but only just shrunk", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: justNow, Harvestable: true, Forecast: quiet}, Hold},
		{"at floor, quiet again after MinFloor", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: now.Add(-layered.MinFloor), Harvestable: true, Forecast: quiet}, Grow},
		{"at floor, owner very likely back", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: justNow, Harvestable: true, Forecast: very}, Drain},
		{"at floor, owner back", layered, Situation{Now: now, Phase: AtFloor, PhaseSince: longAgo, OwnerPresent: true}, Suspend},

		{"suspended, owner left", layered, Situation{Now: now, Phase: Suspended, PhaseSince: justNow, Harvestable: true}, Resume},
		{"suspended a while", layered, Situation{Now: now, Phase: Suspended, PhaseSince: justNow, OwnerPresent: true}, Hold},
		{"suspended too long", layered, Situation{Now: now, Phase: Suspended, PhaseSince: longAgo, OwnerPresent: true}, Evict},
		{"draining", layered, Situation{Now: now, Phase: Draining, PhaseSince: justNow, Harvestable: true, Forecast: quiet}, Hold},

		{"drains off: running, owner very likely back", noDrain, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: very}, Shrink},
		{"drains off: at floor, owner very likely back", noDrain, Situation{Now: now, Phase: AtFloor, PhaseSince: justNow, Harvestable: true, Forecast: very}, Hold},
		{"drains off: at floor, no forecast", noDrain, Situation{Now: now, Phase: AtFloor, PhaseSince: justNow, Harvestable: true}, Hold},
		{"floor off: running, owner likely back", noFloor, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: likely}, Drain},
		{"floor off: running, between start and drain", noFloor, Situation{Now: now, Phase: Running, Harvestable: true, Forecast: middling}, Hold},

		{"floor start: quiet", floorStart, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: quiet}, Start},
		{"floor start: between start and shrink", floorStart, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: middling}, StartAtFloor},
		{"floor start: above shrink, below floor start", floorStart, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: likely}, StartAtFloor},
		{"floor start: owner very likely back", floorStart, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: very}, Hold},
		{"floor start: owner just left", floorStart, Situation{Now: now, Harvestable: true, OwnerIdle: 30 * time.Second, Forecast: middling}, Hold},
		{"floor start: off", floorStart, Situation{Now: now, OwnerIdle: time.Hour, Forecast: middling}, Hold},
		{"floor start: started at its floor, still middling", floorStart, Situation{Now: now, Phase: AtFloor, PhaseSince: longAgo, Harvestable: true, Forecast: middling}, Hold},
		{"floor start: started at its floor, quiet but only just", floorStart, Situation{Now: now, Phase: AtFloor, PhaseSince: justNow, Harvestable: true, Forecast: quiet}, Hold},
		{"floor start: started at its floor, quiet", floorStart, Situation{Now: now, Phase: AtFloor, PhaseSince: longAgo, Harvestable: true, Forecast: quiet}, Grow},
		{"floor start off: between start and shrink", layered, Situation{Now: now, Harvestable: true, OwnerIdle: time.Hour, Forecast: middling}, Hold},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, tc.p.Decide(tc.s), must.Sprintf("p = %.3f", ReturnWithin(tc.s.Forecast, tc.p.Lead)))
		})
	}
}

func TestForecastValidate(t *testing.T) {
	flag := func(k string) string { return "--" + strings.ReplaceAll(k, "_", "-") }
	tests := []struct {
		name  string
		edit  func(*Forecast)
		key   func(string) string
		wants []string
	}{
		{"default", func(*Forecast) {}, nil, nil},
		{"drains off", func(f *Forecast) { f.DrainAbove = 2 }, nil, nil},
		{"floor off", func(f *Forecast) { f.ShrinkAbove = f.DrainAbove }, nil, nil},
		{"no lead", func(f *Forecast) { f.Lead = 0 }, nil, []string{"lead must be positive, got 0s"}},
		{"start at 0", func(f *Forecast) { f.StartBelow = 0 }, nil, []string{"start_below must be above 0 and at most 1, got 0"}},
		{"start above 1", func(f *Forecast) { f.StartBelow, f.ShrinkAbove = 1.5, 2 }, flag, []string{"--start-below must be above 0 and at most 1, got 1.5"}},
		{"shrink below start", func(f *Forecast) { f.ShrinkAbove = 0.004 }, flag, []string{"--shrink-above must be at least --start-below (0.0075), got 0.004"}},
		{"drain below shrink", func(f *Forecast) { f.DrainAbove, f.FloorStartBelow = 0.01, 0.01 }, flag, []string{"--drain-above must be at least --shrink-above (0.0125), got 0.01"}},
		{"floor start off", func(f *Forecast) { f.FloorStartBelow = f.StartBelow }, nil, nil},
		{"floor start above shrink", func(f *Forecast) { f.FloorStartBelow = 0.5 }, nil, nil},
		{"floor start always", func(f *Forecast) { f.FloorStartBelow = 1 }, nil, nil},
		{"floor start below start", func(f *Forecast) { f.FloorStartBelow = 0.004 }, nil, []string{"floor_start_below must be at least start_below (0.0075) and at most 1, got 0.004"}},
		{"floor start above 1", func(f *Forecast) { f.FloorStartBelow = 1.5 }, flag, []string{"--floor-start-below must be at least --start-below (0.0075) and at most 1, got 1.5"}},
		{"floor start NaN", func(f *Forecast) { f.FloorStartBelow = math.NaN() }, nil, []string{"floor_start_below must be at least start_below (0.0075) and at most 1, got NaN"}},
		{"floor start above drain", func(f *Forecast) { f.FloorStartBelow, f.DrainAbove = 0.2, 0.1 }, flag, []string{"--floor-start-below must be at most --drain-above (0.1), got 0.2"}},
		{"NaN", func(f *Forecast) { f.ShrinkAbove = math.NaN() }, nil, []string{"shrink_above must be at least start_below (0.0075), got NaN", "drain_above must be at least shrink_above (NaN)"}},
		{"negative density", func(f *Forecast) { f.ArrivalDensity = -0.1 }, flag, []string{"--arrival-density must be zero (thresholds fixed) or a positive number of arrivals per harvestable hour, got -0.1"}},
		{"negative durations", func(f *Forecast) { f.MinIdle, f.MinFloor = -time.Second, -time.Minute }, flag, []string{"--min-idle must not be negative, got -1s", "--min-floor must not be negative, got -1m0s"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := DefaultForecast()
			tc.edit(&f)
			err := f.Validate(tc.key)
			if len(tc.wants) == 0 {
				must.NoError(t, err)
				return
			}
			for _, want := range tc.wants {
				must.ErrorContains(t, err, want)
			}
		})
	}
}

func TestNames(t *testing.T) {
	must.Eq(t, "floor", AtFloor.String())
	must.Eq(t, "phase(?)", Phase(99).String())
	must.Eq(t, "shrink", Shrink.String())
	must.Eq(t, "grow", Grow.String())
	must.Eq(t, "start-at-floor", StartAtFloor.String())
	must.Eq(t, "action(?)", Action(99).String())
	must.True(t, AtFloor.Holds())
	must.False(t, Vacant.Holds())
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
	for _, np := range policies() {
		a, err := Simulate(t.Context(), np.p, desktops, Options{Workers: 1})
		must.NoError(t, err)
		b, err := Simulate(t.Context(), np.p, desktops, Options{Workers: 3})
		must.NoError(t, err)
		must.Eq(t, a, b, must.Sprint(np.name))
	}
}

func TestForecastPolicyCollidesLess(t *testing.T) {
	// On regular owners the forecast policy must avoid most of the collisions HTCondor's
	// rule runs into, with its floor layer or without.
	desktops := fleet(8, 10)
	opt := Options{From: day0.AddDate(0, 0, 28)}
	condor, err := Simulate(t.Context(), NewCondor(), desktops, opt)
	must.NoError(t, err)
	for _, np := range policies()[1:] {
		t.Run(np.name, func(t *testing.T) {
			fc, err := Simulate(t.Context(), np.p, desktops, opt)
			must.NoError(t, err)
			t.Logf("condor: %.0f h, %.1f%% collisions; %s: %.0f h (%.0f%%), %.1f%% collisions, %.1f%% at floor",
				condor.HarvestedHours, 100*condor.CollisionRate(), np.name, fc.HarvestedHours,
				100*fc.HarvestedHours/condor.HarvestedHours, 100*fc.CollisionRate(), 100*fc.AtFloorRate())
			must.Less(t, condor.CollisionRate()/2, fc.CollisionRate())
			must.Greater(t, condor.HarvestedHours/2, fc.HarvestedHours)
		})
	}
}

func TestSimulateRejectsDisorder(t *testing.T) {
	evs := []Event{{day0.Add(time.Hour), predictor.Available}, {day0, predictor.InUse}}
	_, err := Simulate(t.Context(), NewCondor(), [][]Event{evs}, Options{})
	must.Error(t, err)
}
