// Package harvest decides when deskcloud places a VM on a desktop and when it hands the
// desktop back: the policy that the autoscaler plugin and the driver call, and a simulator
// that replays a trace of owners through it.
//
// Two policies are provided. [Condor] is HTCondor's desktop policy: start once the owner
// has been idle for 15 minutes, suspend the VM when they come back, evict it if they are
// still there 10 minutes later. [Forecast] starts and drains by the owner-return forecast
// (package predictor): it starts only when the owner is unlikely back within the lead time,
// and drains (checkpoints and stops) as soon as they become likely back within it, so the
// desktop is free before they sit down; when they arrive anyway it falls back on Condor's
// suspend and evict.
//
// Package internal/yield decides how a running VM gives way to an owner who is at the
// desktop (pause, balloon, checkpoint); this package decides whether a VM should be on the
// desktop at all.
package harvest

import (
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
)

var phaseNames = [...]string{"vacant", "running", "suspended", "draining"}

// String names the phase.
func (p Phase) String() string {
	if int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return "phase(?)"
}

// Holds reports whether a VM holds the desktop's resources in this phase: an owner who
// arrives then collides with it.
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
	// Resume restarts a suspended VM.
	Resume
	// Drain checkpoints the VM and stops it: the desktop is handed back with no work lost.
	Drain
	// Evict kills the VM: the work since its last checkpoint is lost.
	Evict
)

var actionNames = [...]string{"hold", "start", "suspend", "resume", "drain", "evict"}

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
	// Phase is what deskcloud is doing on the desktop, since PhaseSince.
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

// Forecast starts and drains VMs by the owner-return forecast.
type Forecast struct {
	// Lead is how far ahead the desktop must be free: a VM is drained when the owner is
	// likely back within Lead.
	Lead time.Duration
	// DrainAbove is the probability of the owner's return within Lead at which a running
	// VM is drained.
	DrainAbove float64
	// StartBelow is the probability below which a VM may start; below DrainAbove, so that a
	// VM does not start only to drain at once.
	StartBelow float64
	// MinIdle is how long the owner must have been away before a VM starts at all.
	MinIdle time.Duration
	// Fallback handles an owner who arrives while a VM still holds the desktop.
	Fallback Condor
}

// NewForecast returns a forecast policy with the given lead and thresholds, falling back
// on HTCondor's suspend and evict.
func NewForecast(lead time.Duration, drainAbove, startBelow float64) Forecast {
	return Forecast{Lead: lead, DrainAbove: drainAbove, StartBelow: startBelow, MinIdle: time.Minute, Fallback: NewCondor()}
}

// Name returns "forecast".
func (Forecast) Name() string { return "forecast" }

// NeedsForecast returns true.
func (Forecast) NeedsForecast() bool { return true }

// Decide applies the policy.
func (f Forecast) Decide(s Situation) Action {
	switch s.Phase {
	case Vacant:
		if s.Harvestable && s.OwnerIdle >= f.MinIdle && ReturnWithin(s.Forecast, f.Lead) < f.StartBelow {
			return Start
		}
	case Running:
		switch {
		case s.OwnerPresent:
			return Suspend
		case ReturnWithin(s.Forecast, f.Lead) >= f.DrainAbove:
			return Drain
		}
	case Suspended:
		return f.Fallback.suspended(s)
	}
	return Hold
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
