package predictor_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/internal/synth"
)

// benchModel returns a model that has learned 12 weeks of an office desktop, with a fleet
// context, and the time of its last event.
func benchModel(b *testing.B, learn predictor.Learning) (*predictor.Model, time.Time) {
	b.Helper()
	pool := predictor.NewPool()
	m := predictor.NewModel(pool, predictor.LearnFleet)
	m.SetContext(predictor.Context{FleetInUse: 0.3, FleetArrivals: 0.5, GroupInUse: 0.25})
	evs := synth.Office(11, "desk011", monday, 12)
	for _, e := range evs {
		if err := m.Observe(e.Time, e.State); err != nil {
			b.Fatal(err)
		}
	}
	m.SetLearning(learn)
	return m, evs[len(evs)-1].Time
}

// BenchmarkForecast measures one forecast at a new time, features computed afresh: what a
// node pays each time the scheduler asks.
func BenchmarkForecast(b *testing.B) {
	m, at := benchModel(b, predictor.LearnNone)
	b.ReportAllocs()
	for b.Loop() {
		at = at.Add(time.Second) // a new time each call, so nothing is cached
		if _, err := m.Forecast(at); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkObserve measures one state change of an owner coming and going 38 minutes
// apart on average, with the learning those minutes bring (a sample every 5 minutes while
// idle, each learned once its outcome is known).
func BenchmarkObserve(b *testing.B) {
	m, at := benchModel(b, predictor.LearnDesktop)
	states := [...]predictor.State{predictor.InUse, predictor.Available}
	gaps := [...]time.Duration{47 * time.Minute, 23 * time.Minute, 71 * time.Minute, 12 * time.Minute}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		at = at.Add(gaps[i%len(gaps)])
		if err := m.Observe(at, states[i%2]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkSample measures the learning a 5-minute tick brings while the desktop is idle.
func BenchmarkSample(b *testing.B) {
	m, at := benchModel(b, predictor.LearnDesktop)
	at = at.Add(predictor.SampleEvery).Truncate(predictor.SampleEvery)
	must.NoError(b, m.Observe(at, predictor.Available))
	b.ReportAllocs()
	for b.Loop() {
		at = at.Add(predictor.SampleEvery)
		if err := m.Advance(at); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStateSize reports the bytes a model keeps in memory and on disk, and the cost
// of persisting it atomically.
func BenchmarkStateSize(b *testing.B) {
	m, _ := benchModel(b, predictor.LearnDesktop)
	path := filepath.Join(b.TempDir(), "desk.state")
	for b.Loop() {
		if err := predictor.WriteModelFile(path, m); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(predictor.StateSize()), "state-bytes")
}

func TestStateSizeBound(t *testing.T) {
	must.LessEq(t, 1<<20, predictor.StateSize(), must.Sprint("a model's state must stay under 1 MB"))
}
