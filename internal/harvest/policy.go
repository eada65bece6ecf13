// Package harvest decides when deskcloud places a VM on a desktop and when it hands the
// desktop back: the policy that the autoscaler plugin and the driver call, and a simulator
// that replays a trace of owners through it.
//
// Two policies are provided. [Condor] is HTCondor's desktop policy: start once the owner
// has been idle for 15 minutes, suspend the VM when they come back, evict it if they are
// still there 10 minutes later. [Forecast] acts on the owner-return forecast (package
// predictor): it starts a VM only when the owner is unlikely back within the lead time
// (at its floor when they are only fairly unlikely back), shrinks it to its floor (balloon
// inflated, CPU still in the idle class) as the owner becomes likely back, so the
// desktop's memory is free before they sit down, grows it back when that passes, and
// drains it (checkpoints and stops) when the owner is very likely back; when they arrive
// anyway it falls back on Condor's suspend and evict.
//
// Package internal/yield decides how a running VM gives way to an owner who is at the
// desktop (pause, balloon, checkpoint); this package decides whether a VM should be on the
// desktop at all, and at what size while the owner is away.
package harvest

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// Phase is what deskcloud is doing on a desktop.
type Phase uint8

const (
	// Vacant means no VM is on the desktop.
	Vacant Phase = iota
	// Running means a VM is running and its work is progressing.
	Running
	// Suspended means the VM is paused in memory: the owner came back while it ran.
	Suspended
	// Draining means the VM is writing its checkpoint before it stops.
	Draining
	// AtFloor means a VM is running with its memory handed back down to its floor (the
	// guest's reported need plus the driver's memory_floor) by its balloon, ahead of the
	// owner. Its CPU stays in the idle class and uncapped: the owner is away, and the idle
	// class yields the CPU to them the instant they return, so only memory, which takes
	// seconds to hand back, has to be handed back ahead of them.
	AtFloor
)

var phaseNames = [...]string{"vacant", "running", "suspended", "draining", "floor"}

// String names the phase.
func (p Phase) String() string {
	if int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return "phase(?)"
}

// Holds reports whether a VM is on the desktop in this phase, at full size or at its
// floor. Whether an owner who arrives collides with it depends also on whether it is at
// its floor; see [Report].
func (p Phase) Holds() bool { return p != Vacant }

// Action is what a policy asks for.
type Action uint8

const (
	// Hold keeps things as they are.
	Hold Action = iota
	// Start places a VM (resuming its work from its last checkpoint).
	Start
	// Suspend pauses the running VM where it is.
	Suspend
	// Resume restarts a suspended VM at the size it was suspended at: a VM suspended at its
	// floor resumes at its floor (phase AtFloor) and grows only when a policy asks for Grow.
	Resume
	// Drain checkpoints the VM and stops it: the desktop is handed back with no work lost.
	Drain
	// Evict kills the VM: the work since its last checkpoint is lost.
	Evict
	// Shrink takes a running VM to its floor (phase AtFloor): the balloon inflates until the
	// guest holds only its reported need plus the memory floor; the CPU stays in the idle
	// class, uncapped. The VM keeps running.
	Shrink
	// Grow gives a VM at its floor its memory back (phase Running).
	Grow
	// StartAtFloor places a VM as Start does, but at its floor (phase AtFloor): with its
	// balloon inflated to the guest's reported need plus the memory floor from the start,
	// its CPU in the idle class. It grows only when a policy asks for Grow.
	StartAtFloor
)

var actionNames = [...]string{"hold", "start", "suspend", "resume", "drain", "evict", "shrink", "grow", "start-at-floor"}

// String names the action.
func (a Action) String() string {
	if int(a) < len(actionNames) {
		return actionNames[a]
	}
	return "action(?)"
}

// Situation is what a policy sees when it decides.
type Situation struct {
	// Now is the time of the decision.
	Now time.Time
	// Phase is what deskcloud is doing on the desktop, since PhaseSince. A VM resumed at its
	// floor is AtFloor since it resumed.
	Phase      Phase
	PhaseSince time.Time
	// Harvestable is whether the desktop is up with its owner away.
	Harvestable bool
	// OwnerPresent is whether the owner is at the desktop.
	OwnerPresent bool
	// OwnerIdle is how long the owner has been away; zero while present.
	OwnerIdle time.Duration
	// Forecast is the owner-return forecast at Now, for policies that ask for one.
	Forecast predictor.Forecast
	// ArrivalDensity is the fleet's arrivals per harvestable desktop-hour over the past year
	// ([FleetDensity]); zero when not known.
	ArrivalDensity float64
}

// Policy decides, for one desktop at a time, what deskcloud should do. Decide must be a pure
// function of its Situation, so the same policy serves every desktop and the simulator.
type Policy interface {
	// Name identifies the policy in reports.
	Name() string
	// NeedsForecast reports whether Decide reads Situation.Forecast.
	NeedsForecast() bool
	// Decide returns the action for the situation.
	Decide(s Situation) Action
}

// Condor is HTCondor's desktop policy. The zero value is not useful; use NewCondor.
type Condor struct {
	// StartIdle is how long the owner must have been idle before a VM starts.
	StartIdle time.Duration
	// MaxSuspend is how long a suspended VM waits for the owner to leave before eviction.
	MaxSuspend time.Duration
}

// NewCondor returns HTCondor's defaults: start after 15 minutes idle, evict after 10
// minutes suspended.
func NewCondor() Condor { return Condor{StartIdle: 15 * time.Minute, MaxSuspend: 10 * time.Minute} }

// Name returns "condor".
func (Condor) Name() string { return "condor" }

// NeedsForecast returns false: the rule reads only the owner's idle time.
func (Condor) NeedsForecast() bool { return false }

// Decide applies the rule.
func (c Condor) Decide(s Situation) Action {
	switch s.Phase {
	case Vacant:
		if s.Harvestable && s.OwnerIdle >= c.StartIdle {
			return Start
		}
	case Running:
		if s.OwnerPresent {
			return Suspend
		}
	case AtFloor:
		// Condor has no floor layer: a VM it finds at its floor (left there by another
		// policy) is treated as running, and grown back while the owner is away.
		switch {
		case s.OwnerPresent:
			return Suspend
		case s.Harvestable:
			return Grow
		}
	case Suspended:
		return c.suspended(s)
	}
	return Hold
}

// suspended is the rule for a suspended VM, which Forecast shares.
func (c Condor) suspended(s Situation) Action {
	switch {
	case !s.OwnerPresent && s.Harvestable:
		return Resume
	case s.Now.Sub(s.PhaseSince) >= c.MaxSuspend:
		return Evict
	}
	return Hold
}

// Forecast acts on the owner-return forecast. With p the probability that the owner is
// back within Lead ([ReturnWithin]), it:
//
//   - starts a VM on a vacant desktop when p < StartBelow (and the owner has been away
//     MinIdle), and starts one at its floor when StartBelow <= p < FloorStartBelow, where
//     a full-size VM would be too likely in the owner's way but one that has already
//     handed its memory back would not;
//   - shrinks a running VM to its floor when p >= ShrinkAbove, so that the desktop's memory
//     is already handed back when the owner sits down;
//   - grows a VM at its floor back when p < StartBelow again, after MinFloor at the floor;
//   - drains a running VM, or one at its floor, when p >= DrainAbove;
//   - on an owner who arrives anyway, suspends the VM (which stays at its floor if it was
//     there) and evicts it if they stay, as Fallback does.
//
// StartBelow <= ShrinkAbove <= DrainAbove, and StartBelow <= FloorStartBelow, at most 1
// and at most DrainAbove, which Validate checks. The gap between StartBelow and
// ShrinkAbove is the hysteresis that keeps a VM from flapping between its sizes; MinFloor
// damps what flapping is left. ShrinkAbove equal to DrainAbove turns the floor layer off
// for running VMs (a drain comes first), and a threshold above 1 is never reached: that
// turns drains off, leaving the floor as the only layer ahead of the owner.
// FloorStartBelow equal to StartBelow turns starts at the floor off; it may lie above
// ShrinkAbove, since a VM at its floor has nothing left to hand back ahead of the owner.
//
// Decide is a pure function of its Situation: the driver calls it on the node with the
// live forecast, and the simulator with a replayed one.
type Forecast struct {
	// Lead is how far ahead the desktop must be ready: the probabilities below are of the
	// owner's return within Lead.
	Lead time.Duration
	// StartBelow is the probability below which a VM starts on a vacant desktop, and below
	// which a VM at its floor grows back.
	StartBelow float64
	// ShrinkAbove is the probability at or above which a running VM shrinks to its floor.
	ShrinkAbove float64
	// FloorStartBelow is the probability below which, from StartBelow up, a VM starts on a
	// vacant desktop at its floor rather than at full size; equal to StartBelow, VMs only
	// ever start at full size. A VM started at its floor stays there until p falls below
	// StartBelow, MinFloor after it started at the soonest.
	FloorStartBelow float64
	// DrainAbove is the probability at or above which a VM, at full size or at its floor,
	// is drained; above 1, never.
	DrainAbove float64
	// MinIdle is how long the owner must have been away before a VM starts at all.
	MinIdle time.Duration
	// MinFloor is how long a VM stays at its floor before it may grow back: every shrink
	// costs the guest its page cache, and the balloon seconds of work.
	MinFloor time.Duration
	// ArrivalDensity, when above zero, is the fleet's arrival density (arrivals per
	// harvestable desktop-hour) at which StartBelow, ShrinkAbove and DrainAbove hold as
	// given; where the situation tells the fleet's density, they scale in proportion to it
	// (see [Forecast.Scaled]), so that collisions stay the same share of arrivals when
	// owners come back less often, or more. Zero keeps the thresholds fixed.
	ArrivalDensity float64
	// Fallback handles an owner who arrives while a VM is on the desktop.
	Fallback Condor
}

// NewForecast returns a forecast policy with the given lead and thresholds, no starts at
// the floor (FloorStartBelow equal to startBelow), a MinIdle of a minute and a MinFloor of
// 15 minutes, falling back on HTCondor's suspend and evict.
func NewForecast(lead time.Duration, startBelow, shrinkAbove, drainAbove float64) Forecast {
	return Forecast{
		Lead: lead, StartBelow: startBelow, ShrinkAbove: shrinkAbove, FloorStartBelow: startBelow, DrainAbove: drainAbove,
		MinIdle: time.Minute, MinFloor: 15 * time.Minute, Fallback: NewCondor(),
	}
}

// DefaultForecast returns the forecast policy with deskcloud's defaults, chosen on the
// validation year of the library trace before its test year (docs/forecast.md, "Fleet
// simulation"): a lead of 10 minutes; start at full size, and grow back, below 0.0075;
// start at the floor below 0.05, the least that harvested 90 % of HTCondor's machine-hours
// there; shrink to the floor at 0.0125, which with these kept owner collisions under
// 4.5 % of arrivals with the fewest owners finding a VM at its floor; both thresholds hold
// at 0.217 arrivals per harvestable desktop-hour, that year's density, and scale with the
// fleet's density where it is known; never drain (DrainAbove is +Inf): on that trace
// draining ahead of the owner bought nothing the floor did not; MinIdle a minute, MinFloor
// 15 minutes.
func DefaultForecast() Forecast {
	f := NewForecast(10*time.Minute, 0.0075, 0.0125, math.Inf(1))
	f.FloorStartBelow = 0.05
	f.ArrivalDensity = 0.217
	return f
}

// Name returns "forecast".
func (Forecast) Name() string { return "forecast" }

// NeedsForecast returns true.
func (Forecast) NeedsForecast() bool { return true }

// Validate checks the lead, the thresholds, the durations and the arrival density. Each
// error names its field by key(k), k being the field's snake_case key (lead, start_below,
// shrink_above, floor_start_below, drain_above, min_idle, min_floor, arrival_density), so
// that a caller can name its own flag or attribute; a nil key uses k itself. Several
// errors are joined.
func (f Forecast) Validate(key func(k string) string) error {
	if key == nil {
		key = func(k string) string { return k }
	}
	var errs []error
	if f.Lead <= 0 {
		errs = append(errs, fmt.Errorf("%s must be positive, got %s", key("lead"), f.Lead))
	}
	if !(f.StartBelow > 0 && f.StartBelow <= 1) {
		errs = append(errs, fmt.Errorf("%s must be above 0 and at most 1, got %v", key("start_below"), f.StartBelow))
	}
	if !(f.ShrinkAbove >= f.StartBelow) {
		errs = append(errs, fmt.Errorf("%s must be at least %s (%v), got %v", key("shrink_above"), key("start_below"), f.StartBelow, f.ShrinkAbove))
	}
	if !(f.FloorStartBelow >= f.StartBelow && f.FloorStartBelow <= 1) {
		errs = append(errs, fmt.Errorf("%s must be at least %s (%v) and at most 1, got %v", key("floor_start_below"), key("start_below"), f.StartBelow, f.FloorStartBelow))
	}
	if !(f.DrainAbove >= f.ShrinkAbove) {
		errs = append(errs, fmt.Errorf("%s must be at least %s (%v), got %v", key("drain_above"), key("shrink_above"), f.ShrinkAbove, f.DrainAbove))
	}
	if f.FloorStartBelow > f.DrainAbove {
		// A VM started there would be drained at the next decision.
		errs = append(errs, fmt.Errorf("%s must be at most %s (%v), got %v", key("floor_start_below"), key("drain_above"), f.DrainAbove, f.FloorStartBelow))
	}
	if f.MinIdle < 0 {
		errs = append(errs, fmt.Errorf("%s must not be negative, got %s", key("min_idle"), f.MinIdle))
	}
	if f.MinFloor < 0 {
		errs = append(errs, fmt.Errorf("%s must not be negative, got %s", key("min_floor"), f.MinFloor))
	}
	if !(f.ArrivalDensity >= 0) || math.IsInf(f.ArrivalDensity, 1) {
		errs = append(errs, fmt.Errorf("%s must be zero (thresholds fixed) or a positive number of arrivals per harvestable hour, got %v", key("arrival_density"), f.ArrivalDensity))
	}
	return errors.Join(errs...)
}

// Decide applies the policy. A Situation without a forecast (OwnerAway false) reads as the
// owner back for certain.
func (f Forecast) Decide(s Situation) Action {
	if f.ArrivalDensity > 0 && s.ArrivalDensity > 0 {
		f = f.Scaled(s.ArrivalDensity / f.ArrivalDensity)
	}
	switch s.Phase {
	case Vacant:
		if !s.Harvestable || s.OwnerIdle < f.MinIdle {
			return Hold
		}
		switch p := ReturnWithin(s.Forecast, f.Lead); {
		case p < f.StartBelow:
			return Start
		case p < f.FloorStartBelow:
			return StartAtFloor
		}
	case Running:
		if s.OwnerPresent {
			return Suspend
		}
		switch p := ReturnWithin(s.Forecast, f.Lead); {
		case p >= f.DrainAbove:
			return Drain
		case p >= f.ShrinkAbove:
			return Shrink
		}
	case AtFloor:
		if s.OwnerPresent {
			return Suspend
		}
		switch p := ReturnWithin(s.Forecast, f.Lead); {
		case p >= f.DrainAbove:
			return Drain
		case p < f.StartBelow && s.Now.Sub(s.PhaseSince) >= f.MinFloor:
			return Grow
		}
	case Suspended:
		return f.Fallback.suspended(s)
	}
	return Hold
}

// Scaled returns the policy with its thresholds on the owner's hazard scaled by k, k held
// between 1/4 and 4: StartBelow, ShrinkAbove and a DrainAbove that is reached (at most 1),
// each capped at 1 and in their order; a floor layer that was off (ShrinkAbove equal to
// DrainAbove) stays off, and so do starts at the floor (FloorStartBelow equal to
// StartBelow). Otherwise FloorStartBelow is not scaled, since it sets how much is harvested
// rather than how often owners meet a VM above its floor; it is only kept between
// StartBelow and DrainAbove. Lead and durations are unchanged.
func (f Forecast) Scaled(k float64) Forecast {
	k = min(max(k, 0.25), 4)
	floorOff, floorStartOff := f.ShrinkAbove == f.DrainAbove, f.FloorStartBelow == f.StartBelow
	if f.DrainAbove <= 1 {
		f.DrainAbove = min(f.DrainAbove*k, 1)
	}
	f.ShrinkAbove = min(f.ShrinkAbove*k, 1, f.DrainAbove)
	if floorOff {
		f.ShrinkAbove = f.DrainAbove
	}
	f.StartBelow = min(f.StartBelow*k, f.ShrinkAbove)
	f.FloorStartBelow = min(max(f.FloorStartBelow, f.StartBelow), max(f.DrainAbove, f.StartBelow))
	if floorStartOff {
		f.FloorStartBelow = f.StartBelow
	}
	return f
}

// ReturnWithin returns the forecast probability that the owner is active within d,
// interpolating between the forecast's horizons on the cumulative hazard -ln(1-P), which
// is linear in time when the hazard is constant between them.
func ReturnWithin(f predictor.Forecast, d time.Duration) float64 {
	if !f.OwnerAway {
		return 1
	}
	hs := predictor.Horizons
	if d <= hs[0] {
		return 1 - math.Pow(1-f.P[0], float64(d)/float64(hs[0]))
	}
	for i := 1; i < len(hs); i++ {
		if d <= hs[i] {
			h0, h1 := cumHazard(f.P[i-1]), cumHazard(f.P[i])
			w := float64(d-hs[i-1]) / float64(hs[i]-hs[i-1])
			return 1 - math.Exp(-(h0 + w*(h1-h0)))
		}
	}
	last := len(hs) - 1
	return 1 - math.Exp(-cumHazard(f.P[last])*float64(d)/float64(hs[last]))
}

func cumHazard(p float64) float64 { return -math.Log(max(1-p, 1e-12)) }
