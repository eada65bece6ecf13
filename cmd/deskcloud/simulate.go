package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/eval"
	"github.com/deskcloud/deskcloud/predictor/trace"
)

const simulateUsage = `deskcloud simulate --trace PATH [--from DATE] [--to DATE] [--policy condor,forecast]
       [--lead 10m] [--start-below P] [--shrink-above P] [--floor-start-below P] [--drain-above P]
       [--min-floor 15m] [--floor-work F] [--shrink-time 1m] [--pool FILE] [--fleet-context]
       [--json]

Replays every desktop of a trace through the harvest policies and reports the machine-hours
harvested (at full size and at the floor), owner collisions (arrivals while a VM holds the
desktop above its floor), preemptions and work lost. Rows before --from (up to --warmup of
them) only teach the desktops' forecast models. Build a pool for --pool with
'deskcloud predict eval --own-history-only ... --save-pool FILE' on earlier data, or, with
--fleet-context, with 'deskcloud predict eval ... --save-pool FILE' (its default mode).`

// runSimulate implements `deskcloud simulate`.
func runSimulate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("simulate", simulateUsage)
	var paths listFlag
	fs.Var(&paths, "trace", "trace files or directories (repeat or comma-separate)")
	from := fs.String("from", "", "first day simulated (default: the trace's first)")
	to := fs.String("to", "", "end of the simulation, exclusive (default: the trace's end)")
	warmup := fs.Duration("warmup", 12*7*24*time.Hour, "how much trace before --from teaches the forecast models")
	policies := fs.String("policy", "condor,forecast", "policies to simulate: condor, forecast or both")
	def := harvest.DefaultForecast()
	lead := fs.Duration("lead", def.Lead, "forecast policy: how far ahead the desktop must be ready; the thresholds are probabilities of the owner's return within this")
	startBelow := fs.Float64("start-below", def.StartBelow, "forecast policy: start a VM, or grow one at its floor, only when P is below this")
	shrinkAbove := fs.Float64("shrink-above", def.ShrinkAbove, "forecast policy: shrink a running VM to its floor when P reaches this (equal to --drain-above: never, a drain comes first)")
	floorStartBelow := fs.Float64("floor-start-below", def.FloorStartBelow, "forecast policy: start a VM at its floor when P is below this but not below --start-below (equal to --start-below: VMs start at full size only; when not given, --start-below if that is higher)")
	drainAbove := fs.Float64("drain-above", def.DrainAbove, "forecast policy: drain a VM when P reaches this (above 1: never)")
	minFloor := fs.Duration("min-floor", def.MinFloor, "forecast policy: least time a VM stays at its floor before it grows back")
	floorWork := fs.Float64("floor-work", 1, "work credited for an hour at the floor, as a fraction of an hour at full size, 0 to 1")
	shrinkTime := fs.Duration("shrink-time", time.Minute, "how long a VM takes to reach its floor; an owner arriving sooner collides with it")
	poolPath := fs.String("pool", "", "fleet prior for the forecast models, from predict eval --save-pool (default: untrained)")
	arrivalDensity := fs.Float64("arrival-density", def.ArrivalDensity, "forecast policy: the fleet's arrivals per harvestable desktop-hour at which --start-below, --shrink-above and --drain-above hold; they scale with the fleet's density over the year before each day (0: fixed thresholds)")
	frozen := fs.Bool("frozen", false, "forecast models do not learn during the simulation")
	fleetContext := fs.Bool("fleet-context", false, "give the forecast models the fleet context made from the desktops' published forecasts, as predict eval does by default; the pool must be built that way")
	groupBy := fs.String("group-by", "prefix", "with --fleet-context, how desktops form groups: prefix (name without its trailing digits) or none")
	asJSON := fs.Bool("json", false, "write the reports as JSON")
	quiet := fs.Bool("quiet", false, "no progress on stderr")
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if !flagSet(fs, "floor-start-below") {
		*floorStartBelow = max(*floorStartBelow, *startBelow)
	}
	if len(paths) == 0 {
		return usageError("give --trace")
	}
	if !(*floorWork >= 0 && *floorWork <= 1) {
		return usageError("--floor-work must be between 0 and 1, got %v", *floorWork)
	}
	if *shrinkTime <= 0 {
		return usageError("--shrink-time must be positive, got %s", *shrinkTime)
	}
	var group func(node string) string
	switch *groupBy {
	case "prefix":
		group = eval.GroupByPrefix
	case "none":
	default:
		return usageError("--group-by: want prefix or none, got %q", *groupBy)
	}
	opt := harvest.Options{Frozen: *frozen, FloorLoss: 1 - *floorWork, ShrinkTime: *shrinkTime}
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
			f := def
			f.Lead, f.StartBelow, f.ShrinkAbove, f.FloorStartBelow, f.DrainAbove, f.MinFloor, f.ArrivalDensity = *lead, *startBelow, *shrinkAbove, *floorStartBelow, *drainAbove, *minFloor, *arrivalDensity
			if err := f.Validate(flagName); err != nil {
				return usageError("%v", err)
			}
			pols = append(pols, f)
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
	desktops, names, rep, err := readDesktops(paths, opt.From, opt.To, *warmup)
	if err != nil {
		return err
	}
	log.Info().Int("desktops", len(desktops)).Int("rows", rep.Records).Msg("trace read")
	if *fleetContext {
		var groups []string
		if group != nil {
			groups = make([]string, len(names))
			for i, n := range names {
				groups[i] = group(n)
			}
		}
		if opt.Context, err = harvest.NewFleetContext(desktops, groups); err != nil {
			return err
		}
	}
	if *arrivalDensity > 0 {
		// The density is taken over the year before each day, which needs more of the trace
		// than the models' warm-up.
		all, _, _, err := readDesktops(paths, opt.From, opt.To, max(*warmup, harvest.DensityWindow))
		if err != nil {
			return err
		}
		opt.Density = harvest.NewFleetDensity(all)
	}
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
// keeping rows from warmup before from up to to, and returns the desktops' names.
func readDesktops(paths []string, from, to time.Time, warmup time.Duration) ([][]harvest.Event, []string, trace.Report, error) {
	r, err := trace.Open(paths, trace.Options{})
	if err != nil {
		return nil, nil, trace.Report{}, err
	}
	defer r.Close()
	index := map[string]int{}
	var desktops [][]harvest.Event
	var names []string
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, nil, r.Report(), err
		}
		if (!from.IsZero() && rec.Time.Before(from.Add(-warmup))) || (!to.IsZero() && !rec.Time.Before(to)) {
			continue
		}
		i, ok := index[rec.Node]
		if !ok {
			i = len(desktops)
			index[rec.Node] = i
			desktops = append(desktops, nil)
			names = append(names, rec.Node)
		}
		desktops[i] = append(desktops[i], harvest.Event{Time: rec.Time, State: rec.State})
	}
	return desktops, names, r.Report(), nil
}

// flagSet reports whether the named flag was given.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// flagName names a harvest.Forecast field by its flag: start_below is --start-below.
func flagName(key string) string { return "--" + strings.ReplaceAll(key, "_", "-") }

func writeReports(w io.Writer, reports []harvest.Report) error {
	var condor float64
	if i := slices.IndexFunc(reports, func(r harvest.Report) bool { return r.Policy == "condor" }); i >= 0 {
		condor = reports[i].HarvestedHours
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "policy\tharvested h\tof condor\tfull h\tfloor h\tarrivals\tcollisions\tat floor\tpreemptions\tpower-offs\tdrains\tstarts (at floor)\tshrinks\tgrows\tlost h (checkpoint)\tlost h (none)\t\n")
	for _, r := range reports {
		share := "-"
		if condor > 0 {
			share = fmt.Sprintf("%.1f%%", 100*r.HarvestedHours/condor)
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%s\t%.0f\t%.0f\t%d\t%d (%.2f%%)\t%d (%.1f%%)\t%d\t%d\t%d\t%d (%d)\t%d\t%d\t%.0f\t%.0f\t\n",
			r.Policy, r.HarvestedHours, share, r.FullHours, r.FloorHours, r.Arrivals, r.Collisions, 100*r.CollisionRate(),
			r.ArrivalsAtFloor, 100*r.AtFloorRate(), r.Preemptions, r.PowerOffs, r.Drains, r.Starts, r.FloorStarts, r.Shrinks, r.Grows, r.LostHours, r.LostHoursNoCheckpoint)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(reports) > 0 {
		r := reports[0]
		_, err := fmt.Fprintf(w, "%d desktops, %.0f desktop-hours, %.0f with the owner away, %.0f harvestable; harvested h = full h + %.2f × floor h\n",
			r.Desktops, r.DesktopHours, r.AwayHours, r.HarvestableHours, r.FloorWork)
		return err
	}
	return nil
}
