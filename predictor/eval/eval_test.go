package eval

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/internal/synth"
	"github.com/deskcloud/deskcloud/predictor/trace"
	"github.com/deskcloud/deskcloud/predictor/trace/tracetest"
)

var (
	start = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) // a Monday
	split = start.AddDate(0, 0, 7*7)
	end   = start.AddDate(0, 0, 7*10)
)

// fleetFile writes a synthetic fleet of six desktops' events up to until (all of them if
// zero) in the library trace's layout, and returns its path.
func fleetFile(t *testing.T, dir, name string, until time.Time) string {
	t.Helper()
	return fleetFileOf(t, dir, name, until, 6)
}

func fleetFileOf(t *testing.T, dir, name string, until time.Time, desktops int) string {
	t.Helper()
	evs := synth.Fleet(5, "lab", desktops, start, 10)
	if !until.IsZero() {
		var kept []synth.Event
		for _, e := range evs {
			if e.Time.Before(until) {
				kept = append(kept, e)
			}
		}
		evs = kept
	}
	var b bytes.Buffer
	must.NoError(t, synth.WriteLogons(&b, evs, true, true))
	path := filepath.Join(dir, name)
	must.NoError(t, os.WriteFile(path, b.Bytes(), 0o600))
	return path
}

// trainedState runs only the train phase and returns everything it leaves behind for the
// test phase, as bytes: the pool, the baselines' tables and every desktop's model.
func trainedState(t *testing.T, cfg Config) []byte {
	t.Helper()
	must.NoError(t, cfg.validate())
	e := newEvaluator(cfg)
	_, err := e.phase(t.Context(), phaseTrain, cfg.TrainPaths, cfg.TrainFrom, cfg.TrainTo)
	must.NoError(t, err)
	e.endTraining()

	var b bytes.Buffer
	must.NoError(t, json.NewEncoder(&b).Encode(e.pool))
	must.NoError(t, json.NewEncoder(&b).Encode([]any{e.baseP, e.condorP, e.persistP, e.idleMean, e.fleetHow, e.trainMoments}))
	dir := t.TempDir()
	for i, d := range e.list {
		path := filepath.Join(dir, "model")
		must.NoError(t, predictor.WriteModelFile(path, d.model))
		m, err := os.ReadFile(path)
		must.NoError(t, err)
		b.Write(m)
		must.NoError(t, json.NewEncoder(&b).Encode([]any{i, d.how, d.state, d.lastEvent, d.arr}))
	}
	return b.Bytes()
}

// TestNoTestRowReachesTraining is the leakage guard: the train phase must see no row at or
// after the split, and must leave exactly the same state whether or not the files hold
// test-period rows at all.
func TestNoTestRowReachesTraining(t *testing.T) {
	dir := t.TempDir()
	trainOnly := fleetFile(t, dir, "train-only.csv", split)
	everything := fleetFile(t, dir, "everything.csv", time.Time{})

	var seen, late int
	spy := func(rec trace.Record) {
		seen++
		if !rec.Time.Before(split) {
			late++
		}
	}
	cfg := func(path string) Config {
		return Config{TrainPaths: []string{path}, TestPaths: []string{path}, TrainTo: split, TestTo: end,
			FleetContext: true, Group: GroupByPrefix, trainSpy: spy}
	}
	want := trainedState(t, cfg(trainOnly))
	got := trainedState(t, cfg(everything))
	must.Positive(t, seen)
	must.Eq(t, 0, late, must.Sprint("a test-period row reached the train phase"))
	must.True(t, bytes.Equal(want, got), must.Sprint("test-period rows changed what training left behind"))

	// The whole run must leave the pool as training left it.
	res, err := Run(t.Context(), cfg(everything))
	must.NoError(t, err)
	c := cfg(trainOnly)
	must.NoError(t, c.validate())
	frozen := newEvaluator(c)
	_, err = frozen.phase(t.Context(), phaseTrain, []string{trainOnly}, time.Time{}, split)
	must.NoError(t, err)
	must.Eq(t, *frozen.pool, *res.Pool, must.Sprint("the test phase changed the pool"))
	must.Positive(t, res.TestMoments)
}

func TestConfigValidation(t *testing.T) {
	day := func(d int) time.Time { return start.AddDate(0, 0, d) }
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"split by train_to", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TrainTo: day(10)}, true},
		{"split by test_from", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TestFrom: day(10)}, true},
		{"separate files, no dates", Config{TrainPaths: []string{"a"}, TestPaths: []string{"b"}}, true},
		{"same files, no split", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}}, false},
		{"test before training ends", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TrainTo: day(10), TestFrom: day(9)}, false},
		{"empty train period", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TrainFrom: day(10), TrainTo: day(10)}, false},
		{"empty test period", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TrainTo: day(10), TestTo: day(10)}, false},
		{"no train trace", Config{TestPaths: []string{"a"}, TrainTo: day(10)}, false},
		{"odd cadence", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TrainTo: day(10), Every: 90 * time.Second}, false},
		{"bad precision", Config{TrainPaths: []string{"a"}, TestPaths: []string{"a"}, TrainTo: day(10), MinPrecision: 2}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.validate()
			if tc.ok {
				must.NoError(t, err)
				return
			}
			must.Error(t, err)
		})
	}
}

func TestRunOnSyntheticFleet(t *testing.T) {
	path := fleetFile(t, t.TempDir(), "fleet.csv", time.Time{})
	res, err := Run(t.Context(), Config{TrainPaths: []string{path}, TestPaths: []string{path}, TrainTo: split, TestTo: end, FleetContext: true})
	must.NoError(t, err)
	must.Eq(t, 6, res.TrainDesktops)
	must.Eq(t, 0, res.NewInTest)
	must.Positive(t, res.TestMoments)
	must.SliceLen(t, len(predictor.Horizons), res.Horizons)
	for _, hr := range res.Horizons {
		must.SliceLen(t, len(Methods), hr.Methods)
		f, how := hr.Methods[mForecast], hr.Methods[mHourOfWeek]
		t.Logf("%s: forecast auc %.3f skill %.3f, hour-of-week auc %.3f skill %.3f", hr.Horizon, f.ROCAUC, f.BrierSkill, how.ROCAUC, how.BrierSkill)
		must.Greater(t, 0.85, f.ROCAUC, must.Sprintf("%s: forecast auc", hr.Horizon))
		must.Positive(t, f.BrierSkill, must.Sprintf("%s: forecast brier skill", hr.Horizon))
		must.Eq(t, 0.5, hr.Methods[mBaseRate].ROCAUC, must.Sprint("a constant ranks nothing"))
		must.NotNil(t, f.Reliability)
	}

}

func TestRunParallelMatchesSerial(t *testing.T) {
	// Enough desktops that the test phase does split them across goroutines.
	path := fleetFileOf(t, t.TempDir(), "fleet.csv", time.Time{}, 2*minPerWorker+2)
	run := func(workers int) *Result {
		res, err := Run(t.Context(), Config{TrainPaths: []string{path}, TestPaths: []string{path}, TrainTo: split, TestTo: end,
			FleetContext: true, Workers: workers})
		must.NoError(t, err)
		return res
	}
	serial, par := run(1), run(3)
	must.Positive(t, serial.TestMoments)
	must.Eq(t, serial.TestMoments, par.TestMoments)
	for j := range serial.Horizons {
		must.Eq(t, serial.Horizons[j].Methods, par.Horizons[j].Methods)
	}
}

func TestResultOutputs(t *testing.T) {
	path := fleetFile(t, t.TempDir(), "fleet.csv", time.Time{})
	res, err := Run(t.Context(), Config{TrainPaths: []string{path}, TestPaths: []string{path}, TrainTo: split, TestTo: end})
	must.NoError(t, err)

	var text bytes.Buffer
	must.NoError(t, res.Only([]time.Duration{15 * time.Minute}).WriteText(&text))
	must.StrContains(t, text.String(), "15m")
	must.StrNotContains(t, text.String(), " 30m ")
	for _, m := range Methods {
		must.StrContains(t, text.String(), m)
	}

	var svg bytes.Buffer
	must.NoError(t, res.WriteReliabilitySVG(&svg))
	dec := xml.NewDecoder(&svg)
	for {
		_, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		must.NoError(t, err, must.Sprint("the plot must be well-formed XML"))
	}

	b, err := json.Marshal(res)
	must.NoError(t, err)
	var back Result
	must.NoError(t, json.Unmarshal(b, &back))
	must.Eq(t, res.TestMoments, back.TestMoments)
}

func TestRunHonoursCancellation(t *testing.T) {
	path := fleetFile(t, t.TempDir(), "fleet.csv", time.Time{})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := Run(ctx, Config{TrainPaths: []string{path}, TestPaths: []string{path}, TrainTo: split})
	must.True(t, errors.Is(err, context.Canceled), must.Sprintf("want context.Canceled, got %v", err))
}

// TestRunOnLibraryTrace is a short run on the real trace when it is beside the repository:
// a month of training and a fortnight of test, far from the full evaluation in make eval.
func TestRunOnLibraryTrace(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping the library trace in -short mode")
	}
	dir := tracetest.LibraryLogons(t)
	res, err := Run(t.Context(), Config{
		TrainPaths: []string{dir}, TestPaths: []string{dir},
		TrainFrom: time.Date(2015, 9, 1, 0, 0, 0, 0, time.UTC), TrainTo: time.Date(2015, 10, 1, 0, 0, 0, 0, time.UTC),
		TestTo: time.Date(2015, 10, 15, 0, 0, 0, 0, time.UTC), FleetContext: true, Group: GroupByPrefix,
	})
	must.NoError(t, err)
	must.Eq(t, 0, res.TrainTrace.Malformed)
	for _, hr := range res.Horizons {
		f, how := hr.Methods[mForecast], hr.Methods[mHourOfWeek]
		t.Logf("%s: forecast auc %.3f pr %.3f, hour-of-week auc %.3f pr %.3f", hr.Horizon, f.ROCAUC, f.PRAUC, how.ROCAUC, how.PRAUC)
		must.Greater(t, how.ROCAUC, f.ROCAUC, must.Sprintf("%s: the forecast should beat hour of week", hr.Horizon))
		must.Greater(t, how.PRAUC, f.PRAUC, must.Sprintf("%s: the forecast should beat hour of week", hr.Horizon))
	}
}
