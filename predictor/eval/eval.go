package eval

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/trace"
)

// DefaultMinPrecision is the precision at which recall is reported.
const DefaultMinPrecision = 0.5

// Config says what to evaluate on and how.
type Config struct {
	// TrainPaths and TestPaths are trace files or directories; they may be the same.
	TrainPaths, TestPaths []string
	// TrainFrom and TrainTo bound the train phase's rows, [TrainFrom, TrainTo); TestFrom
	// and TestTo the test phase's. A zero bound is open, except that the split needs a
	// point in time: at least one of TrainTo and TestFrom when both phases read the same
	// paths.
	TrainFrom, TrainTo, TestFrom, TestTo time.Time
	// Every is the cadence of scored moments; zero means predictor.SampleEvery.
	Every time.Duration
	// MinPrecision is the precision at which recall is reported; zero means
	// DefaultMinPrecision.
	MinPrecision float64
	// FleetContext gives every model the fleet's in-use fraction (predictor.Context) at
	// each moment; without it, models see only their own desktop's history.
	FleetContext bool
	// Group names a desktop's group (its room, floor or node pool) for the group part of
	// the fleet context; nil puts every desktop in one group. GroupByPrefix suits traces
	// whose desktop names are a room's prefix and a number.
	Group func(node string) string
	// Frozen stops every model and the hour-of-week baseline from learning in the test
	// phase.
	Frozen bool
	// Workers bounds the goroutines of the test phase; zero means GOMAXPROCS. The train
	// phase runs on one, since every desktop learns into the one pool. The result does not
	// depend on it.
	Workers int
	// Trace tunes the trace readers.
	Trace trace.Options
	// Logger receives progress, one line per month of trace read.
	Logger zerolog.Logger

	// trainSpy, when set, sees every record the train phase uses (for the leakage test).
	trainSpy func(trace.Record)
}

func (c *Config) validate() error {
	var errs []error
	if len(c.TrainPaths) == 0 {
		errs = append(errs, errors.New("no train trace given"))
	}
	if len(c.TestPaths) == 0 {
		errs = append(errs, errors.New("no test trace given"))
	}
	if c.TrainTo.IsZero() {
		c.TrainTo = c.TestFrom
	}
	if c.TestFrom.IsZero() {
		c.TestFrom = c.TrainTo
	}
	if c.TestFrom.IsZero() && slices.Equal(c.TrainPaths, c.TestPaths) {
		errs = append(errs, errors.New("train and test read the same trace: give train_to or test_from to split it in time"))
	}
	if !c.TrainTo.IsZero() && c.TestFrom.Before(c.TrainTo) {
		errs = append(errs, fmt.Errorf("test period must not begin before the train period ends: test_from %s is before train_to %s",
			c.TestFrom.Format(time.DateOnly), c.TrainTo.Format(time.DateOnly)))
	}
	if !c.TrainFrom.IsZero() && !c.TrainTo.IsZero() && !c.TrainFrom.Before(c.TrainTo) {
		errs = append(errs, fmt.Errorf("train_from %s must be before train_to %s", c.TrainFrom.Format(time.DateOnly), c.TrainTo.Format(time.DateOnly)))
	}
	if !c.TestTo.IsZero() && !c.TestFrom.IsZero() && !c.TestFrom.Before(c.TestTo) {
		errs = append(errs, fmt.Errorf("test_from %s must be before test_to %s", c.TestFrom.Format(time.DateOnly), c.TestTo.Format(time.DateOnly)))
	}
	if c.Every == 0 {
		c.Every = predictor.SampleEvery
	}
	if c.Every < time.Minute || c.Every%time.Minute != 0 {
		errs = append(errs, fmt.Errorf("cadence must be a whole number of minutes, got %s", c.Every))
	}
	if c.Workers <= 0 {
		c.Workers = runtime.GOMAXPROCS(0)
	}
	if c.MinPrecision == 0 {
		c.MinPrecision = DefaultMinPrecision
	}
	if c.MinPrecision <= 0 || c.MinPrecision > 1 {
		errs = append(errs, fmt.Errorf("min precision must be in (0, 1], got %g", c.MinPrecision))
	}
	return errors.Join(errs...)
}

// Run trains on the train phase's rows and scores on the test phase's.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	start := time.Now()
	e := newEvaluator(cfg)

	trainRep, err := e.phase(ctx, phaseTrain, cfg.TrainPaths, cfg.TrainFrom, cfg.TrainTo)
	if err != nil {
		return nil, fmt.Errorf("train: %w", err)
	}
	e.testFrom = cfg.TestFrom.UnixMilli()
	if cfg.TestFrom.IsZero() {
		// Separate files and no dates: the test begins where the training data ended.
		e.testFrom = e.lastTrain + 1
	}
	e.endTraining()
	trainDone := time.Now()

	testRep, err := e.phase(ctx, phaseTest, cfg.TestPaths, time.UnixMilli(e.testFrom).UTC(), cfg.TestTo)
	if err != nil {
		return nil, fmt.Errorf("test: %w", err)
	}
	res := e.result(cfg)
	res.TrainTrace, res.TestTrace = trainRep, testRep
	res.TrainSeconds = trainDone.Sub(start).Seconds()
	res.TestSeconds = time.Since(trainDone).Seconds()
	return res, nil
}

type phase uint8

const (
	phaseTrain phase = iota
	phaseTest
)

// String names the phase in logs.
func (p phase) String() string {
	if p == phaseTrain {
		return "train"
	}
	return "test"
}

// phase streams one phase's rows through the desktops.
func (e *evaluator) phase(ctx context.Context, ph phase, paths []string, from, to time.Time) (trace.Report, error) {
	r, err := trace.Open(paths, e.cfg.Trace)
	if err != nil {
		return trace.Report{}, err
	}
	defer r.Close()
	e.ph = ph
	fromMs, toMs := int64(minInt64), int64(maxInt64)
	if !from.IsZero() {
		fromMs = from.UnixMilli()
	}
	if !to.IsZero() {
		toMs = to.UnixMilli()
	}
	e.phaseTo = toMs
	if ph == phaseTest {
		e.testFrom = fromMs
		e.testEnd = toMs - e.maxH // last moment whose outcome the test rows can tell
		if toMs == maxInt64 {
			e.testEnd = maxInt64
		}
	}
	log := e.cfg.Logger.With().Str("phase", ph.String()).Logger()
	var month, rows int64
	for n := 0; ; n++ {
		if n&0xfff == 0 {
			if err := ctx.Err(); err != nil {
				return r.Report(), err
			}
		}
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return r.Report(), err
		}
		t := rec.Time.UnixMilli()
		if t < fromMs || t >= toMs {
			e.outside[ph]++
			continue
		}
		if ph == phaseTrain {
			if e.cfg.trainSpy != nil {
				e.cfg.trainSpy(rec)
			}
			e.lastTrain = max(e.lastTrain, t)
		}
		rows++
		if m := monthOf(rec.Time); m != month {
			if month != 0 {
				log.Info().Str("month", rec.Time.Format("2006-01")).Int64("rows", rows).Int("desktops", len(e.desktops)).Msg("reading")
			}
			month = m
		}
		if err := e.record(rec, t); err != nil {
			return r.Report(), err
		}
	}
	log.Info().Int64("rows", rows).Int("desktops", len(e.desktops)).Msg("phase done")
	return r.Report(), nil
}

func monthOf(t time.Time) int64 { return int64(t.Year())*12 + int64(t.Month()) }

const (
	minInt64 = -1 << 63
	maxInt64 = 1<<63 - 1
)

// GroupByPrefix groups desktops by their name without its trailing digits: RIS07 and
// RIS12 are both in RIS.
func GroupByPrefix(node string) string { return strings.TrimRight(node, "0123456789") }

// Horizons returns the horizons scored, as predictor.Horizons.
func Horizons() []time.Duration { return predictor.Horizons[:] }

// Methods names the forecasting methods scored, the model first.
var Methods = []string{"forecast", "persistence", "base-rate", "hour-of-week", "condor"}

const (
	mForecast = iota
	mPersistence
	mBaseRate
	mHourOfWeek
	mCondor
	numMethods
)
