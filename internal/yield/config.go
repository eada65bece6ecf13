package yield

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
)

// Mode is a task's preemption mode: what yield does once pausing is not enough.
type Mode string

const (
	// ModeCheckpoint pauses, then checkpoints the VM to disk and frees its memory; the VM is
	// restored from the checkpoint once the owner leaves.
	ModeCheckpoint Mode = "checkpoint"
	// ModeSuspend pauses and stays paused, holding the guest's memory (which the host may
	// swap out) for as long as the owner is busy. Nothing is lost and nothing is written to
	// disk, but the owner gets no memory back.
	ModeSuspend Mode = "suspend"
	// ModeRestart pauses, then stops the VM; Nomad restarts the task from the beginning,
	// here or elsewhere. For work that is cheap to redo.
	ModeRestart Mode = "restart"
)

var modes = []Mode{ModeCheckpoint, ModeSuspend, ModeRestart}

// CapStep is one band of the CPU cap: while the owner load is above LoadAbove, the VM may use
// at most Percent of its vCPUs.
type CapStep struct {
	LoadAbove float64 `codec:"load_above"`
	Percent   int     `codec:"percent"`
}

// Policy is the yield policy of one VM, as the Decider reads it. Build it with DefaultPolicy
// or Config.Policy, narrow it to a task with ForTask, and Validate it before use. The config
// key of each field is in parentheses.
type Policy struct {
	// Owner are the owner-state thresholds (cpu_idle_below, cpu_busy_above, load_window,
	// input_active_within, away_after, locked_is_away, settle_after).
	Owner owner.Thresholds

	// CPUCapSteps (cpu_cap_step blocks) are the cap's bands, in rising load and falling
	// percent. Below the first band the VM is uncapped.
	CPUCapSteps []CapStep
	// CapWindow (cap_window) is the time constant of the owner load that decides whether to
	// cap: short, so that the cap takes hold within a sampling interval or two of the owner
	// starting work, while a single tick of a background process moves it too little to cap.
	// Once that load is past the first band, the cap goes down to the band of the higher of
	// it and the latest sample, and goes up only when both allow. The owner's state follows
	// the slower load_window.
	CapWindow time.Duration
	// CapRecoverAfter (cap_recover_after) is how long the owner load must allow a higher cap
	// before the cap goes up one step.
	CapRecoverAfter time.Duration

	// MemoryLowWaterMiB (memory_low_water): when the owner's MemAvailable falls below this,
	// the balloon takes the difference back from the guest.
	MemoryLowWaterMiB int
	// MemoryHighWaterMiB (memory_high_water): when the owner's MemAvailable stays above this
	// for MemoryRecoverAfter, the guest gets the surplus back.
	MemoryHighWaterMiB int
	// MemoryRecoverAfter (memory_recover_after) is how long MemAvailable must stay above the
	// high water before the balloon gives memory back to the guest.
	MemoryRecoverAfter time.Duration
	// MemoryFloorMiB (memory_floor) is what the guest keeps on top of what it reports it
	// needs: the balloon never takes it below that.
	MemoryFloorMiB int
	// MemoryShortfallAfter (memory_shortfall_after) is how long the owner may be short of
	// memory that the balloon cannot free before the VM is checkpointed (or restarted,
	// or paused, per Preemption).
	MemoryShortfallAfter time.Duration

	// SuspendAfter (suspend_after) is how long the owner must be continuously active before
	// the VM is paused.
	SuspendAfter time.Duration
	// ResumeAfter (resume_after) is how long the owner must be continuously not active
	// before a paused or checkpointed VM resumes.
	ResumeAfter time.Duration
	// CheckpointAfter (checkpoint_after) is how long a VM stays paused before it is
	// checkpointed (or restarted, per Preemption).
	CheckpointAfter time.Duration

	// Preemption (preemption) is the task's preemption mode; on the node, the default for
	// tasks that do not choose.
	Preemption Mode
	// PreemptionModes (preemption_modes) are the modes tasks on this node may choose: an
	// operator whose nodes have no disk to spare for checkpoints leaves out "checkpoint".
	PreemptionModes []Mode
}

// DefaultPolicy returns the default policy; this is the one place its values are set, and
// DefaultConfig spells the same values for the config file.
func DefaultPolicy() Policy {
	return Policy{
		Owner: owner.DefaultThresholds(),
		CPUCapSteps: []CapStep{
			{LoadAbove: 0.1, Percent: 50},
			{LoadAbove: 0.3, Percent: 25},
			{LoadAbove: 0.5, Percent: 10},
		},
		CapWindow:            50 * time.Millisecond,
		CapRecoverAfter:      30 * time.Second,
		MemoryLowWaterMiB:    1024,
		MemoryHighWaterMiB:   2048,
		MemoryRecoverAfter:   time.Minute,
		MemoryFloorMiB:       256,
		MemoryShortfallAfter: 10 * time.Second,
		SuspendAfter:         2 * time.Minute,
		ResumeAfter:          time.Minute,
		CheckpointAfter:      10 * time.Minute,
		Preemption:           ModeCheckpoint,
		PreemptionModes:      []Mode{ModeCheckpoint, ModeSuspend, ModeRestart},
	}
}

// Validate checks the policy; each error names the config key and quotes the value, and all
// of them are joined.
func (p *Policy) Validate() error {
	errs := []error{p.Owner.Validate()}
	for i, s := range p.CPUCapSteps {
		if !(s.LoadAbove >= 0 && s.LoadAbove <= 1) {
			errs = append(errs, fmt.Errorf("cpu_cap_step[%d].load_above must be a load from 0 to 1, got %q", i, formatFloat(s.LoadAbove)))
		} else if i > 0 && !(s.LoadAbove > p.CPUCapSteps[i-1].LoadAbove) {
			errs = append(errs, fmt.Errorf("cpu_cap_step[%d].load_above must be above the step before's (%s), got %q", i, formatFloat(p.CPUCapSteps[i-1].LoadAbove), formatFloat(s.LoadAbove)))
		}
		if s.Percent < 1 || s.Percent > 100 {
			errs = append(errs, fmt.Errorf("cpu_cap_step[%d].percent must be from 1 to 100, got %q", i, strconv.Itoa(s.Percent)))
		} else if i > 0 && s.Percent >= p.CPUCapSteps[i-1].Percent {
			errs = append(errs, fmt.Errorf("cpu_cap_step[%d].percent must be below the step before's (%d), got %q", i, p.CPUCapSteps[i-1].Percent, strconv.Itoa(s.Percent)))
		}
	}
	for _, m := range []struct {
		key string
		val int
	}{
		{"memory_low_water", p.MemoryLowWaterMiB},
		{"memory_high_water", p.MemoryHighWaterMiB},
		{"memory_floor", p.MemoryFloorMiB},
	} {
		if m.val < 0 {
			errs = append(errs, fmt.Errorf("%s must be zero or more MiB, got %q", m.key, strconv.Itoa(m.val)))
		}
	}
	if p.MemoryLowWaterMiB >= 0 && p.MemoryHighWaterMiB < p.MemoryLowWaterMiB {
		errs = append(errs, fmt.Errorf("memory_high_water must be at least memory_low_water (%d), got %q", p.MemoryLowWaterMiB, strconv.Itoa(p.MemoryHighWaterMiB)))
	}
	for _, d := range p.durations() {
		if *d.val < 0 {
			errs = append(errs, fmt.Errorf("%s must be zero or more, got %q", d.key, owner.FormatDuration(*d.val)))
		}
	}
	if !slices.Contains(modes, p.Preemption) {
		errs = append(errs, fmt.Errorf("preemption must be one of %q, got %q", modes, p.Preemption))
	} else if !slices.Contains(p.PreemptionModes, p.Preemption) {
		errs = append(errs, fmt.Errorf("preemption must be one of preemption_modes %q, got %q", p.PreemptionModes, p.Preemption))
	}
	if len(p.PreemptionModes) == 0 {
		errs = append(errs, fmt.Errorf("preemption_modes must name at least one of %q, got none", modes))
	}
	for _, m := range p.PreemptionModes {
		if !slices.Contains(modes, m) {
			errs = append(errs, fmt.Errorf("preemption_modes entries must be among %q, got %q", modes, m))
		}
	}
	return errors.Join(errs...)
}

// ForTask returns the policy for a task that asks for preemption mode mode; an empty mode
// takes the node's default. The mode must be among the node's PreemptionModes.
func (p Policy) ForTask(mode string) (Policy, error) {
	if mode == "" {
		return p, nil
	}
	m := Mode(mode)
	if !slices.Contains(p.PreemptionModes, m) {
		return p, fmt.Errorf("preemption must be one of the node's preemption_modes %q, got %q", p.PreemptionModes, mode)
	}
	p.Preemption = m
	return p, nil
}

// durations lists the policy's own duration keys, for validation and parsing.
func (p *Policy) durations() []durationKey {
	return []durationKey{
		{"cap_window", &p.CapWindow},
		{"cap_recover_after", &p.CapRecoverAfter},
		{"memory_recover_after", &p.MemoryRecoverAfter},
		{"memory_shortfall_after", &p.MemoryShortfallAfter},
		{"suspend_after", &p.SuspendAfter},
		{"resume_after", &p.ResumeAfter},
		{"checkpoint_after", &p.CheckpointAfter},
	}
}

type durationKey struct {
	key string
	val *time.Duration
}

// Config is the yield policy as written in the driver's plugin config: the same keys as
// Policy, with durations as Go duration strings ("30s", "2m", "1h30m") and memory in MiB.
// The driver decodes its "yield" block into it (the codec tags are the keys) and calls
// Policy.
type Config struct {
	// Enabled turns yielding on; off, VMs run at normal priority and the owner is only sensed
	// (for the node's fingerprint and forecast). Policy ignores it.
	Enabled bool `codec:"enabled"`

	// CPUIdleBelow and CPUBusyAbove are loads from 0 to 1, held as text: Nomad hands a
	// plugin config's fractions that float64 cannot hold exactly (0.3) over as strings, and
	// the driver's spec declares them strings so that HCL numbers and strings both arrive.
	CPUIdleBelow      string `codec:"cpu_idle_below"`
	CPUBusyAbove      string `codec:"cpu_busy_above"`
	LoadWindow        string `codec:"load_window"`
	InputActiveWithin string `codec:"input_active_within"`
	AwayAfter         string `codec:"away_after"`
	LockedIsAway      bool   `codec:"locked_is_away"`
	SettleAfter       string `codec:"settle_after"`

	// CPUCapSteps are the cpu_cap_step blocks; none means the default steps.
	CPUCapSteps     []ConfigCapStep `codec:"cpu_cap_step"`
	CapWindow       string          `codec:"cap_window"`
	CapRecoverAfter string          `codec:"cap_recover_after"`

	MemoryLowWater       int    `codec:"memory_low_water"`
	MemoryHighWater      int    `codec:"memory_high_water"`
	MemoryRecoverAfter   string `codec:"memory_recover_after"`
	MemoryFloor          int    `codec:"memory_floor"`
	MemoryShortfallAfter string `codec:"memory_shortfall_after"`

	SuspendAfter    string `codec:"suspend_after"`
	ResumeAfter     string `codec:"resume_after"`
	CheckpointAfter string `codec:"checkpoint_after"`

	Preemption      string   `codec:"preemption"`
	PreemptionModes []string `codec:"preemption_modes"`
}

// ConfigCapStep is a cpu_cap_step block: a CapStep with its load as text (see
// Config.CPUIdleBelow).
type ConfigCapStep struct {
	LoadAbove string `codec:"load_above"`
	Percent   int    `codec:"percent"`
}

// DefaultConfig returns the defaults of DefaultPolicy as config values, for the driver's
// config spec.
func DefaultConfig() Config {
	p := DefaultPolicy()
	c := Config{
		Enabled:              true,
		CPUIdleBelow:         formatFloat(p.Owner.CPUIdleBelow),
		CPUBusyAbove:         formatFloat(p.Owner.CPUBusyAbove),
		LoadWindow:           owner.FormatDuration(p.Owner.LoadWindow),
		InputActiveWithin:    owner.FormatDuration(p.Owner.InputActiveWithin),
		AwayAfter:            owner.FormatDuration(p.Owner.AwayAfter),
		LockedIsAway:         p.Owner.LockedIsAway,
		SettleAfter:          owner.FormatDuration(p.Owner.SettleAfter),
		CapWindow:            owner.FormatDuration(p.CapWindow),
		CapRecoverAfter:      owner.FormatDuration(p.CapRecoverAfter),
		MemoryLowWater:       p.MemoryLowWaterMiB,
		MemoryHighWater:      p.MemoryHighWaterMiB,
		MemoryRecoverAfter:   owner.FormatDuration(p.MemoryRecoverAfter),
		MemoryFloor:          p.MemoryFloorMiB,
		MemoryShortfallAfter: owner.FormatDuration(p.MemoryShortfallAfter),
		SuspendAfter:         owner.FormatDuration(p.SuspendAfter),
		ResumeAfter:          owner.FormatDuration(p.ResumeAfter),
		CheckpointAfter:      owner.FormatDuration(p.CheckpointAfter),
		Preemption:           string(p.Preemption),
	}
	for _, m := range p.PreemptionModes {
		c.PreemptionModes = append(c.PreemptionModes, string(m))
	}
	for _, st := range p.CPUCapSteps {
		c.CPUCapSteps = append(c.CPUCapSteps, ConfigCapStep{LoadAbove: formatFloat(st.LoadAbove), Percent: st.Percent})
	}
	return c
}

// Policy parses and validates the config. Each error names the key and quotes the value, and
// all of them are joined.
func (c Config) Policy() (Policy, error) {
	p := Policy{
		Owner:              owner.Thresholds{LockedIsAway: c.LockedIsAway},
		MemoryLowWaterMiB:  c.MemoryLowWater,
		MemoryHighWaterMiB: c.MemoryHighWater,
		MemoryFloorMiB:     c.MemoryFloor,
		Preemption:         Mode(c.Preemption),
	}
	for _, m := range c.PreemptionModes {
		p.PreemptionModes = append(p.PreemptionModes, Mode(m))
	}
	var errs []error
	load := func(key, val string) float64 {
		f, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s must be a load from 0 to 1, got %q", key, val))
		}
		return f
	}
	p.Owner.CPUIdleBelow = load("cpu_idle_below", c.CPUIdleBelow)
	p.Owner.CPUBusyAbove = load("cpu_busy_above", c.CPUBusyAbove)
	for i, st := range c.CPUCapSteps {
		p.CPUCapSteps = append(p.CPUCapSteps, CapStep{LoadAbove: load(fmt.Sprintf("cpu_cap_step[%d].load_above", i), st.LoadAbove), Percent: st.Percent})
	}
	if len(c.CPUCapSteps) == 0 {
		p.CPUCapSteps = DefaultPolicy().CPUCapSteps
	}
	parse := func(key, val string, dst *time.Duration) {
		d, err := time.ParseDuration(val)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s must be a duration such as \"30s\" or \"2m\", got %q", key, val))
		}
		*dst = d
	}
	parse("load_window", c.LoadWindow, &p.Owner.LoadWindow)
	parse("input_active_within", c.InputActiveWithin, &p.Owner.InputActiveWithin)
	parse("away_after", c.AwayAfter, &p.Owner.AwayAfter)
	parse("settle_after", c.SettleAfter, &p.Owner.SettleAfter)
	vals := map[string]string{
		"cap_window":             c.CapWindow,
		"cap_recover_after":      c.CapRecoverAfter,
		"memory_recover_after":   c.MemoryRecoverAfter,
		"memory_shortfall_after": c.MemoryShortfallAfter,
		"suspend_after":          c.SuspendAfter,
		"resume_after":           c.ResumeAfter,
		"checkpoint_after":       c.CheckpointAfter,
	}
	for _, d := range p.durations() {
		parse(d.key, vals[d.key], d.val)
	}
	if len(errs) > 0 {
		// A duration that did not parse would be reported again, as zero, by Validate.
		return p, errors.Join(errs...)
	}
	return p, p.Validate()
}

func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
