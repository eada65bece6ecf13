package yield

import (
	"fmt"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
)

var t0 = time.Date(2026, 3, 2, 7, 0, 0, 0, time.UTC)

// behaviour is what the owner does for a while.
type behaviour struct {
	cpu    float64 // owner CPU share of all cores
	typing bool    // input every second
	locked bool
	// free is the memory the owner would have available were the VM to hold none; what
	// they see is free less the guest's memory.
	free int
	// guestUsed is what the guest reports it needs.
	guestUsed int
}

var (
	away    = behaviour{cpu: 0.02, free: 14000, guestUsed: 1024}
	typing  = behaviour{cpu: 0.05, typing: true, free: 12000, guestUsed: 1024}
	busy    = behaviour{cpu: 0.8, typing: true, free: 10000, guestUsed: 1024}
	reading = behaviour{cpu: 0.02, free: 12000, guestUsed: 1024}
)

func (b behaviour) with(edit func(*behaviour)) behaviour {
	edit(&b)
	return b
}

// change is a decision that changed the target, at its offset from t0.
type change struct {
	at     time.Duration
	layer  Layer
	reason string
}

func (c change) String() string { return fmt.Sprintf("%s %s %q", c.at, c.layer, c.reason) }

// world plays an owner and a VM against a Decider, one sample a second. The driver side is
// ideal: the balloon reaches its target at once and the owner's memory follows.
type world struct {
	d         *Decider
	now       time.Time
	lastInput time.Time
	vmMiB     int  // the guest's memory as the balloon reports it; 0 once checkpointed
	noBalloon bool // the VM has no balloon device
	last      Decision
	changes   []change
}

func newWorld(p Policy, vm VMInfo) *world {
	w := &world{d: NewDecider(p, vm), now: t0, lastInput: t0.Add(-24 * time.Hour), vmMiB: vm.MemoryMiB}
	if vm.BalloonMiB > 0 {
		w.vmMiB = vm.BalloonMiB
	}
	if vm.Layer >= LayerCheckpoint {
		w.vmMiB = 0
	}
	return w
}

// live plays b for d, and returns the world for chaining.
func (w *world) live(d time.Duration, b behaviour) *world {
	for end := w.now.Add(d); w.now.Before(end); w.now = w.now.Add(time.Second) {
		w.step(b)
	}
	return w
}

func (w *world) sample(b behaviour) owner.Sample {
	if b.typing {
		w.lastInput = w.now
	}
	return owner.Sample{
		Time:            w.now,
		Has:             owner.HasCPU | owner.HasMemory | owner.HasInput | owner.HasLocked | owner.HasSession,
		CPU:             b.cpu,
		MemAvailableMiB: b.free - w.vmMiB,
		MemTotalMiB:     16384,
		InputIdle:       w.now.Sub(w.lastInput),
		Locked:          b.locked,
		Session:         true,
	}
}

func (w *world) step(b behaviour) {
	g := Guest{BalloonMiB: w.vmMiB, UsedMiB: b.guestUsed}
	if w.noBalloon {
		g.BalloonMiB = 0
	}
	dec := w.d.Observe(w.sample(b), g)
	w.last = dec
	if dec.Changed {
		w.changes = append(w.changes, change{at: w.now.Sub(t0), layer: dec.Layer, reason: dec.Reason})
	}
	switch {
	case dec.Layer >= LayerCheckpoint:
		w.vmMiB = 0
	case dec.Layer == LayerPause:
		// a paused guest's balloon does not move
	case !w.noBalloon:
		w.vmMiB = dec.BalloonMiB
	}
}

func policy(edit func(*Policy)) Policy {
	p := DefaultPolicy()
	if edit != nil {
		edit(&p)
	}
	return p
}

var testVM = VMInfo{MemoryMiB: 4096}

// mustValid fails the test if p does not validate, so a test never runs on a policy the
// driver would refuse.
func mustValid(t *testing.T, p Policy) Policy {
	t.Helper()
	if err := p.Validate(); err != nil {
		t.Fatalf("test policy is invalid: %v", err)
	}
	return p
}
