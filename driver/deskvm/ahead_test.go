package deskvm

import (
	"math"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/deskcloud/deskcloud/predictor"
	"github.com/shoenig/test/must"
)

// officeOwner is at the desktop on weekdays from 09:00 to 17:00 and away otherwise.
func officeOwner(t time.Time) owner.State {
	if wd := t.Weekday(); wd == time.Saturday || wd == time.Sunday {
		return owner.StateAway
	}
	if h := t.Hour(); h >= 9 && h < 17 {
		return owner.StateActive
	}
	return owner.StateAway
}

// trainedSensor is an owner sensor whose forecast has learnt weeks of officeOwner, up to end.
func trainedSensor(t *testing.T, weeks int, end time.Time) *ownerSensor {
	t.Helper()
	live, err := predictor.NewLive(predictor.LiveConfig{})
	must.NoError(t, err)
	t.Cleanup(func() { _ = live.Close() })
	s := &ownerSensor{live: live}
	s.playOffice(end.AddDate(0, 0, -7*weeks), end)
	return s
}

// playOffice feeds the sensor's forecast and status officeOwner every 5 minutes in [from, to].
func (s *ownerSensor) playOffice(from, to time.Time) {
	for at := from; !at.After(to); at = at.Add(5 * time.Minute) {
		st := officeOwner(at)
		s.live.Observe(at, st)
		if st != s.status.State {
			s.status = owner.Status{State: st, Since: at}
		}
	}
}

// TestAhead plays the forecast-driven layer against a real forecast of a desktop whose owner
// comes in at 09:00 every weekday: the guest's memory goes to its floor shortly before, the
// scheduler is told not to start work there, and at night the guest may grow again.
func TestAhead(t *testing.T) {
	monday := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC) // a Monday
	before := monday.Add(8*time.Hour + 55*time.Minute)
	s := trainedSensor(t, 4, before)

	// Thresholds spelled out, so that the test does not move with the defaults.
	policy := harvest.NewForecast(10*time.Minute, 0.01, 0.02, math.Inf(1))
	p := yield.DefaultPolicy()
	d := yield.NewDecider(p, yield.VMInfo{MemoryMiB: 4096, CPUCapPercent: 100})
	a := &ahead{policy: policy, since: before.Add(-time.Hour)}
	guest := yield.Guest{BalloonMiB: 4096, UsedMiB: 1024}
	sample := func(at time.Time) owner.Sample {
		return owner.Sample{Time: at, Has: owner.HasCPU | owner.HasMemory, CPU: 0.01, MemAvailableMiB: 16000, MemTotalMiB: 24000}
	}
	d.Observe(sample(before.Add(-time.Second)), guest)

	sit, ok := s.situation(before)
	must.True(t, ok)
	pBefore := harvest.ReturnWithin(sit.Forecast, policy.Lead)
	t.Logf("P(back within %s) at 08:55 = %.3f", policy.Lead, pBefore)
	must.GreaterEq(t, policy.ShrinkAbove, pBefore, must.Sprint("an owner who comes in at 09:00 every weekday must look likely back at 08:55"))
	advice, ok := s.advice(before, policy)
	must.True(t, ok)
	must.NotEq(t, adviceStart, advice, must.Sprint("no new work just before the owner's usual arrival"))

	event, drain := a.step(before, s, d)
	must.Eq(t, "", event)
	must.Eq(t, "", drain, must.Sprint("the default policy never drains"))
	dec := d.Observe(sample(before.Add(time.Second)), guest)
	must.True(t, dec.Changed)
	must.Eq(t, 1024+p.MemoryFloorMiB, dec.BalloonMiB, must.Sprint("the guest goes to its floor: what it uses plus memory_floor"))
	must.StrContains(t, dec.Reason, "owner likely back within 10m")

	// The owner came and went; at 03:00 the next night they are unlikely back for hours.
	night := monday.AddDate(0, 0, 1).Add(3 * time.Hour)
	s.playOffice(before, night)
	sit, ok = s.situation(night)
	must.True(t, ok)
	t.Logf("P(back within %s) at 03:00 = %.4f", policy.Lead, harvest.ReturnWithin(sit.Forecast, policy.Lead))
	event, _ = a.step(night, s, d)
	must.StrContains(t, event, "owner unlikely back within 10m")
	advice, _ = s.advice(night, policy)
	must.Eq(t, adviceStart, advice)

	// Let go, the guest grows back once memory_recover_after has passed with memory to spare.
	d.Observe(sample(night), guest)
	dec = d.Observe(sample(night.Add(p.MemoryRecoverAfter+time.Second)), yield.Guest{BalloonMiB: dec.BalloonMiB, UsedMiB: 1024})
	must.Eq(t, 4096, dec.BalloonMiB)
}

func TestHarvestConfigNever(t *testing.T) {
	c := defaultConfig(t, `harvest {
  drain_above = "never"
}`)
	hp, err := c.Harvest.policy()
	must.NoError(t, err)
	must.True(t, math.IsInf(hp.DrainAbove, 1), must.Sprintf("drain_above never is +Inf, got %v", hp.DrainAbove))
}

// TestAheadStartsAtFloor: where the policy starts VMs at their floor (P of the owner's return
// between start_below and floor_start_below), the scheduler is told to start work, and the
// task's VM goes to its floor as soon as it runs; with starts at the floor off, it runs at
// full size.
func TestAheadStartsAtFloor(t *testing.T) {
	monday := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC) // a Monday
	night := monday.AddDate(0, 0, 1).Add(3 * time.Hour)
	s := trainedSensor(t, 4, night)
	sit, ok := s.situation(night)
	must.True(t, ok)
	p := harvest.ReturnWithin(sit.Forecast, 10*time.Minute)
	must.Positive(t, p)

	// start_below below the night's p, floor_start_below above it: start, at the floor.
	atFloor := harvest.NewForecast(10*time.Minute, p/2, min(1, 2*p), math.Inf(1))
	atFloor.FloorStartBelow = min(1, 2*p)
	must.NoError(t, atFloor.Validate(nil))
	full := harvest.NewForecast(10*time.Minute, p/2, min(1, 2*p), math.Inf(1))

	for _, tc := range []struct {
		name   string
		policy harvest.Forecast
		floor  bool
		advice string
	}{
		{"starts at floor", atFloor, true, adviceStart},
		{"starts at floor off", full, false, adviceWait},
	} {
		t.Run(tc.name, func(t *testing.T) {
			advice, ok := s.advice(night, tc.policy)
			must.True(t, ok)
			must.Eq(t, tc.advice, advice)

			yp := yield.DefaultPolicy()
			d := yield.NewDecider(yp, yield.VMInfo{MemoryMiB: 4096, CPUCapPercent: 100})
			a := &ahead{policy: tc.policy, since: night}
			event := a.begin(night, s, d)
			must.Eq(t, tc.floor, a.atFloor)
			guest := yield.Guest{BalloonMiB: 4096, UsedMiB: 1024}
			dec := d.Observe(owner.Sample{Time: night, Has: owner.HasCPU | owner.HasMemory, CPU: 0.01, MemAvailableMiB: 16000, MemTotalMiB: 24000}, guest)
			if !tc.floor {
				must.Eq(t, "", event)
				must.Eq(t, 4096, dec.BalloonMiB, must.Sprint("a VM started at full size keeps its memory"))
				return
			}
			must.StrContains(t, event, "started at its floor")
			must.Eq(t, 1024+yp.MemoryFloorMiB, dec.BalloonMiB, must.Sprint("the guest goes to its floor at once"))
			// It stays there until p falls below start_below, and min_floor has passed.
			ev, _ := a.step(night.Add(time.Minute), s, d)
			must.Eq(t, "", ev)
			must.True(t, a.atFloor)
		})
	}
}
