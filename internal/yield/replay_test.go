package yield

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/rs/zerolog"
	"github.com/shoenig/test/must"
)

// workday writes a synthetic trace of one owner's day, a sample every 10 s from midnight:
// away overnight with the screen locked; at the desk from 08:30 with a compile at 09:15; a
// coffee break at 10:30; lunch, locked, at 12:00; home at 17:30, leaving a backup running
// that takes memory from 18:00 to 18:10. Memory figures are as they would be with the VM at
// its full size.
func workday(t testing.TB) []byte {
	t.Helper()
	day := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)
	at := func(h, m int) time.Time { return day.Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute) }
	var buf bytes.Buffer
	tw := owner.NewTraceWriter(&buf)
	lastInput := day.Add(-8 * time.Hour)
	for i := range 8640 {
		now := day.Add(time.Duration(i) * 10 * time.Second)
		s := owner.Sample{
			Time:            now,
			Has:             owner.HasCPU | owner.HasMemory | owner.HasInput | owner.HasLocked | owner.HasSession,
			CPU:             0.01,
			MemAvailableMiB: 11000,
			MemTotalMiB:     16384,
			Session:         true,
		}
		atDesk := !now.Before(at(8, 30)) && now.Before(at(17, 30)) &&
			!(!now.Before(at(10, 30)) && now.Before(at(10, 45))) &&
			!(!now.Before(at(12, 0)) && now.Before(at(13, 0)))
		if atDesk {
			lastInput = now.Add(-time.Duration(i%4) * time.Second) // a keystroke every few seconds
			s.CPU = 0.08 + 0.04*float64(i%3)
			s.MemAvailableMiB = 8000
		}
		if !now.Before(at(9, 15)) && now.Before(at(9, 20)) {
			s.CPU = 0.9
		}
		if !now.Before(at(18, 0)) && now.Before(at(18, 10)) {
			s.MemAvailableMiB = 600
		}
		s.Locked = now.Before(at(8, 30)) || (!now.Before(at(12, 0)) && now.Before(at(13, 0))) || !now.Before(at(17, 35))
		s.InputIdle = now.Sub(lastInput)
		must.NoError(t, tw.Write(s))
	}
	must.NoError(t, tw.Flush())
	return buf.Bytes()
}

// vmModel stands for the driver and the host: the balloon reaches its target at once, and
// memory the guest gives up, by balloon or checkpoint, goes to the owner.
type vmModel struct {
	d        *Decider
	vm       VMInfo
	guestMiB int
	changes  []string
}

func newVMModel(vm VMInfo) *vmModel {
	return &vmModel{d: NewDecider(DefaultPolicy(), vm), vm: vm, guestMiB: vm.MemoryMiB}
}

func (m *vmModel) observe(s owner.Sample) {
	s.MemAvailableMiB += m.vm.MemoryMiB - m.guestMiB
	dec := m.d.Observe(s, Guest{BalloonMiB: m.guestMiB, UsedMiB: 1500})
	if dec.Changed {
		m.changes = append(m.changes, fmt.Sprintf("%s %s: %s", dec.Time.Format("15:04:05"), dec.Layer, dec.Reason))
	}
	switch {
	case dec.Layer >= LayerCheckpoint:
		m.guestMiB = 0
	case dec.Layer != LayerPause:
		m.guestMiB = dec.BalloonMiB
	}
}

// TestReplayWorkday replays a day's trace through a Sampler into a Decider, end to end as
// the driver wires them, and checks the day's yields. It then feeds the same trace straight
// to a second Decider, as a simulator would, and expects the very same decisions.
func TestReplayWorkday(t *testing.T) {
	trace := workday(t)
	vm := VMInfo{MemoryMiB: 4096}

	live := newVMModel(vm)
	sampler := owner.NewSampler(zerolog.Nop(), owner.NewReplay(bytes.NewReader(trace), owner.ReplayConfig{}))
	must.NoError(t, sampler.Run(t.Context(), live.observe))

	want := []string{
		// 08:30 at the desk: the load average passes 0.1 on the second sample; active from
		// the first, so paused two minutes on and checkpointed ten minutes after that.
		"08:30:10 cpu-cap: owner active: CPU capped at 50%",
		"08:32:00 pause: paused: owner active for 2m0s",
		"08:42:00 checkpoint: checkpoint: paused for 10m0s",
		// The compile at 09:15 moves nothing: the VM is on disk.
		// Coffee at 10:30: the last keystroke was at 10:29:47, so input is a minute old at
		// 10:30:50, the state settles to idle at 10:31:20 and the VM resumes a minute later,
		// with the cap it had; the owner's load allows it all, and 30 s on it is lifted.
		"10:32:20 cpu-cap: resumed: owner idle for 1m0s",
		"10:33:00 idle-class: owner idle: CPU uncapped",
		"10:45:10 cpu-cap: owner active: CPU capped at 50%",
		"10:47:00 pause: paused: owner active for 2m0s",
		"10:57:00 checkpoint: checkpoint: paused for 10m0s",
		// Lunch: the screen locks at 12:00, so the keystrokes before count for nothing and
		// the owner is away once the state settles at 12:00:30.
		"12:01:30 cpu-cap: resumed: owner idle for 1m0s",
		"12:02:10 idle-class: owner away: CPU uncapped",
		"13:00:10 cpu-cap: owner active: CPU capped at 50%",
		"13:02:00 pause: paused: owner active for 2m0s",
		"13:12:00 checkpoint: checkpoint: paused for 10m0s",
		// Home at 17:30.
		"17:32:20 cpu-cap: resumed: owner idle for 1m0s",
		"17:33:00 idle-class: owner idle: CPU uncapped",
		// The backup leaves the owner 600 MiB, 424 below the low water: the balloon takes
		// that back, and returns it a minute after the backup ends.
		"18:00:00 memory: owner short of memory: guest shrunk to 3672 MiB",
		"18:11:00 idle-class: owner has memory to spare: guest grown to 4096 MiB",
	}
	must.Eq(t, want, live.changes)

	tr, err := owner.NewTraceReader(bytes.NewReader(trace))
	must.NoError(t, err)
	sim := newVMModel(vm)
	for {
		s, err := tr.Next()
		if err != nil {
			break
		}
		sim.observe(s)
	}
	must.Eq(t, live.changes, sim.changes)
}
