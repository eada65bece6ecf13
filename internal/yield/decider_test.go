package yield

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/shoenig/test/must"
)

// TestDeciderTransitions plays scenarios through a Decider and checks every change of
// target, in order, with its reason.
func TestDeciderTransitions(t *testing.T) {
	cases := []struct {
		name      string
		edit      func(*Policy)
		vm        VMInfo
		noBalloon bool
		play      func(w *world)
		want      []change
		final     Layer
	}{
		{
			name: "owner away: full harvest, nothing changes",
			play: func(w *world) { w.live(time.Hour, away) },
			want: nil, final: LayerIdleClass,
		},
		{
			name: "owner gets busy: the cap drops to the lowest band on the first busy sample",
			play: func(w *world) { w.live(10*time.Minute, away).live(10*time.Second, busy) },
			// With samples a second apart, a 50 ms cap_window follows each sample as it
			// comes; the owner's state still climbs over the 5 s load_window.
			want:  []change{{10 * time.Minute, LayerCPUCap, "owner active: CPU capped at 10%"}},
			final: LayerCPUCap,
		},
		{
			name: "a long cap_window holds the cap off until its load passes the first band; the latest sample sets how far",
			edit: func(p *Policy) { p.CapWindow = 5 * time.Second },
			play: func(w *world) {
				w.live(10*time.Minute, away).live(20*time.Second, busy.with(func(b *behaviour) { b.cpu = 0.35 }))
			},
			// With samples a second apart and a 5 s cap window, the load passes 0.1 on the
			// second sample of 0.35 (and would pass 0.3 only on the tenth).
			want:  []change{{10*time.Minute + time.Second, LayerCPUCap, "owner active: CPU capped at 25%"}},
			final: LayerCPUCap,
		},
		{
			name: "the cap comes back one step per cap_recover_after once the owner is quieter",
			edit: func(p *Policy) { p.CapWindow = 5 * time.Second },
			play: func(w *world) { w.live(time.Minute, away).live(20*time.Second, busy).live(5*time.Minute, reading) },
			want: []change{
				// The 5 s window's load passes 0.1 on the first busy sample, which is
				// in the 10% band.
				{time.Minute, LayerCPUCap, "owner active: CPU capped at 10%"},
				// The owner stops at 1m20s; by 1m22s the load allows more than 10%, and
				// from then the cap rises a step per 30 s. Input is recent until 2m19s and
				// the state settles to idle 30 s later.
				{time.Minute + 52*time.Second, LayerCPUCap, "owner active: CPU cap raised to 25%"},
				{2*time.Minute + 22*time.Second, LayerCPUCap, "owner active: CPU cap raised to 50%"},
				{2*time.Minute + 52*time.Second, LayerIdleClass, "owner idle: CPU uncapped"},
			},
			final: LayerIdleClass,
		},
		{
			name:  "suspend_after of activity pauses",
			play:  func(w *world) { w.live(time.Minute, away).live(3*time.Minute, typing) },
			want:  []change{{3 * time.Minute, LayerPause, "paused: owner active for 2m0s"}},
			final: LayerPause,
		},
		{
			name: "resume_after of no activity resumes",
			play: func(w *world) { w.live(3*time.Minute, typing).live(5*time.Minute, away) },
			want: []change{
				{2 * time.Minute, LayerPause, "paused: owner active for 2m0s"},
				// input ages past input_active_within at 3m59s, the state settles 30 s later,
				// and resume_after runs from there.
				{5*time.Minute + 29*time.Second, LayerIdleClass, "resumed: owner idle for 1m0s"},
			},
			final: LayerIdleClass,
		},
		{
			name: "checkpoint_after paused checkpoints",
			play: func(w *world) { w.live(13*time.Minute, typing) },
			want: []change{
				{2 * time.Minute, LayerPause, "paused: owner active for 2m0s"},
				{12 * time.Minute, LayerCheckpoint, "checkpoint: paused for 10m0s"},
			},
			final: LayerCheckpoint,
		},
		{
			name: "a checkpointed VM resumes when the owner leaves",
			play: func(w *world) { w.live(13*time.Minute, typing).live(5*time.Minute, away) },
			want: []change{
				{2 * time.Minute, LayerPause, "paused: owner active for 2m0s"},
				{12 * time.Minute, LayerCheckpoint, "checkpoint: paused for 10m0s"},
				{15*time.Minute + 29*time.Second, LayerIdleClass, "resumed: owner idle for 1m0s"},
			},
			final: LayerIdleClass,
		},
		{
			name: "a checkpointed VM waits for memory to come back before it resumes",
			play: func(w *world) {
				w.live(13*time.Minute, typing).
					live(10*time.Minute, away.with(func(b *behaviour) { b.free = 5000 })).
					live(time.Minute, away)
			},
			want: []change{
				{2 * time.Minute, LayerPause, "paused: owner active for 2m0s"},
				{12 * time.Minute, LayerCheckpoint, "checkpoint: paused for 10m0s"},
				{23 * time.Minute, LayerIdleClass, "resumed: owner idle for 1m0s"},
			},
			final: LayerIdleClass,
		},
		{
			name: "restart mode stops the VM for good",
			edit: func(p *Policy) { p.Preemption = ModeRestart },
			play: func(w *world) { w.live(13*time.Minute, typing).live(time.Hour, away) },
			want: []change{
				{2 * time.Minute, LayerPause, "paused: owner active for 2m0s"},
				{12 * time.Minute, LayerRestart, "restart: paused for 10m0s"},
			},
			final: LayerRestart,
		},
		{
			name:  "suspend mode stays paused",
			edit:  func(p *Policy) { p.Preemption = ModeSuspend },
			play:  func(w *world) { w.live(2*time.Hour, typing) },
			want:  []change{{2 * time.Minute, LayerPause, "paused: owner active for 2m0s"}},
			final: LayerPause,
		},
		{
			name: "owner short of memory: the balloon hands back the difference",
			play: func(w *world) { w.live(time.Minute, reading.with(func(b *behaviour) { b.free = 4500 })) },
			// 4500 free less the guest's 4096 leaves 404 MiB; the low water is 1024.
			want:  []change{{0, LayerMemory, "owner short of memory: guest shrunk to 3476 MiB"}},
			final: LayerMemory,
		},
		{
			name: "memory goes back to the guest after memory_recover_after above the high water",
			play: func(w *world) {
				w.live(time.Minute, reading.with(func(b *behaviour) { b.free = 4500 })).
					live(3*time.Minute, reading.with(func(b *behaviour) { b.free = 6000 })).
					live(3*time.Minute, away)
			},
			want: []change{
				{0, LayerMemory, "owner short of memory: guest shrunk to 3476 MiB"},
				// 6000 less 3476 leaves 2524 MiB: 476 above the high water, a minute on.
				{2 * time.Minute, LayerMemory, "owner has memory to spare: guest grown to 3952 MiB"},
				// The owner leaves at 4m; memory_recover_after runs afresh from there.
				{5 * time.Minute, LayerIdleClass, "owner has memory to spare: guest grown to 4096 MiB"},
			},
			final: LayerIdleClass,
		},
		{
			name: "ahead of the owner the guest goes to its floor, and grows back once let go",
			play: func(w *world) {
				w.live(time.Minute, away)
				w.d.SetAhead("owner likely back within 10m")
				w.live(2*time.Minute, away)
				w.d.SetAhead("")
				w.live(2*time.Minute, away)
			},
			want: []change{
				// The floor: the guest's 1024 MiB plus memory_floor's 256.
				{time.Minute, LayerMemory, "owner likely back within 10m: guest shrunk to its floor, 1280 MiB"},
				// Plenty free, so memory_recover_after after the let-go it is all back.
				{4 * time.Minute, LayerIdleClass, "owner has memory to spare: guest grown to 4096 MiB"},
			},
			final: LayerIdleClass,
		},
		{
			name: "the balloon stops at the floor, and the shortfall checkpoints",
			play: func(w *world) { w.live(time.Minute, reading.with(func(b *behaviour) { b.free = 1500 })) },
			// The floor is 1024 used + 256; 1500 free less 1280 leaves 220 MiB, 804 short.
			want: []change{
				{0, LayerMemory, "owner short of memory: guest shrunk to 1280 MiB"},
				{10 * time.Second, LayerCheckpoint, "checkpoint: owner short of 804 MiB the guest cannot give back"},
			},
			final: LayerCheckpoint,
		},
		{
			name: "restart mode restarts on a shortfall",
			edit: func(p *Policy) { p.Preemption = ModeRestart },
			play: func(w *world) { w.live(time.Minute, reading.with(func(b *behaviour) { b.free = 1500 })) },
			want: []change{
				{0, LayerMemory, "owner short of memory: guest shrunk to 1280 MiB"},
				{10 * time.Second, LayerRestart, "restart: owner short of 804 MiB the guest cannot give back"},
			},
			final: LayerRestart,
		},
		{
			name: "suspend mode pauses on a shortfall, and stays paused while it lasts",
			edit: func(p *Policy) { p.Preemption = ModeSuspend },
			play: func(w *world) {
				w.live(time.Hour, reading.with(func(b *behaviour) { b.free = 1500 })).live(5*time.Minute, away)
			},
			want: []change{
				{0, LayerMemory, "owner short of memory: guest shrunk to 1280 MiB"},
				{10 * time.Second, LayerPause, "paused: owner short of 804 MiB the guest cannot give back"},
				{time.Hour, LayerMemory, "resumed: owner idle for 1m0s"},
				// memory_recover_after counts from the first sample after the resume.
				{time.Hour + time.Minute + time.Second, LayerIdleClass, "owner has memory to spare: guest grown to 4096 MiB"},
			},
			final: LayerIdleClass,
		},
		{
			name:      "without a balloon any deficit is a shortfall",
			noBalloon: true,
			play:      func(w *world) { w.live(time.Minute, reading.with(func(b *behaviour) { b.free = 4500 })) },
			want:      []change{{10 * time.Second, LayerCheckpoint, "checkpoint: owner short of 620 MiB the guest cannot give back"}},
			final:     LayerCheckpoint,
		},
		{
			name: "a short dip in memory does not checkpoint",
			play: func(w *world) {
				w.live(5*time.Second, reading.with(func(b *behaviour) { b.free = 1500 })).live(time.Minute, reading)
			},
			want:  []change{{0, LayerMemory, "owner short of memory: guest shrunk to 1280 MiB"}},
			final: LayerMemory,
		},
		{
			name: "a guest that needs more gets it back above the floor",
			play: func(w *world) {
				w.live(time.Second, reading.with(func(b *behaviour) { b.free = 3000 })).
					live(time.Second, reading.with(func(b *behaviour) { b.free = 3000; b.guestUsed = 2500 }))
			},
			want: []change{
				// 3000 free less 4096 is 1096 MiB overdrawn: 2120 short of the low water.
				{0, LayerMemory, "owner short of memory: guest shrunk to 1976 MiB"},
				{time.Second, LayerMemory, "guest needs memory: grown to 2756 MiB"},
			},
			final: LayerMemory,
		},
		{
			name: "a locked screen with a quiet CPU is away",
			play: func(w *world) {
				w.live(time.Minute, typing).live(10*time.Minute, reading.with(func(b *behaviour) { b.locked = true }))
			},
			want: nil, final: LayerIdleClass,
		},
		{
			name:  "a VM found paused after a restart counts its pause from the first sample",
			vm:    VMInfo{MemoryMiB: 4096, Layer: LayerPause, CPUCapPercent: 25, BalloonMiB: 3000},
			play:  func(w *world) { w.live(11*time.Minute, typing) },
			want:  []change{{10 * time.Minute, LayerCheckpoint, "checkpoint: paused for 10m0s"}},
			final: LayerCheckpoint,
		},
		{
			name: "a VM found capped carries on from its cap",
			vm:   VMInfo{MemoryMiB: 4096, Layer: LayerCPUCap, CPUCapPercent: 25},
			play: func(w *world) { w.live(2*time.Minute, away) },
			want: []change{
				{30 * time.Second, LayerCPUCap, "owner away: CPU cap raised to 50%"},
				{time.Minute, LayerIdleClass, "owner away: CPU uncapped"},
			},
			final: LayerIdleClass,
		},
		{
			name: "no memory figures: the memory layer stays out of it",
			vm:   VMInfo{CPUCapPercent: 100},
			play: func(w *world) { w.live(time.Minute, reading.with(func(b *behaviour) { b.free = 100 })) },
			want: nil, final: LayerIdleClass,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vm := tc.vm
			if vm == (VMInfo{}) {
				vm = testVM
			}
			w := newWorld(mustValid(t, policy(tc.edit)), vm)
			w.noBalloon = tc.noBalloon
			tc.play(w)
			must.Eq(t, tc.want, w.changes, must.Sprintf("changes: want %v, got %v", tc.want, w.changes))
			must.Eq(t, tc.final, w.last.Layer)
		})
	}
}

// TestDeciderNoFlapping feeds owner signals that swing around a threshold faster than the
// hysteresis and counts how often the target changes in an hour.
func TestDeciderNoFlapping(t *testing.T) {
	cases := []struct {
		name       string
		low, high  behaviour
		period     time.Duration
		maxChanges int
	}{
		{"load around the first cap band, every 2s", reading.with(func(b *behaviour) { b.cpu = 0.05 }), reading.with(func(b *behaviour) { b.cpu = 0.15 }), 2 * time.Second, 1},
		{"load around the first cap band, every 20s", reading.with(func(b *behaviour) { b.cpu = 0.05 }), reading.with(func(b *behaviour) { b.cpu = 0.15 }), 20 * time.Second, 1},
		{"load around the second cap band", reading.with(func(b *behaviour) { b.cpu = 0.25 }), reading.with(func(b *behaviour) { b.cpu = 0.35 }), 6 * time.Second, 2},
		{"memory around the low water", reading.with(func(b *behaviour) { b.free = 5000 }), reading.with(func(b *behaviour) { b.free = 5300 }), 4 * time.Second, 1},
		{"memory between the waters", reading.with(func(b *behaviour) { b.free = 5000 }), reading.with(func(b *behaviour) { b.free = 6500 }), 40 * time.Second, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(DefaultPolicy(), testVM)
			for i := range int(time.Hour / tc.period) {
				b := tc.low
				if i%2 == 1 {
					b = tc.high
				}
				w.live(tc.period, b)
			}
			must.LessEq(t, tc.maxChanges, len(w.changes), must.Sprintf("changes in an hour: %v", w.changes))
		})
	}

	t.Run("owner coming and going every minute pauses at most once per suspend_after", func(t *testing.T) {
		w := newWorld(DefaultPolicy(), testVM)
		for range 60 {
			w.live(30*time.Second, typing).live(30*time.Second, reading)
		}
		pauses := 0
		for _, c := range w.changes {
			if c.layer == LayerPause {
				pauses++
			}
		}
		must.LessEq(t, 1, pauses, must.Sprintf("changes: %v", w.changes))
	})
}

// TestDeciderCapOnset plays the owner's CPU a sample every 25 ms (the driver's cpu_interval)
// under the default policy (cap_window 50 ms) and checks every change of cap. The owner of
// the first cases is one busy process on a 2-core desktop, a load of 0.5: the 25% band.
func TestDeciderCapOnset(t *testing.T) {
	const tick = 25 * time.Millisecond
	const noCPU = -1 // a sample without CPU figures
	rep := func(v float64, n int) []float64 { return slices.Repeat([]float64{v}, n) }
	quiet := rep(0.01, 40) // a second of a quiet host
	cases := []struct {
		name string
		cpu  []float64 // one sample per tick from t0
		want []capChange
	}{
		{
			name: "an owner starting mid-sample: the first full sample sets their band",
			// 0.15: the process ran for the last 7.5 ms of the tick. The load over
			// cap_window is 0.24 after the first full sample, 0.34 a tick later.
			cpu:  slices.Concat(quiet, []float64{0.15}, rep(0.5, 40)),
			want: []capChange{{41, 25}},
		},
		{
			name: "a full load from the owner's first sample: their band at once",
			cpu:  slices.Concat(quiet, rep(0.8, 40)),
			want: []capChange{{40, 10}},
		},
		{
			name: "a tick of a background process caps nothing",
			// One 10 ms /proc tick on 2 cores in 25 ms reads 0.2.
			cpu:  slices.Concat(quiet, []float64{0.2}, quiet, []float64{0.2}, quiet),
			want: nil,
		},
		{
			name: "samples without CPU figures leave the cap where the last CPU sample put it",
			// The load over cap_window is in the 50% band when the cap goes to 25%; more
			// than cap_recover_after of samples without CPU figures must not raise it, nor
			// count their CPU field.
			cpu:  slices.Concat(rep(noCPU, 3), quiet, []float64{0.15, noCPU, 0.5}, rep(noCPU, 1300)),
			want: []capChange{{45, 25}},
		},
		{
			name: "samples straddling a band's edge hold the cap",
			// The load over cap_window stays in the 50% band, every other sample in the
			// 25% band: the cap goes to 25% and stays there.
			cpu:  slices.Concat(quiet, slices.Repeat([]float64{0.15, 0.35}, 2400)),
			want: []capChange{{41, 25}},
		},
		{
			name: "once the owner stops, the cap rises a step per cap_recover_after",
			// The load over cap_window falls under 0.3 on the second quiet sample (tick 82),
			// and cap_recover_after runs from there.
			cpu:  slices.Concat(quiet, rep(0.5, 41), rep(0.01, 2500)),
			want: []capChange{{40, 25}, {82 + 1200, 50}, {82 + 2400, 100}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := NewDecider(DefaultPolicy(), VMInfo{CPUCapPercent: 100})
			var got []capChange
			for i, cpu := range tc.cpu {
				s := owner.Sample{Time: t0.Add(time.Duration(i) * tick), Has: owner.HasCPU | owner.HasMemory, CPU: cpu, MemAvailableMiB: 8000}
				if cpu == noCPU {
					s.Has, s.CPU = owner.HasMemory, 0.9
				}
				if dec := d.Observe(s, Guest{}); dec.Changed {
					got = append(got, capChange{i, dec.CPUCapPercent})
				}
			}
			must.Eq(t, tc.want, got, must.Sprintf("cap changes (tick, percent): want %v, got %v", tc.want, got))
		})
	}
}

// capChange is a change of CPU cap on the sample of index tick.
type capChange struct{ tick, percent int }

// TestBalloonNeverBelowFloor walks the owner's memory, the guest's needs and the owner's
// presence at random for two simulated days and checks the decision for a running VM after
// each minute.
func TestBalloonNeverBelowFloor(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			p := policy(func(p *Policy) { p.Preemption = mode })
			rng := rand.New(rand.NewPCG(42, uint64(len(mode))))
			w := newWorld(p, VMInfo{MemoryMiB: 8192})
			b := reading
			for range 2 * 24 * 60 {
				b.free = max(0, min(16000, b.free+rng.IntN(2001)-1000))
				b.guestUsed = max(0, min(9000, b.guestUsed+rng.IntN(601)-300))
				b.typing = rng.IntN(4) == 0
				b.cpu = rng.Float64()
				w.live(time.Minute, b)
				floor := min(8192, b.guestUsed+p.MemoryFloorMiB)
				if w.last.Layer <= LayerMemory {
					must.GreaterEq(t, floor, w.last.BalloonMiB, must.Sprintf("at %s", w.now.Sub(t0)))
				}
				must.LessEq(t, 8192, w.last.BalloonMiB)
			}
		})
	}
}

func TestDeciderDeterministic(t *testing.T) {
	play := func() []Decision {
		d := NewDecider(DefaultPolicy(), testVM)
		rng := rand.New(rand.NewPCG(7, 7))
		var out []Decision
		now := t0
		for range 20000 {
			now = now.Add(time.Duration(rng.IntN(2000)) * time.Millisecond)
			s := owner.Sample{Time: now, Has: owner.HasCPU | owner.HasMemory | owner.HasInput,
				CPU: rng.Float64(), MemAvailableMiB: rng.IntN(8000), InputIdle: time.Duration(rng.IntN(1200)) * time.Second}
			out = append(out, d.Observe(s, Guest{BalloonMiB: 4096, UsedMiB: 1000}))
		}
		return out
	}
	first, second := play(), play()
	must.True(t, slices.Equal(first, second), must.Sprint("two plays of the same samples decided differently"))
	changes := 0
	for _, d := range first {
		if d.Changed {
			changes++
		}
	}
	must.Greater(t, 4, changes, must.Sprint("the random samples should move the target"))
}

func TestDeciderTimeGoingBack(t *testing.T) {
	d := NewDecider(DefaultPolicy(), testVM)
	s := owner.Sample{Time: t0, Has: owner.HasCPU | owner.HasInput, CPU: 0.9}
	d.Observe(s, Guest{})
	s.Time = t0.Add(-time.Hour)
	dec := d.Observe(s, Guest{})
	must.Eq(t, t0, dec.Time)
	must.Eq(t, LayerCPUCap, dec.Layer)
}

func TestLayerString(t *testing.T) {
	want := []string{"idle-class", "cpu-cap", "memory", "pause", "checkpoint", "restart", "layer(6)"}
	for l, w := range want {
		must.Eq(t, w, Layer(l).String())
	}
}

func TestDecisionBeforeSamples(t *testing.T) {
	fresh := NewDecider(DefaultPolicy(), testVM).Decision()
	must.Eq(t, Decision{Layer: LayerIdleClass, CPUCapPercent: 100, BalloonMiB: 4096, Reason: "harvesting: CPU at idle priority"}, fresh)
	found := NewDecider(DefaultPolicy(), VMInfo{MemoryMiB: 4096, Layer: LayerPause, CPUCapPercent: 10}).Decision()
	must.Eq(t, Decision{Layer: LayerPause, CPUCapPercent: 10, BalloonMiB: 4096, Reason: "recovered: pause"}, found)
}
