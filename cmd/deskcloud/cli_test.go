package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
)

// fixture writes a small synthetic trace in the library layout (byte-order mark, CRLF, no
// header): three desktops whose owners come in on weekday mornings and afternoons for six
// weeks from Monday 2024-01-01.
func fixture(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("\uFEFF")
	day0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	row := func(node, state string, at time.Time) {
		fmt.Fprintf(&b, "%s,%s,%s\r\n", node, state, at.Format("2006-01-02 15:04:05.000"))
	}
	for d := range 42 {
		day := day0.AddDate(0, 0, d)
		for i := range 3 {
			node := fmt.Sprintf("PC%02d", i+1)
			row(node, "restarted", day.Add(6*time.Hour+time.Duration(i)*time.Second))
		}
		if day.Weekday() == time.Saturday || day.Weekday() == time.Sunday {
			continue
		}
		// Each change is written for all desktops in turn, and their jitters differ, so
		// rows are up to 40 minutes out of time order: the reader must put them back.
		for _, c := range []struct {
			state string
			at    time.Duration
		}{{"in-use", 8 * time.Hour}, {"available", 11 * time.Hour}, {"in-use", 13 * time.Hour}, {"available", 16 * time.Hour}} {
			for i := range 3 {
				jitter := time.Duration((d*7+i*13)%40) * time.Minute
				row(fmt.Sprintf("PC%02d", i+1), c.state, day.Add(c.at+jitter))
			}
		}
	}
	path := filepath.Join(t.TempDir(), "trace.csv")
	must.NoError(t, os.WriteFile(path, []byte(b.String()), 0o600))
	return path
}

func runCLI(t *testing.T, args ...string) (status int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	status = run(t.Context(), args, &out, &errb)
	return status, out.String(), errb.String()
}

func TestDispatcher(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantStatus int
		wantOut    string
		wantErr    string
	}{
		{"no command", nil, 2, "", "predict"},
		{"help", []string{"help"}, 0, "predict", ""},
		{"-h", []string{"-h"}, 0, "predict", ""},
		{"unknown command", []string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{"group without subcommand", []string{"predict"}, 2, "", "eval"},
		{"unknown subcommand", []string{"predict", "guess"}, 2, "", `unknown command "guess"`},
		{"eval help", []string{"predict", "eval", "-h"}, 0, "--train-from", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, out, errOut := runCLI(t, tc.args...)
			must.Eq(t, tc.wantStatus, status, must.Sprintf("stdout %q, stderr %q", out, errOut))
			must.StrContains(t, out, tc.wantOut)
			must.StrContains(t, errOut, tc.wantErr)
		})
	}
}

func TestPredictEvalUsageErrors(t *testing.T) {
	path := fixture(t)
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no data", nil, "give --data"},
		{"data and train", []string{"--data", path, "--train", path, "--test", path}, "not both"},
		{"train without test", []string{"--train", path}, "give --data"},
		{"bad date", []string{"--data", path, "--train-to", "2024-02"}, "--train-to"},
		{"bad horizon", []string{"--data", path, "--train-to", "2024-02-01", "--horizons", "15m,2h"}, "--horizons"},
		{"unknown flag", []string{"--data", path, "--frobnicate"}, "frobnicate"},
		{"stray argument", []string{"--data", path, "extra"}, "extra"},
		{"bad format", []string{"--data", path, "--train-to", "2024-02-01", "--format", "xml"}, "--format"},
		{"bad group", []string{"--data", path, "--train-to", "2024-02-01", "--group-by", "floor"}, "--group-by"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, _, errOut := runCLI(t, append([]string{"predict", "eval", "--quiet"}, tc.args...)...)
			must.Eq(t, 2, status, must.Sprintf("stderr %q", errOut))
			must.StrContains(t, errOut, tc.wantErr)
		})
	}
}

func TestPredictEvalErrorsAreNotUsage(t *testing.T) {
	// A split the evaluation refuses is an error, exit status 1, not a usage error.
	path := fixture(t)
	status, _, errOut := runCLI(t, "predict", "eval", "--quiet", "--data", path, "--train-to", "2024-02-01", "--test-from", "2024-01-20")
	must.Eq(t, 1, status)
	must.StrContains(t, errOut, "must not begin before")
}

func TestPredictEvalJSONAndPlot(t *testing.T) {
	path := fixture(t)
	dir := t.TempDir()
	plot, pool := filepath.Join(dir, "reliability.svg"), filepath.Join(dir, "pool")
	status, out, errOut := runCLI(t, "predict", "eval", "--quiet", "--data", path,
		"--train-to", "2024-01-29", "--test-to", "2024-02-12", "--horizons", "5m,15m", "--json", "--plot", plot, "--save-pool", pool)
	must.Eq(t, 0, status, must.Sprintf("stderr %q", errOut))
	var res struct {
		TestMoments int64 `json:"test_moments"`
		Horizons    []struct {
			Horizon string `json:"horizon"`
			Methods []struct {
				Method string  `json:"method"`
				ROCAUC float64 `json:"roc_auc"`
			} `json:"methods"`
		} `json:"horizons"`
		TrainTrace struct {
			Reordered int `json:"reordered"`
			Late      int `json:"late"`
		} `json:"train_trace"`
	}
	must.NoError(t, json.Unmarshal([]byte(out), &res))
	must.Positive(t, res.TestMoments)
	must.SliceLen(t, 2, res.Horizons)
	must.Eq(t, "5m", res.Horizons[0].Horizon)
	must.Eq(t, "15m", res.Horizons[1].Horizon)
	must.Eq(t, "forecast", res.Horizons[0].Methods[0].Method)
	must.Positive(t, res.TrainTrace.Reordered, must.Sprint("the fixture's rows are out of order"))
	must.Eq(t, 0, res.TrainTrace.Late)
	svg, err := os.ReadFile(plot)
	must.NoError(t, err)
	must.StrContains(t, string(svg), "<svg")
	_, err = predictor.ReadPoolFile(pool)
	must.NoError(t, err, must.Sprint("the saved pool must load"))
}

func TestPredictEvalText(t *testing.T) {
	path := fixture(t)
	status, out, errOut := runCLI(t, "predict", "eval", "--data", path, "--train-to", "2024-01-29", "--own-history-only")
	must.Eq(t, 0, status, must.Sprintf("stderr %q", errOut))
	for _, want := range []string{"ROC-AUC", "PR-AUC", "Brier skill", "hour-of-week", "condor", "persistence", "base-rate", "own history only", "1h"} {
		must.StrContains(t, out, want)
	}
	must.StrContains(t, errOut, "phase done", must.Sprint("progress goes to stderr"))
}

func TestSimulate(t *testing.T) {
	path := fixture(t)
	status, out, errOut := runCLI(t, "simulate", "--quiet", "--json", "--trace", path, "--from", "2024-01-15")
	must.Eq(t, 0, status, must.Sprintf("stderr %q", errOut))
	var res struct {
		Reports []simulateReport `json:"reports"`
	}
	must.NoError(t, json.Unmarshal([]byte(out), &res))
	must.SliceLen(t, 2, res.Reports)
	for i, want := range []string{"condor", "forecast"} {
		r := res.Reports[i]
		must.Eq(t, want, r.Policy)
		must.Positive(t, r.MachineHours)
		must.LessEq(t, r.AwayHours, r.MachineHours)
		must.InDelta(t, r.FullHours+r.FloorHours, r.MachineHours, 1e-6)
		must.Eq(t, 1, r.FloorWork, must.Sprint("--floor-work defaults to 1"))
		must.InDelta(t, r.MachineHours, r.HarvestedHours, 1e-6)
		must.Eq(t, r.Arrivals, r.Collisions+r.ArrivalsAtFloor+r.ArrivalsVacant)
	}
	must.Eq(t, res.Reports[0].Arrivals, res.Reports[1].Arrivals, must.Sprint("both policies see the same owners"))
	must.Zero(t, res.Reports[0].FloorHours+float64(res.Reports[0].ArrivalsAtFloor), must.Sprint("condor has no floor layer"))

	status, out, errOut = runCLI(t, "simulate", "--quiet", "--trace", path, "--policy", "condor")
	must.Eq(t, 0, status, must.Sprintf("stderr %q", errOut))
	for _, want := range []string{"harvested h", "floor h", "at floor", "shrinks"} {
		must.StrContains(t, out, want)
	}
}

// simulateReport is what the tests read of a report in simulate's JSON.
type simulateReport struct {
	Policy          string  `json:"policy"`
	MachineHours    float64 `json:"machine_hours"`
	FullHours       float64 `json:"full_hours"`
	FloorHours      float64 `json:"floor_hours"`
	FloorWork       float64 `json:"floor_work"`
	HarvestedHours  float64 `json:"harvested_hours"`
	AwayHours       float64 `json:"away_hours"`
	Arrivals        int64   `json:"arrivals"`
	Collisions      int64   `json:"collisions"`
	ArrivalsAtFloor int64   `json:"arrivals_at_floor"`
	ArrivalsVacant  int64   `json:"arrivals_vacant"`
	Starts          int64   `json:"starts"`
	FloorStarts     int64   `json:"floor_starts"`
	Shrinks         int64   `json:"shrinks"`
}

func TestSimulateFloorFlags(t *testing.T) {
	// The forecast policy with its floor layer on and drains off: the floor hours are
	// credited at --floor-work, and --shrink-above equal to --drain-above turns the layer off.
	path := fixture(t)
	simulate := func(args ...string) simulateReport {
		t.Helper()
		status, out, errOut := runCLI(t, append([]string{"simulate", "--quiet", "--json", "--trace", path, "--from", "2024-01-15", "--policy", "forecast"}, args...)...)
		must.Eq(t, 0, status, must.Sprintf("stderr %q", errOut))
		var res struct {
			Reports []simulateReport `json:"reports"`
		}
		must.NoError(t, json.Unmarshal([]byte(out), &res))
		must.SliceLen(t, 1, res.Reports)
		return res.Reports[0]
	}
	layered := simulate("--start-below", "0.05", "--shrink-above", "0.1", "--drain-above", "inf", "--floor-work", "0.25", "--min-floor", "0s")
	must.Eq(t, 0.25, layered.FloorWork)
	must.Positive(t, layered.FloorHours, must.Sprint("the fixture's owners are regular enough for some VMs to shrink"))
	must.InDelta(t, layered.FullHours+0.25*layered.FloorHours, layered.HarvestedHours, 1e-6)
	must.Eq(t, layered.Arrivals, layered.Collisions+layered.ArrivalsAtFloor+layered.ArrivalsVacant)

	off := simulate("--start-below", "0.05", "--shrink-above", "0.1", "--drain-above", "0.1")
	must.Zero(t, off.FloorHours+float64(off.Shrinks+off.ArrivalsAtFloor), must.Sprint("--shrink-above = --drain-above: no floor layer"))

	// Starting VMs at their floor up to a higher P starts more of them, and harvests more.
	full := simulate("--start-below", "0.01", "--floor-start-below", "0.01")
	floorStart := simulate("--start-below", "0.01", "--floor-start-below", "0.1")
	must.Zero(t, full.FloorStarts, must.Sprint("--floor-start-below = --start-below: VMs start at full size only"))
	must.Positive(t, floorStart.FloorStarts)
	must.LessEq(t, floorStart.Starts, floorStart.FloorStarts)
	must.Greater(t, full.MachineHours, floorStart.MachineHours)
	must.Greater(t, full.FloorHours, floorStart.FloorHours)
	must.Eq(t, full.Arrivals, floorStart.Arrivals)

	// With the fleet context made from the desktops' published forecasts.
	ctx := simulate("--fleet-context", "--start-below", "0.01", "--floor-start-below", "0.1")
	must.Positive(t, ctx.MachineHours)
	must.Eq(t, ctx.Arrivals, ctx.Collisions+ctx.ArrivalsAtFloor+ctx.ArrivalsVacant)
	must.Eq(t, full.Arrivals, ctx.Arrivals)
}

func TestSimulateUsageErrors(t *testing.T) {
	path := fixture(t)
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no trace", nil, "give --trace"},
		{"bad policy", []string{"--trace", path, "--policy", "greedy"}, "--policy"},
		{"bad thresholds", []string{"--trace", path, "--drain-above", "0.01", "--start-below", "0.1"}, "--start-below"},
		{"empty period", []string{"--trace", path, "--from", "2024-02-01", "--to", "2024-02-01"}, "--from"},
		{"no lead", []string{"--trace", path, "--lead", "0s"}, "--lead must be positive, got 0s"},
		{"start at 0", []string{"--trace", path, "--start-below", "0"}, "--start-below must be above 0 and at most 1, got 0"},
		{"shrink below start", []string{"--trace", path, "--start-below", "0.05", "--shrink-above", "0.02"}, "--shrink-above must be at least --start-below (0.05), got 0.02"},
		{"drain below shrink", []string{"--trace", path, "--shrink-above", "0.1", "--drain-above", "0.05"}, "--drain-above must be at least --shrink-above (0.1), got 0.05"},
		{"floor start below start", []string{"--trace", path, "--start-below", "0.02", "--floor-start-below", "0.01"}, "--floor-start-below must be at least --start-below (0.02) and at most 1, got 0.01"},
		{"floor start above drain", []string{"--trace", path, "--floor-start-below", "0.2", "--drain-above", "0.1"}, "--floor-start-below must be at most --drain-above (0.1), got 0.2"},
		{"bad group", []string{"--trace", path, "--fleet-context", "--group-by", "room"}, "--group-by: want prefix or none"},
		{"negative min floor", []string{"--trace", path, "--min-floor", "-1m"}, "--min-floor must not be negative, got -1m0s"},
		{"floor work above 1", []string{"--trace", path, "--floor-work", "1.5"}, "--floor-work must be between 0 and 1, got 1.5"},
		{"floor work negative", []string{"--trace", path, "--floor-work", "-0.1"}, "--floor-work must be between 0 and 1, got -0.1"},
		{"floor work NaN", []string{"--trace", path, "--floor-work", "NaN"}, "--floor-work must be between 0 and 1, got NaN"},
		{"no shrink time", []string{"--trace", path, "--shrink-time", "0s"}, "--shrink-time must be positive, got 0s"},
		{"floor flags checked with condor alone", []string{"--trace", path, "--policy", "condor", "--floor-work", "2"}, "--floor-work"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, _, errOut := runCLI(t, append([]string{"simulate", "--quiet"}, tc.args...)...)
			must.Eq(t, 2, status, must.Sprintf("stderr %q", errOut))
			must.StrContains(t, errOut, tc.wantErr)
		})
	}
}
