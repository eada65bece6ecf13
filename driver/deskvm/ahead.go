package deskvm

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
)

// The harvest block acts on the owner-return forecast made on this desktop (predictor.Live)
// with the same decision code the fleet simulator judges (harvest.Forecast): a running VM's
// memory is handed back to its floor before the owner's likely return, and the node tells
// the scheduler whether a VM should start here now.

// aheadEvery is how often a task's yield loop asks the harvest policy about its VM. The
// forecast moves over minutes; the lead is ten.
const aheadEvery = 15 * time.Second

// neverDrain spells a drain_above that is never reached.
const neverDrain = "never"

// HarvestConfig is the plugin config's harvest block. The loads are text for the reason
// yield.Config's are: Nomad hands fractions over as strings.
type HarvestConfig struct {
	// Enabled turns the forecast-driven layer and the harvest.advice attribute on.
	Enabled bool `codec:"enabled"`
	// Lead is how far ahead of the owner's return the desktop must be ready.
	Lead string `codec:"lead"`
	// StartBelow: P(owner back within lead) below which a VM may start, and one at its floor
	// grows back.
	StartBelow string `codec:"start_below"`
	// ShrinkAbove: the probability at which a running VM's memory goes to its floor.
	ShrinkAbove string `codec:"shrink_above"`
	// FloorStartBelow: P(owner back within lead) below which, from StartBelow up, a VM may
	// start, but at its floor: the advice is "start", and the task's VM goes to its memory
	// floor as soon as it runs, until the policy lets it grow.
	FloorStartBelow string `codec:"floor_start_below"`
	// DrainAbove: the probability at which a VM is checkpointed and stopped ahead of the
	// owner (checkpoint mode only); "never" leaves that to the yield layers.
	DrainAbove string `codec:"drain_above"`
	// MinIdle: how long the owner must have been away before a VM may start.
	MinIdle string `codec:"min_idle"`
	// MinFloor: how long a VM stays at its floor before it may grow back.
	MinFloor string `codec:"min_floor"`
}

// harvestSpec is the plugin config's harvest block; its defaults are harvest.DefaultForecast's.
var harvestSpec = newHarvestSpec(harvest.DefaultForecast())

func newHarvestSpec(f harvest.Forecast) *hclspec.Spec {
	q := strconv.Quote
	drain := neverDrain
	if !math.IsInf(f.DrainAbove, 1) {
		drain = formatLoad(f.DrainAbove)
	}
	return blockSpec("harvest", []blockAttr{
		{"enabled", "bool", "true"},
		{"lead", "string", q(owner.FormatDuration(f.Lead))},
		{"start_below", "string", q(formatLoad(f.StartBelow))},
		{"shrink_above", "string", q(formatLoad(f.ShrinkAbove))},
		{"floor_start_below", "string", q(formatLoad(f.FloorStartBelow))},
		{"drain_above", "string", q(drain)},
		{"min_idle", "string", q(owner.FormatDuration(f.MinIdle))},
		{"min_floor", "string", q(owner.FormatDuration(f.MinFloor))},
	}, nil)
}

func formatLoad(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// policy parses and validates the block; each error names the key and quotes the value.
func (c HarvestConfig) policy() (harvest.Forecast, error) {
	f := harvest.DefaultForecast()
	var errs []error
	prob := func(key, val string, dst *float64) {
		v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			errs = append(errs, fmt.Errorf("harvest.%s must be a probability from 0 to 1, got %q", key, val))
		}
		*dst = v
	}
	dur := func(key, val string, dst *time.Duration) {
		d, err := time.ParseDuration(val)
		if err != nil {
			errs = append(errs, fmt.Errorf("harvest.%s must be a duration such as \"10m\", got %q", key, val))
		}
		*dst = d
	}
	dur("lead", c.Lead, &f.Lead)
	prob("start_below", c.StartBelow, &f.StartBelow)
	prob("shrink_above", c.ShrinkAbove, &f.ShrinkAbove)
	prob("floor_start_below", c.FloorStartBelow, &f.FloorStartBelow)
	if strings.TrimSpace(c.DrainAbove) == neverDrain {
		f.DrainAbove = math.Inf(1)
	} else {
		prob("drain_above", c.DrainAbove, &f.DrainAbove)
		if len(errs) == 0 && !(f.DrainAbove > 0 && f.DrainAbove <= 1) {
			errs = append(errs, fmt.Errorf("harvest.drain_above must be a probability from 0 to 1 or %q, got %q", neverDrain, c.DrainAbove))
		}
	}
	dur("min_idle", c.MinIdle, &f.MinIdle)
	dur("min_floor", c.MinFloor, &f.MinFloor)
	if len(errs) > 0 {
		return f, errors.Join(errs...)
	}
	if err := f.Validate(func(k string) string { return "harvest." + k }); err != nil {
		return f, err
	}
	return f, nil
}

// situation is what the harvest policy sees of this desktop now; false before the owner
// has been classified or when the forecast is off.
func (s *ownerSensor) situation(now time.Time) (harvest.Situation, bool) {
	s.mu.Lock()
	st, live := s.status, s.live
	s.mu.Unlock()
	if live == nil || st.State == owner.StateUnknown {
		return harvest.Situation{}, false
	}
	f, ok := live.Forecast(now)
	if !ok {
		return harvest.Situation{}, false
	}
	away := st.State == owner.StateAway
	sit := harvest.Situation{Now: now, Harvestable: away, OwnerPresent: !away, Forecast: f}
	if away {
		sit.OwnerIdle = max(now.Sub(st.Since), 0)
	}
	return sit, true
}

// Values of the driver.deskvm.harvest.advice attribute.
const (
	adviceOwner = "owner" // the owner is at the desktop
	adviceStart = "start" // a VM may start here now
	adviceWait  = "wait"  // the owner is away, but not long enough or not surely enough to start
	adviceFloor = "floor" // VMs here are held at their memory floor, ahead of the owner
	adviceDrain = "drain" // VMs here are being checkpointed and stopped, ahead of the owner
)

// advice is the harvest policy's word on this desktop for the scheduler, worked out here
// so that thresholds finer than the published forecast's one decimal can be used.
func (s *ownerSensor) advice(now time.Time, f harvest.Forecast) (string, bool) {
	sit, ok := s.situation(now)
	if !ok {
		return "", false
	}
	if sit.OwnerPresent {
		return adviceOwner, true
	}
	sit.Phase = harvest.Vacant
	if a := f.Decide(sit); a == harvest.Start || a == harvest.StartAtFloor {
		return adviceStart, true
	}
	switch p := harvest.ReturnWithin(sit.Forecast, f.Lead); {
	case p >= f.DrainAbove:
		return adviceDrain, true
	case p >= f.ShrinkAbove:
		return adviceFloor, true
	}
	return adviceWait, true
}

// ahead is one task's forecast-driven layer: it asks the harvest policy about the task's
// VM and holds the VM at its memory floor while the policy says so.
type ahead struct {
	policy  harvest.Forecast
	atFloor bool
	since   time.Time // when the VM last went to or left its floor
}

// begin asks the policy about a VM that has just started (or resumed): where the policy
// would start it at its floor, it goes there at once, and begin returns the event to report.
func (a *ahead) begin(now time.Time, sensor *ownerSensor, d *yield.Decider) (event string) {
	sit, ok := sensor.situation(now)
	if !ok {
		return ""
	}
	sit.Phase = harvest.Vacant
	if a.policy.Decide(sit) != harvest.StartAtFloor {
		return ""
	}
	a.atFloor, a.since = true, now
	reason := fmt.Sprintf("started at its floor: the owner may be back within %s (p %.3f)", owner.FormatDuration(a.policy.Lead), harvest.ReturnWithin(sit.Forecast, a.policy.Lead))
	d.SetAhead(reason)
	return reason
}

// step asks the policy at now and applies its answer to d. It returns an event to report
// ("" for none) and, when the policy drains the VM, the reason to checkpoint it for.
func (a *ahead) step(now time.Time, sensor *ownerSensor, d *yield.Decider) (event, drain string) {
	sit, ok := sensor.situation(now)
	if !ok {
		return "", ""
	}
	sit.Phase, sit.PhaseSince = harvest.Running, a.since
	if a.atFloor {
		sit.Phase = harvest.AtFloor
	}
	p := harvest.ReturnWithin(sit.Forecast, a.policy.Lead)
	switch a.policy.Decide(sit) {
	case harvest.Shrink:
		a.atFloor, a.since = true, now
		d.SetAhead(fmt.Sprintf("owner likely back within %s (p %.3f)", owner.FormatDuration(a.policy.Lead), p))
	case harvest.Grow:
		a.atFloor, a.since = false, now
		d.SetAhead("")
		return fmt.Sprintf("owner unlikely back within %s (p %.3f): the guest may grow again", owner.FormatDuration(a.policy.Lead), p), ""
	case harvest.Drain:
		return "", fmt.Sprintf("owner likely back within %s (p %.3f)", owner.FormatDuration(a.policy.Lead), p)
	}
	return "", ""
}
