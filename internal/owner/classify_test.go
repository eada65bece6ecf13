package owner

import (
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

var t0 = time.Date(2026, 3, 2, 9, 0, 0, 0, time.UTC)

func TestThresholdsValidate(t *testing.T) {
	must.NoError(t, DefaultThresholds().Validate())

	cases := []struct {
		name string
		edit func(*Thresholds)
		want []string
	}{
		{"idle below negative", func(th *Thresholds) { th.CPUIdleBelow = -0.1 }, []string{`cpu_idle_below must be a load from 0 to 1, got "-0.1"`}},
		{"busy above one", func(th *Thresholds) { th.CPUBusyAbove = 1.5 }, []string{`cpu_busy_above must be a load from 0 to 1, got "1.5"`}},
		{"busy below idle", func(th *Thresholds) { th.CPUBusyAbove = 0.2 }, []string{`cpu_busy_above must be at least cpu_idle_below (0.3), got "0.2"`}},
		{"negative window", func(th *Thresholds) { th.LoadWindow = -time.Second }, []string{`load_window must be zero or more, got "-1s"`}},
		{"negative settle", func(th *Thresholds) { th.SettleAfter = -time.Minute }, []string{`settle_after must be zero or more, got "-1m"`}},
		{"away before active", func(th *Thresholds) { th.AwayAfter = 30 * time.Second }, []string{`away_after must be at least input_active_within (1m), got "30s"`}},
		{"several at once", func(th *Thresholds) {
			th.CPUIdleBelow = 2
			th.InputActiveWithin = -time.Second
		}, []string{`cpu_idle_below must be a load from 0 to 1, got "2"`, `input_active_within must be zero or more, got "-1s"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			th := DefaultThresholds()
			tc.edit(&th)
			err := th.Validate()
			for _, w := range tc.want {
				must.ErrorContains(t, err, w)
			}
		})
	}
}

// step is one sample fed to a Classifier at an offset from t0, with the state expected after.
type step struct {
	at   time.Duration
	s    Sample
	want State
}

func cpu(f float64) Sample { return Sample{Has: HasCPU, CPU: f} }

func input(cpuFrac float64, idle time.Duration) Sample {
	return Sample{Has: HasCPU | HasInput, CPU: cpuFrac, InputIdle: idle}
}

func TestClassifierTransitions(t *testing.T) {
	th := DefaultThresholds()
	th.LoadWindow = 0 // each sample's CPU as it comes, so the steps read plainly
	cases := []struct {
		name  string
		steps []step
	}{
		{"no input no session is away", []step{{0, cpu(0.05), StateAway}}},
		{"session without input is idle", []step{{0, Sample{Has: HasCPU | HasSession, CPU: 0.05, Session: true}, StateIdle}}},
		{"recent input is active", []step{{0, input(0, 10*time.Second), StateActive}}},
		{"busy cpu is active", []step{{0, input(0.6, time.Hour), StateActive}}},
		{"long idle input and quiet cpu is away", []step{{0, input(0.1, 20*time.Minute), StateAway}}},
		{"long idle input with middling cpu is idle", []step{{0, input(0.4, 20*time.Minute), StateIdle}}},
		{"locked is away at once", []step{{0, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: 2 * time.Minute, Locked: true}, StateAway}}},
		{"input before the lock does not count", []step{
			{0, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: 0}, StateActive},
			{time.Second, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: time.Second, Locked: true}, StateActive},
			{31 * time.Second, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: 31 * time.Second, Locked: true}, StateAway},
		}},
		{"input on the lock screen is active", []step{
			{0, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: time.Hour, Locked: true}, StateAway},
			{time.Minute, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: time.Second, Locked: true}, StateActive},
		}},
		{"a lock seen from the first sample counts from then", []step{
			{0, Sample{Has: HasCPU | HasInput | HasLocked, CPU: 0.1, InputIdle: 10 * time.Second, Locked: true}, StateAway},
		}},
		{"steps up at once", []step{
			{0, input(0, 20*time.Minute), StateAway},
			{time.Second, input(0, 0), StateActive},
		}},
		{"steps down only after settle", []step{
			{0, input(0, 0), StateActive},
			{61 * time.Second, input(0, 61*time.Second), StateActive},
			{90 * time.Second, input(0, 90*time.Second), StateActive},
			{91 * time.Second, input(0, 91*time.Second), StateIdle},
		}},
		{"settle restarts when activity returns", []step{
			{0, input(0, 0), StateActive},
			{70 * time.Second, input(0, 70*time.Second), StateActive},
			{80 * time.Second, input(0, 0), StateActive},
			{110 * time.Second, input(0, 30*time.Second), StateActive},
			{150 * time.Second, input(0, 70*time.Second), StateActive},
			{180 * time.Second, input(0, 100*time.Second), StateIdle},
		}},
		{"busy latch holds between thresholds", []step{
			{0, input(0.6, time.Hour), StateActive},
			{time.Minute, input(0.4, time.Hour), StateActive},
			{10 * time.Minute, input(0.4, time.Hour), StateActive},
			{11 * time.Minute, input(0.2, time.Hour), StateActive},
			{11*time.Minute + 30*time.Second, input(0.2, time.Hour), StateAway},
		}},
		{"samples out of order count as simultaneous", []step{
			{time.Minute, input(0, 0), StateActive},
			{0, input(0, time.Hour), StateActive},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := NewClassifier(th)
			for i, st := range tc.steps {
				st.s.Time = t0.Add(st.at)
				got := c.Observe(st.s)
				must.Eq(t, st.want, got.State, must.Sprintf("step %d at %s: want %s, got %s", i, st.at, st.want, got.State))
			}
		})
	}
}

func TestClassifierLoadAverage(t *testing.T) {
	c := NewClassifier(DefaultThresholds()) // 5 s window
	c.Observe(Sample{Time: t0, Has: HasCPU, CPU: 0})
	// One 100 ms blip at full CPU barely moves the average.
	st := c.Observe(Sample{Time: t0.Add(100 * time.Millisecond), Has: HasCPU, CPU: 1})
	must.Between(t, 0.015, st.Load, 0.025)
	// Full CPU for one window brings it to 1-1/e.
	for i := 2; i <= 51; i++ {
		st = c.Observe(Sample{Time: t0.Add(time.Duration(i) * 100 * time.Millisecond), Has: HasCPU, CPU: 1})
	}
	must.Between(t, 0.62, st.Load, 0.65)
	must.Eq(t, StateActive, st.State)
	// A sample without CPU leaves the load alone.
	st2 := c.Observe(Sample{Time: t0.Add(6 * time.Second), Has: HasInput, InputIdle: time.Hour})
	must.Eq(t, st.Load, st2.Load)
}

// TestClassifierNoFlapping feeds a CPU signal that swings around each threshold every few
// seconds for an hour, and counts state changes: hysteresis must hold the state still.
func TestClassifierNoFlapping(t *testing.T) {
	cases := []struct {
		name     string
		low, hi  float64
		maxFlips int
	}{
		{"around busy threshold", 0.45, 0.55, 1},
		{"around idle threshold", 0.25, 0.35, 1},
		{"across both", 0.2, 0.6, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := NewClassifier(DefaultThresholds())
			flips, prev := 0, StateUnknown
			for i := range 36000 { // an hour at 100 ms
				f := tc.low
				if (i/30)%2 == 1 { // switch every 3 s
					f = tc.hi
				}
				st := c.Observe(Sample{Time: t0.Add(time.Duration(i) * 100 * time.Millisecond), Has: HasCPU | HasInput, CPU: f, InputIdle: time.Hour})
				if prev != StateUnknown && st.State != prev {
					flips++
				}
				prev = st.State
			}
			must.LessEq(t, tc.maxFlips, flips, must.Sprintf("state changed %d times in an hour", flips))
		})
	}
}

func TestFormatDuration(t *testing.T) {
	cases := map[time.Duration]string{
		0:                                 "0s",
		100 * time.Millisecond:            "100ms",
		30 * time.Second:                  "30s",
		15 * time.Minute:                  "15m",
		90 * time.Second:                  "1m30s",
		time.Hour:                         "1h",
		time.Hour + 30*time.Minute:        "1h30m",
		time.Hour + 30*time.Second:        "1h0m30s",
		-time.Minute:                      "-1m",
		10*time.Hour + 10*time.Minute:     "10h10m",
		2*time.Hour + 20*time.Millisecond: "2h0m0.02s",
	}
	for d, want := range cases {
		t.Run(want, func(t *testing.T) {
			got := FormatDuration(d)
			must.Eq(t, want, got)
			back, err := time.ParseDuration(got)
			must.NoError(t, err)
			must.Eq(t, d, back)
		})
	}
}

func TestAverage(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	a := Average{Window: time.Second}
	must.Eq(t, 0.5, a.Observe(t0, 0.5)) // the first observation sets it
	got := a.Observe(t0.Add(time.Second), 1.5)
	must.Between(t, 0.5+0.632, got, 0.5+0.633)                    // one window: 1 - 1/e of the way
	must.Eq(t, got, a.Observe(t0.Add(500*time.Millisecond), 100)) // late: nothing changes
	must.Eq(t, got, a.Observe(t0.Add(time.Second), 100))          // simultaneous: nothing changes

	instant := Average{}
	instant.Observe(t0, 0.2)
	must.Eq(t, 0.9, instant.Observe(t0.Add(time.Millisecond), 0.9)) // no window: each value as it comes
}
