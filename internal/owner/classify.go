package owner

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
)

// State is how present and busy the owner is.
type State uint8

const (
	// StateUnknown is the state before the first sample.
	StateUnknown State = iota
	// StateAway means nobody is at the desktop: no input for a long while, or the screen is
	// locked, and the owner's CPU is quiet.
	StateAway
	// StateIdle means the owner may be at the desktop but is not using it hard: reading, or
	// a light background load.
	StateIdle
	// StateActive means the owner is typing or pointing, or their programs keep the CPU busy.
	StateActive
)

// String returns "away", "idle", "active" or "unknown".
func (s State) String() string {
	switch s {
	case StateAway:
		return "away"
	case StateIdle:
		return "idle"
	case StateActive:
		return "active"
	}
	return "unknown"
}

// Thresholds are the settings of a Classifier. The defaults follow HTCondor's desktop
// policy, whose owners have lived with them for decades: an owner load below 0.3 is idle,
// above 0.5 busy, and 15 minutes without keyboard or mouse is away.
//
// Owner load here is the owner's CPU share of all cores (Sample.CPU) averaged exponentially
// over LoadWindow. It stands for the run queue per core that HTCondor compares: the kernel's
// run queue and load average also count the VMs' threads, which no cheap reading can take
// out, while SCHED_IDLE VMs never delay the owner's threads, so the owner's own CPU share is
// the part of the queue that is theirs.
type Thresholds struct {
	// CPUIdleBelow (cpu_idle_below): an owner load below this is idle, and it ends a busy
	// spell.
	CPUIdleBelow float64
	// CPUBusyAbove (cpu_busy_above): an owner load above this makes the owner active until
	// the load falls below CPUIdleBelow.
	CPUBusyAbove float64
	// LoadWindow (load_window): the time constant of the owner load average. Short enough to
	// act within seconds of the owner starting work, long enough that a menu opening is not a
	// busy spell. Zero uses each sample as it comes.
	LoadWindow time.Duration
	// InputActiveWithin (input_active_within): input more recent than this makes the owner
	// active.
	InputActiveWithin time.Duration
	// AwayAfter (away_after): this long without input, with a quiet CPU, and the owner is
	// away.
	AwayAfter time.Duration
	// LockedIsAway (locked_is_away): a locked screen counts as away at once, whatever the
	// input idle time, as long as the CPU is quiet.
	LockedIsAway bool
	// SettleAfter (settle_after): how long the owner must look less busy than their state
	// before it steps down (active to idle, idle to away). Stepping up is immediate.
	SettleAfter time.Duration
}

// DefaultThresholds returns the default Thresholds; this is the one place they are set.
func DefaultThresholds() Thresholds {
	return Thresholds{
		CPUIdleBelow:      0.3,
		CPUBusyAbove:      0.5,
		LoadWindow:        5 * time.Second,
		InputActiveWithin: time.Minute,
		AwayAfter:         15 * time.Minute,
		LockedIsAway:      true,
		SettleAfter:       30 * time.Second,
	}
}

// Validate checks the thresholds; each error names the config key and quotes the value.
func (th Thresholds) Validate() error {
	var errs []error
	if !(th.CPUIdleBelow >= 0 && th.CPUIdleBelow <= 1) {
		errs = append(errs, fmt.Errorf("cpu_idle_below must be a load from 0 to 1, got %q", formatFloat(th.CPUIdleBelow)))
	}
	if !(th.CPUBusyAbove >= 0 && th.CPUBusyAbove <= 1) {
		errs = append(errs, fmt.Errorf("cpu_busy_above must be a load from 0 to 1, got %q", formatFloat(th.CPUBusyAbove)))
	} else if th.CPUBusyAbove < th.CPUIdleBelow {
		errs = append(errs, fmt.Errorf("cpu_busy_above must be at least cpu_idle_below (%s), got %q", formatFloat(th.CPUIdleBelow), formatFloat(th.CPUBusyAbove)))
	}
	for _, d := range []struct {
		key string
		val time.Duration
	}{
		{"load_window", th.LoadWindow},
		{"input_active_within", th.InputActiveWithin},
		{"away_after", th.AwayAfter},
		{"settle_after", th.SettleAfter},
	} {
		if d.val < 0 {
			errs = append(errs, fmt.Errorf("%s must be zero or more, got %q", d.key, FormatDuration(d.val)))
		}
	}
	if th.InputActiveWithin >= 0 && th.AwayAfter < th.InputActiveWithin {
		errs = append(errs, fmt.Errorf("away_after must be at least input_active_within (%s), got %q", FormatDuration(th.InputActiveWithin), FormatDuration(th.AwayAfter)))
	}
	return errors.Join(errs...)
}

// Status is a Classifier's view of the owner after a sample.
type Status struct {
	// State is the owner's state.
	State State
	// Since is when the owner entered State.
	Since time.Time
	// Load is the owner load average the state was judged on.
	Load float64
}

// Classifier turns samples into an owner state with hysteresis, so a signal that hovers
// around a threshold does not make the state flap:
//
//   - the CPU turns busy above CPUBusyAbove and stays busy until the load falls below
//     CPUIdleBelow;
//   - the state steps up (away → idle → active) on the sample that shows it, and steps down
//     only after SettleAfter of samples that all show less.
//
// The owner is active when the CPU is busy or input is more recent than InputActiveWithin;
// away when the CPU is below CPUIdleBelow and input is older than AwayAfter (or the screen
// is locked, if LockedIsAway); idle otherwise. Input from before the screen locked does not
// count: it was the owner locking it. Input since does: they are typing their password. When no source reports input, a logged-in
// session is taken as idle (someone may be reading) and no session as away (a server, or a
// desktop nobody is logged in to).
//
// A Classifier is deterministic: time comes from the samples. It is not safe for concurrent
// use.
type Classifier struct {
	th Thresholds

	status   Status
	now      time.Time // time of the last sample
	load     Average   // the owner load, over LoadWindow
	busy     bool      // the CPU busy latch
	calmFrom time.Time // since when every sample has shown less than status.State; zero if not
	// lockedFrom is when the screen was first seen locked; zero while unlocked. Input from
	// before it is the owner locking up, not a sign they are there.
	lockedFrom time.Time
}

// NewClassifier returns a Classifier; th should have passed Validate.
func NewClassifier(th Thresholds) *Classifier {
	return &Classifier{th: th, load: Average{Window: th.LoadWindow}}
}

// Status returns the classification after the last sample.
func (c *Classifier) Status() Status { return c.status }

// Observe folds s into the classification and returns it. Samples should come in time
// order; one from before the previous sample counts as simultaneous with it.
func (c *Classifier) Observe(s Sample) Status {
	t := s.Time
	if t.Before(c.now) {
		t = c.now
	}
	c.now = t
	c.observeLoad(t, s)
	switch {
	case s.Has&HasLocked == 0:
	case !s.Locked:
		c.lockedFrom = time.Time{}
	case c.lockedFrom.IsZero():
		c.lockedFrom = t
	}
	raw := c.raw(t, s)
	switch {
	case c.status.State == StateUnknown || raw > c.status.State:
		c.status.State, c.status.Since = raw, t
		c.calmFrom = time.Time{}
	case raw == c.status.State:
		c.calmFrom = time.Time{}
	default:
		if c.calmFrom.IsZero() {
			c.calmFrom = t
		}
		if t.Sub(c.calmFrom) >= c.th.SettleAfter {
			c.status.State, c.status.Since = raw, t
			c.calmFrom = time.Time{}
		}
	}
	c.status.Load = c.load.Value
	return c.status
}

// observeLoad folds the sample's CPU into the load average and updates the busy latch.
func (c *Classifier) observeLoad(t time.Time, s Sample) {
	if s.Has&HasCPU == 0 {
		return
	}
	load := c.load.Observe(t, s.CPU)
	switch {
	case load > c.th.CPUBusyAbove:
		c.busy = true
	case load < c.th.CPUIdleBelow:
		c.busy = false
	}
}

// raw is the state the sample at t alone shows, before the settle time.
func (c *Classifier) raw(t time.Time, s Sample) State {
	var inputRecent, inputAway bool
	switch {
	case s.Has&HasInput != 0:
		inputRecent = s.InputIdle < c.th.InputActiveWithin &&
			(c.lockedFrom.IsZero() || t.Add(-s.InputIdle).After(c.lockedFrom))
		inputAway = s.InputIdle >= c.th.AwayAfter
	case s.Has&HasSession != 0 && s.Session:
		// Someone is logged in but nothing tells of input: present, maybe reading.
	default:
		inputAway = true
	}
	if c.th.LockedIsAway && s.Has&HasLocked != 0 && s.Locked {
		inputAway = true
	}
	switch {
	case c.busy || inputRecent:
		return StateActive
	case inputAway && c.load.Value < c.th.CPUIdleBelow:
		return StateAway
	}
	return StateIdle
}

// FormatDuration formats d the way config values are written: "15m" rather than "15m0s".
func FormatDuration(d time.Duration) string {
	s := d.String()
	if len(s) > 2 && s[len(s)-2:] == "0s" && (s[len(s)-3] == 'm' || s[len(s)-3] == 'h') {
		s = s[:len(s)-2]
	}
	if len(s) > 2 && s[len(s)-2:] == "0m" && s[len(s)-3] == 'h' {
		s = s[:len(s)-2]
	}
	return s
}

func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// Average is an exponentially weighted average of a value observed at irregular times: each
// observation moves it by 1 - exp(-dt/Window) of the way. The first observation, or any with
// Window zero, sets it outright. Observations must come in time order; a late one counts as
// simultaneous with the one before and changes nothing. The zero value with a Window is
// ready to use.
type Average struct {
	Window time.Duration
	// Value is the average so far; zero before the first observation.
	Value float64
	at    time.Time
	seen  bool
}

// Observe folds in v observed at t and returns the new average.
func (a *Average) Observe(t time.Time, v float64) float64 {
	switch {
	case !a.seen || a.Window <= 0:
		a.Value = v
	default:
		if dt := t.Sub(a.at); dt > 0 {
			a.Value += (1 - math.Exp(-float64(dt)/float64(a.Window))) * (v - a.Value)
		}
	}
	if !a.seen || t.After(a.at) {
		a.at = t
	}
	a.seen = true
	return a.Value
}
