package eval

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/metrics"
	"github.com/deskcloud/deskcloud/predictor/trace"
)

// Result is the outcome of an evaluation.
type Result struct {
	TrainFrom    string  `json:"train_from,omitempty"`
	TrainTo      string  `json:"train_to,omitempty"`
	TestFrom     string  `json:"test_from"`
	TestTo       string  `json:"test_to,omitempty"`
	Every        string  `json:"every"`
	Frozen       bool    `json:"frozen"`
	MinPrecision float64 `json:"min_precision"`
	// TrainDesktops counts desktops seen in the train phase; NewInTest those first seen in
	// the test phase, which start from the pool's prior.
	TrainDesktops int `json:"train_desktops"`
	NewInTest     int `json:"new_in_test"`
	// TrainMoments and TestMoments count harvestable moments counted and scored.
	TrainMoments int64 `json:"train_moments"`
	TestMoments  int64 `json:"test_moments"`
	// DroppedAtSplit counts train moments whose outcome lay in the test period.
	DroppedAtSplit int64 `json:"dropped_at_split"`
	// Unresolved counts test moments never scored because their desktop's rows stopped
	// before their outcome was known.
	Unresolved int64 `json:"unresolved"`
	// FleetContext is whether models were given the fleet's in-use fraction.
	FleetContext bool `json:"fleet_context"`
	// OutsideTrain and OutsideTest count rows read but outside the phase's time window.
	OutsideTrain int64           `json:"outside_train"`
	OutsideTest  int64           `json:"outside_test"`
	Horizons     []HorizonResult `json:"horizons"`
	ExpectedIdle IdleResult      `json:"expected_idle"`
	TrainTrace   trace.Report    `json:"train_trace"`
	TestTrace    trace.Report    `json:"test_trace"`
	TrainSeconds float64         `json:"train_seconds"`
	TestSeconds  float64         `json:"test_seconds"`
	// Pool is the fleet prior the train phase built, frozen since: what a new desktop
	// would start from.
	Pool *predictor.Pool `json:"-"`
}

// HorizonResult scores every method at one horizon.
type HorizonResult struct {
	Horizon string         `json:"horizon"`
	Minutes float64        `json:"minutes"`
	Methods []MethodResult `json:"methods"`
}

// MethodResult scores one method at one horizon.
type MethodResult struct {
	Method string `json:"method"`
	metrics.Summary
	// Reliability is given for the forecast and the hour-of-week baseline.
	Reliability []metrics.ReliabilityBin `json:"reliability,omitempty"`
}

// IdleResult scores the expected idle time left, capped, against what happened.
type IdleResult struct {
	CapMinutes float64 `json:"cap_minutes"`
	N          int64   `json:"n"`
	// MAEMinutes is the forecast's mean absolute error; ConstantMAEMinutes that of always
	// answering the training mean.
	MAEMinutes         float64 `json:"mae_minutes"`
	ConstantMAEMinutes float64 `json:"constant_mae_minutes"`
}

func (e *evaluator) result(cfg Config) *Result {
	date := func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.Format(time.DateOnly)
	}
	res := &Result{
		TrainFrom:      date(cfg.TrainFrom),
		TrainTo:        date(cfg.TrainTo),
		TestFrom:       time.UnixMilli(e.testFrom).UTC().Format(time.DateOnly),
		TestTo:         date(cfg.TestTo),
		Every:          shortDuration(cfg.Every),
		Frozen:         cfg.Frozen,
		MinPrecision:   cfg.MinPrecision,
		TrainDesktops:  e.trainNodes,
		NewInTest:      e.newInTest,
		TrainMoments:   e.trainMoments,
		TestMoments:    e.testMoments,
		DroppedAtSplit: e.droppedSplit,
		Unresolved:     e.unresolvedMoments(),
		FleetContext:   cfg.FleetContext,
		OutsideTrain:   e.outside[phaseTrain],
		OutsideTest:    e.outside[phaseTest],
		ExpectedIdle:   IdleResult{CapMinutes: idleCapMin, N: int64(e.idleCount)},
		Pool:           e.pool,
	}
	if e.idleCount > 0 {
		res.ExpectedIdle.MAEMinutes = e.idleAbs[0] / e.idleCount
		res.ExpectedIdle.ConstantMAEMinutes = e.idleAbs[1] / e.idleCount
	}
	for j, h := range Horizons() {
		hr := HorizonResult{Horizon: shortDuration(h), Minutes: h.Minutes()}
		for k, name := range Methods {
			mr := MethodResult{Method: name, Summary: e.acc[k][j].Summary(cfg.MinPrecision)}
			if k == mForecast || k == mHourOfWeek {
				mr.Reliability = e.acc[k][j].Reliability()
			}
			hr.Methods = append(hr.Methods, mr)
		}
		res.Horizons = append(res.Horizons, hr)
	}
	return res
}

func (e *evaluator) unresolvedMoments() int64 {
	var n int64
	for _, d := range e.list {
		n += int64(len(d.pend) - d.labelHead)
	}
	return n
}

// shortDuration spells 15m rather than 15m0s, and 1h rather than 1h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// Only returns a copy of the result keeping only the given horizons.
func (r *Result) Only(horizons []time.Duration) *Result {
	c := *r
	c.Horizons = nil
	for _, hr := range r.Horizons {
		for _, h := range horizons {
			if hr.Minutes == h.Minutes() {
				c.Horizons = append(c.Horizons, hr)
			}
		}
	}
	return &c
}

// WriteText writes the result as readable tables.
func (r *Result) WriteText(w io.Writer) error {
	var b strings.Builder
	mode := "online (each desktop keeps learning from its own past)"
	if r.Frozen {
		mode = "frozen (nothing learns after the train phase)"
	}
	if r.FleetContext {
		mode += ", with fleet context"
	} else {
		mode += ", own history only"
	}
	fmt.Fprintf(&b, "train %s .. %s, test %s .. %s, %s\n", or(r.TrainFrom, "start"), or(r.TrainTo, r.TestFrom), r.TestFrom, or(r.TestTo, "end"), mode)
	fmt.Fprintf(&b, "scored %s harvestable moments (every %s) on %d desktops, %d of them new in the test period\n",
		thousands(r.TestMoments), r.Every, r.TrainDesktops+r.NewInTest, r.NewInTest)
	fmt.Fprintf(&b, "label: the owner becomes active (an in-use period starts) within (t, t+h]\n\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "horizon\tmethod\tROC-AUC\tPR-AUC\tBrier skill\trecall@P>=%.2g\tmean forecast\tbase rate\t\n", r.MinPrecision)
	for _, hr := range r.Horizons {
		for i, m := range hr.Methods {
			h := ""
			if i == 0 {
				h = hr.Horizon
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", h, m.Method, f3(m.ROCAUC), f3(m.PRAUC), f3(m.BrierSkill),
				f3(m.RecallAtPrecision), f4(m.MeanForecast), f4(m.BaseRate))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.ExpectedIdle.N > 0 {
		fmt.Fprintf(&b, "\nexpected idle left (capped at %.0f min): mean absolute error %.1f min, %.1f min for the training mean\n",
			r.ExpectedIdle.CapMinutes, r.ExpectedIdle.MAEMinutes, r.ExpectedIdle.ConstantMAEMinutes)
	}
	fmt.Fprintf(&b, "wall time: train %.1fs, test %.1fs\n", r.TrainSeconds, r.TestSeconds)
	_, err := io.WriteString(w, b.String())
	return err
}

func or(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}

func f3(x float64) string {
	if math.IsNaN(x) {
		return "-"
	}
	return fmt.Sprintf("%.3f", x)
}

func f4(x float64) string {
	if math.IsNaN(x) {
		return "-"
	}
	return fmt.Sprintf("%.4f", x)
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
