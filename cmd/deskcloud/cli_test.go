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
		Reports []struct {
			Policy       string  `json:"policy"`
			MachineHours float64 `json:"machine_hours"`
			AwayHours    float64 `json:"away_hours"`
			Arrivals     int64   `json:"arrivals"`
			Collisions   int64   `json:"collisions"`
		} `json:"reports"`
	}
	must.NoError(t, json.Unmarshal([]byte(out), &res))
	must.SliceLen(t, 2, res.Reports)
	for i, want := range []string{"condor", "forecast"} {
		r := res.Reports[i]
		must.Eq(t, want, r.Policy)
		must.Positive(t, r.MachineHours)
		must.LessEq(t, r.AwayHours, r.MachineHours)
		must.LessEq(t, r.Arrivals, r.Collisions)
	}
	must.Eq(t, res.Reports[0].Arrivals, res.Reports[1].Arrivals, must.Sprint("both policies see the same owners"))

	status, out, errOut = runCLI(t, "simulate", "--quiet", "--trace", path, "--policy", "condor")
	must.Eq(t, 0, status, must.Sprintf("stderr %q", errOut))
	must.StrContains(t, out, "machine-hours")
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
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, _, errOut := runCLI(t, append([]string{"simulate", "--quiet"}, tc.args...)...)
			must.Eq(t, 2, status, must.Sprintf("stderr %q", errOut))
			must.StrContains(t, errOut, tc.wantErr)
		})
	}
}
