package harvest

import (
	"errors"
	"io"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/predictor/eval"
	"github.com/deskcloud/deskcloud/predictor/trace"
	"github.com/deskcloud/deskcloud/predictor/trace/tracetest"
)

// benchPolicies are the policies the benchmarks time: HTCondor's and the default forecast
// policy, with its floor layer.
func benchPolicies() []namedPolicy {
	return []namedPolicy{{"condor", NewCondor()}, {"forecast", DefaultForecast()}}
}

// BenchmarkSimulateSynthetic simulates 10,000 synthetic desktops for four weeks, one
// simulation per iteration.
func BenchmarkSimulateSynthetic(b *testing.B) {
	desktops := fleet(10000, 4)
	for _, np := range benchPolicies() {
		b.Run(np.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := Simulate(b.Context(), np.p, desktops, Options{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSimulateLibraryYear simulates every desktop of the library trace over its test
// year, 2015-11 to 2016-11, after 12 weeks of warm-up; it is skipped when the trace is not
// beside the repository. Reading the trace is not timed; with the fleet context, working
// it out is.
func BenchmarkSimulateLibraryYear(b *testing.B) {
	dir := tracetest.LibraryLogons(b)
	from := time.Date(2015, 11, 1, 0, 0, 0, 0, time.UTC)
	to := from.AddDate(1, 0, 0)
	r, err := trace.Open([]string{dir}, trace.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	index := map[string]int{}
	var desktops [][]Event
	var groups []string
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
		if rec.Time.Before(from.AddDate(0, 0, -84)) || !rec.Time.Before(to) {
			continue
		}
		i, ok := index[rec.Node]
		if !ok {
			i = len(desktops)
			index[rec.Node] = i
			desktops = append(desktops, nil)
			groups = append(groups, eval.GroupByPrefix(rec.Node))
		}
		desktops[i] = append(desktops[i], Event{Time: rec.Time, State: rec.State})
	}
	for _, np := range benchPolicies() {
		b.Run(np.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := Simulate(b.Context(), np.p, desktops, Options{From: from, To: to}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("forecast-fleet-context", func(b *testing.B) {
		for b.Loop() {
			c, err := NewFleetContext(desktops, groups)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := Simulate(b.Context(), DefaultForecast(), desktops, Options{From: from, To: to, Context: c}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
