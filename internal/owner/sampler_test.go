package owner

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/shoenig/test/must"
)

// scripted is a Source that emits what a test sends it and ends when the channel closes.
type scripted struct {
	name string
	in   chan Sample
	err  error
}

func (s *scripted) Name() string { return s.name }

func (s *scripted) Run(ctx context.Context, emit func(Sample)) error {
	if s.err != nil {
		return s.err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case smp, ok := <-s.in:
			if !ok {
				return nil
			}
			emit(smp)
		}
	}
}

func TestSamplerMerge(t *testing.T) {
	proc := &scripted{name: "proc", in: make(chan Sample)}
	input := &scripted{name: "input", in: make(chan Sample)}
	logind := &scripted{name: "logind", in: make(chan Sample)}
	s := NewSampler(zerolog.Nop(), proc, input, logind)
	out := make(chan Sample)
	done := make(chan error, 1)
	go func() { done <- s.Run(t.Context(), func(smp Sample) { out <- smp }) }()

	steps := []struct {
		name string
		src  *scripted
		obs  Sample
		want Sample
	}{
		{"cpu and memory", proc,
			Sample{Time: t0, Has: HasCPU | HasMemory, CPU: 0.2, MemAvailableMiB: 3000, MemTotalMiB: 8000},
			Sample{Time: t0, Has: HasCPU | HasMemory, CPU: 0.2, MemAvailableMiB: 3000, MemTotalMiB: 8000}},
		{"input now", input,
			Sample{Time: t0.Add(time.Second), Has: HasInput},
			Sample{Time: t0.Add(time.Second), Has: HasCPU | HasMemory | HasInput, CPU: 0.2, MemAvailableMiB: 3000, MemTotalMiB: 8000}},
		{"input ages with the next cpu sample", proc,
			Sample{Time: t0.Add(61 * time.Second), Has: HasCPU, CPU: 0.1},
			Sample{Time: t0.Add(61 * time.Second), Has: HasCPU | HasMemory | HasInput, CPU: 0.1, MemAvailableMiB: 3000, MemTotalMiB: 8000, InputIdle: time.Minute}},
		{"logind idle longer: the shorter idle wins", logind,
			Sample{Time: t0.Add(62 * time.Second), Has: HasSession | HasLocked | HasInput, Session: true, InputIdle: 10 * time.Minute},
			Sample{Time: t0.Add(62 * time.Second), Has: HasCPU | HasMemory | HasInput | HasSession | HasLocked, CPU: 0.1, MemAvailableMiB: 3000, MemTotalMiB: 8000, InputIdle: 61 * time.Second, Session: true}},
		{"locked", logind,
			Sample{Time: t0.Add(63 * time.Second), Has: HasSession | HasLocked, Session: true, Locked: true},
			Sample{Time: t0.Add(63 * time.Second), Has: HasCPU | HasMemory | HasInput | HasSession | HasLocked, CPU: 0.1, MemAvailableMiB: 3000, MemTotalMiB: 8000, InputIdle: 62 * time.Second, Session: true, Locked: true}},
		{"a late observation does not turn time back", input,
			Sample{Time: t0.Add(50 * time.Second), Has: HasInput},
			Sample{Time: t0.Add(63 * time.Second), Has: HasCPU | HasMemory | HasInput | HasSession | HasLocked, CPU: 0.1, MemAvailableMiB: 3000, MemTotalMiB: 8000, InputIdle: 13 * time.Second, Session: true, Locked: true}},
		{"unlocked", logind,
			Sample{Time: t0.Add(64 * time.Second), Has: HasSession | HasLocked, Session: true},
			Sample{Time: t0.Add(64 * time.Second), Has: HasCPU | HasMemory | HasInput | HasSession | HasLocked, CPU: 0.1, MemAvailableMiB: 3000, MemTotalMiB: 8000, InputIdle: 14 * time.Second, Session: true}},
	}
	for _, st := range steps {
		st.src.in <- st.obs
		got := <-out
		must.Eq(t, st.want, got, must.Sprint(st.name))
		must.Eq(t, st.want, s.Latest(), must.Sprint(st.name))
	}
	close(proc.in)
	close(input.in)
	close(logind.in)
	must.NoError(t, <-done)
}

// TestSamplerSourceFailures checks that a failing source is logged and the others go on.
func TestSamplerSourceFailures(t *testing.T) {
	var logs bytes.Buffer
	ok := &scripted{name: "ok", in: make(chan Sample, 1)}
	s := NewSampler(zerolog.New(zerolog.SyncWriter(&logs)),
		&scripted{name: "broken", err: errors.New("read stat: boom")},
		&scripted{name: "absent", err: ErrUnavailable},
		ok)
	ok.in <- Sample{Time: t0, Has: HasCPU, CPU: 0.5}
	close(ok.in)
	var got []Sample
	must.NoError(t, s.Run(t.Context(), func(smp Sample) { got = append(got, smp) }))
	must.SliceLen(t, 1, got)
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	must.SliceLen(t, 2, lines)
	must.SliceContainsFunc(t, lines, `{"level":"warn","source":"broken","error":"read stat: boom","message":"owner source stopped"}`, func(a, b string) bool { return a == b })
	must.SliceContainsFunc(t, lines, `{"level":"info","source":"absent","error":"not available on this node","message":"owner source unavailable"}`, func(a, b string) bool { return a == b })
}

func TestFakeClock(t *testing.T) {
	c := NewFakeClock(t0)
	late, early, now := c.After(2*time.Second), c.After(time.Second), c.After(0)
	must.Eq(t, t0, <-now)
	must.Eq(t, 2, c.Waiters())
	c.Advance(1500 * time.Millisecond)
	must.Eq(t, t0.Add(time.Second), <-early)
	must.Eq(t, 1, c.Waiters())
	c.Set(t0) // the past: ignored
	must.Eq(t, t0.Add(1500*time.Millisecond), c.Now())
	c.Advance(time.Second)
	must.Eq(t, t0.Add(2*time.Second), <-late)
	must.Eq(t, 0, c.Waiters())

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	must.ErrorIs(t, c.WaitForWaiters(ctx, 1), context.Canceled)
}
