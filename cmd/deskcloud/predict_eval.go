package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/eval"
	"github.com/deskcloud/deskcloud/predictor/trace"
)

const predictEvalUsage = `deskcloud predict eval (--data PATH | --train PATH --test PATH) [--train-from DATE] [--train-to DATE]
       [--test-from DATE] [--test-to DATE] [--horizons 1m,5m,15m,30m,60m] [--json] [--plot FILE.svg]

Trains on the train period only and scores the forecast on the test period, side by side
with the persistence, base-rate, hour-of-week and HTCondor (idle >= 15m) baselines. Dates are
YYYY-MM-DD (midnight, in the trace's wall clock) or RFC 3339; every range is [from, to).
With --data both periods read the same files and the split is in time; with --train and
--test they read different files, and the test still may not begin before training ends.`

// runPredictEval implements `deskcloud predict eval`.
func runPredictEval(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("predict eval", predictEvalUsage)
	var data, train, test listFlag
	fs.Var(&data, "data", "trace files or directories for both periods (repeat or comma-separate)")
	fs.Var(&train, "train", "trace files or directories for the train period")
	fs.Var(&test, "test", "trace files or directories for the test period")
	trainFrom := fs.String("train-from", "", "first day of the train period")
	trainTo := fs.String("train-to", "", "end of the train period, exclusive")
	testFrom := fs.String("test-from", "", "first day of the test period (default: --train-to)")
	testTo := fs.String("test-to", "", "end of the test period, exclusive")
	horizons := fs.String("horizons", "1m,5m,15m,30m,60m", "horizons to report, among "+horizonList())
	every := fs.Duration("every", predictor.SampleEvery, "cadence of scored moments")
	minPrecision := fs.Float64("min-precision", eval.DefaultMinPrecision, "precision at which recall is reported")
	groupBy := fs.String("group-by", "prefix", "how desktops form groups for the fleet context: prefix (name without its trailing digits) or none")
	ownOnly := fs.Bool("own-history-only", false, "give models no fleet context, only their own desktop's history")
	frozen := fs.Bool("frozen", false, "stop all learning after the train period (default: desktops keep learning online)")
	asJSON := fs.Bool("json", false, "write the result as JSON")
	plot := fs.String("plot", "", "write a reliability diagram of the forecast to this SVG file")
	savePool := fs.String("save-pool", "", "write the fleet prior built from the train period to this file, for new desktops to start from")
	format := fs.String("format", "auto", "trace format: auto, logons, states or samples")
	window := fs.Duration("reorder-window", trace.DefaultReorderWindow, "how late a row may come and still be put in time order")
	quiet := fs.Bool("quiet", false, "no progress on stderr")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the evaluation to this file")
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}

	cfg := eval.Config{Every: *every, MinPrecision: *minPrecision, Frozen: *frozen, FleetContext: !*ownOnly}
	switch {
	case len(data) > 0 && (len(train) > 0 || len(test) > 0):
		return usageError("give either --data or --train and --test, not both")
	case len(data) > 0:
		cfg.TrainPaths, cfg.TestPaths = data, data
	case len(train) > 0 && len(test) > 0:
		cfg.TrainPaths, cfg.TestPaths = train, test
	default:
		return usageError("give --data, or --train and --test")
	}
	var err error
	for _, d := range []struct {
		flag string
		val  string
		dst  *time.Time
	}{{"train-from", *trainFrom, &cfg.TrainFrom}, {"train-to", *trainTo, &cfg.TrainTo}, {"test-from", *testFrom, &cfg.TestFrom}, {"test-to", *testTo, &cfg.TestTo}} {
		if *d.dst, err = parseDate(d.val); err != nil {
			return usageError("--%s: %v", d.flag, err)
		}
	}
	hs, err := parseHorizons(*horizons)
	if err != nil {
		return usageError("--horizons: %v", err)
	}
	if cfg.Trace.Format, err = trace.ParseFormat(*format); err != nil {
		return usageError("--format: %v", err)
	}
	cfg.Trace.ReorderWindow = *window
	switch *groupBy {
	case "prefix":
		cfg.Group = eval.GroupByPrefix
	case "none":
	default:
		return usageError("--group-by: want prefix or none, got %q", *groupBy)
	}
	cfg.Logger = zerolog.Nop()
	if !*quiet {
		cfg.Logger = zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.TimeOnly}).With().Timestamp().Logger()
	}

	if *cpuProfile != "" {
		stopProfile, err := startCPUProfile(*cpuProfile)
		if err != nil {
			return err
		}
		defer stopProfile()
	}
	res, err := eval.Run(ctx, cfg)
	if err != nil {
		return err
	}
	res = res.Only(hs)
	if *savePool != "" {
		if err := predictor.WritePoolFile(*savePool, res.Pool); err != nil {
			return err
		}
	}
	if *plot != "" {
		if err := writePlot(*plot, res); err != nil {
			return err
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	if err := res.WriteText(stdout); err != nil {
		return err
	}
	for _, r := range []struct {
		name string
		rep  trace.Report
	}{{"train", res.TrainTrace}, {"test", res.TestTrace}} {
		fmt.Fprintf(stdout, "%s ", r.name)
		if err := r.rep.WriteText(stdout); err != nil {
			return err
		}
	}
	return nil
}

func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}

func writePlot(path string, res *eval.Result) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write plot: %w", err)
	}
	if err := res.WriteReliabilitySVG(f); err != nil {
		_ = f.Close()
		return fmt.Errorf("write plot %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write plot %s: %w", path, err)
	}
	return nil
}

// parseDate parses YYYY-MM-DD (as midnight UTC, the wall clock traces are read in) or an
// RFC 3339 time; the empty string is the zero time.
func parseDate(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("want YYYY-MM-DD or RFC 3339, got %q", s)
	}
	return t, nil
}

func horizonList() string {
	var names []string
	for _, h := range predictor.Horizons {
		names = append(names, strings.TrimSuffix(h.String(), "0s"))
	}
	return strings.Join(names, ",")
}

// parseHorizons parses a comma-separated list of durations, each one of predictor.Horizons.
func parseHorizons(s string) ([]time.Duration, error) {
	var out []time.Duration
	for _, f := range strings.Split(s, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("bad duration %q", f)
		}
		if !slices.Contains(predictor.Horizons[:], d) {
			return nil, fmt.Errorf("the model forecasts %s, not %s", horizonList(), f)
		}
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out, nil
}
