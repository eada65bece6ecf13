package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/trace"
)

const simulateUsage = `deskcloud simulate --trace PATH [--from DATE] [--to DATE] [--policy condor,forecast]
       [--lead 10m] [--drain-above P] [--start-below P] [--pool FILE] [--json]

Replays every desktop of a trace through the harvest policies and reports the machine-hours
harvested, owner collisions, preemptions and work lost. Rows before --from (up to --warmup
of them) only teach the desktops' forecast models. Build a pool for --pool with
'deskcloud predict eval ... --save-pool FILE' on earlier data.`

// runSimulate implements `deskcloud simulate`.
func runSimulate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("simulate", simulateUsage)
	var paths listFlag
	fs.Var(&paths, "trace", "trace files or directories (repeat or comma-separate)")
	from := fs.String("from", "", "first day simulated (default: the trace's first)")
	to := fs.String("to", "", "end of the simulation, exclusive (default: the trace's end)")
	warmup := fs.Duration("warmup", 12*7*24*time.Hour, "how much trace before --from teaches the forecast models")
	policies := fs.String("policy", "condor,forecast", "policies to simulate: condor, forecast or both")
	lead := fs.Duration("lead", 10*time.Minute, "forecast policy: drain when the owner is likely back within this")
	drainAbove := fs.Float64("drain-above", 0.06, "forecast policy: drain when P(owner back within lead) reaches this")
	startBelow := fs.Float64("start-below", 0.02, "forecast policy: start only when P(owner back within lead) is below this")
	poolPath := fs.String("pool", "", "fleet prior for the forecast models, from predict eval --save-pool (default: untrained)")
	frozen := fs.Bool("frozen", false, "forecast models do not learn during the simulation")
	asJSON := fs.Bool("json", false, "write the reports as JSON")
	quiet := fs.Bool("quiet", false, "no progress on stderr")
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if len(paths) == 0 {
		return usageError("give --trace")
	}
	opt := harvest.Options{Frozen: *frozen}
	var err error
	if opt.From, err = parseDate(*from); err != nil {
		return usageError("--from: %v", err)
	}
	if opt.To, err = parseDate(*to); err != nil {
		return usageError("--to: %v", err)
	}
	if !opt.To.IsZero() && !opt.From.Before(opt.To) {
		return usageError("--from must be before --to")
	}
	var pols []harvest.Policy
	for _, name := range strings.Split(*policies, ",") {
		switch strings.TrimSpace(name) {
		case "condor":
			pols = append(pols, harvest.NewCondor())
		case "forecast":
			if *lead <= 0 || !(*startBelow > 0 && *startBelow <= *drainAbove && *drainAbove <= 1) {
				return usageError("--lead must be positive and 0 < --start-below <= --drain-above <= 1")
			}
			pols = append(pols, harvest.NewForecast(*lead, *drainAbove, *startBelow))
		default:
			return usageError("--policy: want condor or forecast, got %q", name)
		}
	}
	if *poolPath != "" {
		if opt.Pool, err = predictor.ReadPoolFile(*poolPath); err != nil {
			return err
		}
	}
	log := zerolog.Nop()
	if !*quiet {
		log = zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.TimeOnly}).With().Timestamp().Logger()
	}

	start := time.Now()
	desktops, rep, err := readDesktops(paths, opt.From, opt.To, *warmup)
	if err != nil {
		return err
	}
	log.Info().Int("desktops", len(desktops)).Int("rows", rep.Records).Msg("trace read")
	var reports []harvest.Report
	for _, p := range pols {
		r, err := harvest.Simulate(ctx, p, desktops, opt)
		if err != nil {
			return fmt.Errorf("simulate %s: %w", p.Name(), err)
		}
		log.Info().Str("policy", p.Name()).Msg("simulated")
		reports = append(reports, r)
	}
	elapsed := time.Since(start)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Reports []harvest.Report `json:"reports"`
			Trace   trace.Report     `json:"trace"`
			Seconds float64          `json:"seconds"`
		}{reports, rep, elapsed.Seconds()})
	}
	if err := writeReports(stdout, reports); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wall time %.1fs\n", elapsed.Seconds())
	return rep.WriteText(stdout)
}

// readDesktops reads the trace into each desktop's events, in order of first appearance,
// keeping rows from warmup before from up to to.
func readDesktops(paths []string, from, to time.Time, warmup time.Duration) ([][]harvest.Event, trace.Report, error) {
	r, err := trace.Open(paths, trace.Options{})
	if err != nil {
		return nil, trace.Report{}, err
	}
	defer r.Close()
	index := map[string]int{}
	var desktops [][]harvest.Event
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, r.Report(), err
		}
		if (!from.IsZero() && rec.Time.Before(from.Add(-warmup))) || (!to.IsZero() && !rec.Time.Before(to)) {
			continue
		}
		i, ok := index[rec.Node]
		if !ok {
			i = len(desktops)
			index[rec.Node] = i
			desktops = append(desktops, nil)
		}
		desktops[i] = append(desktops[i], harvest.Event{Time: rec.Time, State: rec.State})
	}
	return desktops, r.Report(), nil
}

func writeReports(w io.Writer, reports []harvest.Report) error {
	var condor float64
	if i := slices.IndexFunc(reports, func(r harvest.Report) bool { return r.Policy == "condor" }); i >= 0 {
		condor = reports[i].MachineHours
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "policy\tmachine-hours\tof condor\tarrivals\tcollisions\tpreemptions\tpower-offs\tdrains\tlost h (checkpoint)\tlost h (none)\t\n")
	for _, r := range reports {
		share := "-"
		if condor > 0 {
			share = fmt.Sprintf("%.1f%%", 100*r.MachineHours/condor)
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%s\t%d\t%d (%.1f%%)\t%d\t%d\t%d\t%.0f\t%.0f\t\n", r.Policy, r.MachineHours, share, r.Arrivals,
			r.Collisions, 100*r.CollisionRate(), r.Preemptions, r.PowerOffs, r.Drains, r.LostHours, r.LostHoursNoCheckpoint)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(reports) > 0 {
		r := reports[0]
		_, err := fmt.Fprintf(w, "%d desktops, %.0f desktop-hours, %.0f with the owner away, %.0f harvestable\n",
			r.Desktops, r.DesktopHours, r.AwayHours, r.HarvestableHours)
		return err
	}
	return nil
}
