package metrics

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/shoenig/test/must"
)

// The hand-worked case: six forecasts with two ties.
//
//	score  0.9  0.8  0.8  0.7  0.6  0.6
//	label   1    1    0    0    1    0
//
// ROC-AUC: of the 9 positive-negative pairs, the 0.9 positive wins 3, the 0.8 positive
// wins 2 and ties 1, the 0.6 positive ties 1: (3 + 2.5 + 0.5) / 9 = 2/3.
//
// Average precision, threshold by threshold from the top: 0.9 gives recall 1/3 at
// precision 1; 0.8 adds recall 1/3 at precision 2/3; 0.7 adds no recall; 0.6 adds 1/3 at
// precision 1/2: 1/3 + 2/9 + 1/6 = 13/18.
//
// Brier: (0.01 + 0.04 + 0.64 + 0.49 + 0.16 + 0.36) / 6 = 1.7/6; base rate 1/2, so the
// reference is 1/4 and the skill is 1 - (1.7/6)/(1/4) = -2/15.
var (
	handScores = []float64{0.9, 0.8, 0.8, 0.7, 0.6, 0.6}
	handLabels = []bool{true, true, false, false, true, false}
)

func TestROCAUC(t *testing.T) {
	tests := []struct {
		name   string
		scores []float64
		labels []bool
		want   float64
	}{
		{"hand-worked with ties", handScores, handLabels, 2.0 / 3},
		{"perfect", []float64{0.9, 0.8, 0.2, 0.1}, []bool{true, true, false, false}, 1},
		{"inverted", []float64{0.1, 0.2, 0.8, 0.9}, []bool{true, true, false, false}, 0},
		{"all tied", []float64{0.5, 0.5, 0.5, 0.5}, []bool{true, false, false, true}, 0.5},
		{"one tie between classes", []float64{0.7, 0.7, 0.1}, []bool{true, false, false}, 0.75},
		{"order of input does not matter", []float64{0.6, 0.8, 0.6, 0.9, 0.7, 0.8}, []bool{true, false, false, true, false, true}, 2.0 / 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.InDelta(t, tc.want, ROCAUC(tc.scores, tc.labels), 1e-12)
		})
	}
}

func TestROCAUCNeedsBothClasses(t *testing.T) {
	must.True(t, math.IsNaN(ROCAUC([]float64{0.1, 0.2}, []bool{true, true})))
	must.True(t, math.IsNaN(AveragePrecision([]float64{0.1, 0.2}, []bool{false, false})))
}

func TestAveragePrecision(t *testing.T) {
	tests := []struct {
		name   string
		scores []float64
		labels []bool
		want   float64
	}{
		{"hand-worked with ties", handScores, handLabels, 13.0 / 18},
		{"perfect", []float64{0.9, 0.8, 0.2}, []bool{true, true, false}, 1},
		// Ranked last: recall comes only at the bottom, at precision 1/3.
		{"worst", []float64{0.9, 0.8, 0.2}, []bool{false, false, true}, 1.0 / 3},
		// One threshold holds everything: precision is the base rate.
		{"all tied", []float64{0.3, 0.3, 0.3, 0.3}, []bool{true, false, false, false}, 0.25},
		// 1 at precision 1, then the second at precision 2/3: (1 + 2/3) / 2.
		{"one miss between", []float64{0.9, 0.5, 0.4}, []bool{true, false, true}, 5.0 / 6},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.InDelta(t, tc.want, AveragePrecision(tc.scores, tc.labels), 1e-12)
		})
	}
}

func TestRecallAtPrecision(t *testing.T) {
	tests := []struct {
		minPrecision float64
		want         float64
	}{
		{1, 1.0 / 3},
		{0.9, 1.0 / 3},
		{0.6, 2.0 / 3},
		{0.5, 1},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("precision %g", tc.minPrecision), func(t *testing.T) {
			must.InDelta(t, tc.want, RecallAtPrecision(handScores, handLabels, tc.minPrecision), 1e-12)
		})
	}
	// No threshold reaches the precision: recall 0.
	must.Eq(t, 0, RecallAtPrecision([]float64{0.9, 0.1}, []bool{false, true}, 0.6))
}

func TestBrierSkill(t *testing.T) {
	tests := []struct {
		name       string
		probs      []float64
		labels     []bool
		wantBrier  float64
		wantSkill  float64
		skillIsNaN bool
	}{
		{"hand-worked", handScores, handLabels, 1.7 / 6, -2.0 / 15, false},
		{"perfect", []float64{1, 0, 0, 1}, []bool{true, false, false, true}, 0, 1, false},
		{"the base rate itself", []float64{0.25, 0.25, 0.25, 0.25}, []bool{true, false, false, false}, 0.1875, 0, false},
		{"one class only", []float64{0.2, 0.3}, []bool{false, false}, (0.04 + 0.09) / 2, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.InDelta(t, tc.wantBrier, Brier(tc.probs, tc.labels), 1e-12)
			got := BrierSkill(tc.probs, tc.labels)
			if tc.skillIsNaN {
				must.True(t, math.IsNaN(got), must.Sprintf("want NaN, got %g", got))
				return
			}
			must.InDelta(t, tc.wantSkill, got, 1e-12)
		})
	}
}

// randomForecasts returns n forecasts on a grid of 0.01, the outcome drawn from the
// forecast itself, so that ties abound and the forecast is calibrated.
func randomForecasts(seed uint64, n int) ([]float64, []bool) {
	r := rand.New(rand.NewPCG(seed, 1))
	probs := make([]float64, n)
	labels := make([]bool, n)
	for i := range probs {
		probs[i] = math.Round(math.Pow(r.Float64(), 3)*100) / 100
		labels[i] = r.Float64() < probs[i]
	}
	return probs, labels
}

func TestAccumulatorMatchesExact(t *testing.T) {
	probs, labels := randomForecasts(1, 20000)
	want := Summarize(probs, labels, 0.5)
	acc := NewAccumulator()
	for i, p := range probs {
		acc.Add(p, labels[i])
	}
	got := acc.Summary(0.5)
	must.Eq(t, want.N, got.N)
	must.Eq(t, want.Positives, got.Positives)
	for _, c := range []struct {
		name       string
		want, have float64
	}{
		{"roc_auc", want.ROCAUC, got.ROCAUC},
		{"pr_auc", want.PRAUC, got.PRAUC},
		{"brier", want.Brier, got.Brier},
		{"brier_skill", want.BrierSkill, got.BrierSkill},
		{"recall_at_precision", want.RecallAtPrecision, got.RecallAtPrecision},
		{"mean_forecast", want.MeanForecast, got.MeanForecast},
	} {
		must.InDelta(t, c.want, c.have, 1e-9, must.Sprint(c.name))
	}
}

func TestAccumulatorMergeIsOrderFree(t *testing.T) {
	probs, labels := randomForecasts(2, 5000)
	whole := NewAccumulator()
	a, b := NewAccumulator(), NewAccumulator()
	for i, p := range probs {
		whole.Add(p, labels[i])
		if i%3 == 0 {
			a.Add(p, labels[i])
		} else {
			b.Add(p, labels[i])
		}
	}
	ab := NewAccumulator()
	ab.Merge(a)
	ab.Merge(b)
	ba := NewAccumulator()
	ba.Merge(b)
	ba.Merge(a)
	want := whole.Summary(0.5)
	for _, got := range []Summary{ab.Summary(0.5), ba.Summary(0.5)} {
		must.Eq(t, want.N, got.N)
		must.InDelta(t, want.ROCAUC, got.ROCAUC, 1e-12)
		must.InDelta(t, want.PRAUC, got.PRAUC, 1e-12)
		must.InDelta(t, want.Brier, got.Brier, 1e-12)
	}
}

func TestAccumulatorReliability(t *testing.T) {
	probs, labels := randomForecasts(3, 50000)
	acc := NewAccumulator()
	for i, p := range probs {
		acc.Add(p, labels[i])
	}
	var n int64
	for _, bin := range acc.Reliability() {
		n += bin.N
		must.Between(t, bin.Lo, bin.MeanForecast, bin.Hi)
		if bin.N > 2000 {
			// The outcomes were drawn from the forecasts: each busy bin is calibrated.
			must.InDelta(t, bin.MeanForecast, bin.Observed, 0.03, must.Sprintf("bin %+v", bin))
		}
	}
	must.Eq(t, acc.N(), n)
}

func TestAccumulatorEmpty(t *testing.T) {
	s := NewAccumulator().Summary(0.5)
	must.Eq(t, 0, s.N)
	must.True(t, math.IsNaN(s.ROCAUC))
}

func TestBinOfIsMonotone(t *testing.T) {
	prev := binOf(-1)
	for _, p := range []float64{0, 1e-30, 1e-9, 1e-4, 0.001, 0.0011, 0.01, 0.1, 0.5, 0.5005, 0.9, 0.999, 1, 2} {
		b := binOf(p)
		must.GreaterEq(t, prev, b, must.Sprintf("bin of %g", p))
		must.Less(t, numBins, b)
		prev = b
	}
	must.Less(t, binOf(0.5025), binOf(0.5), must.Sprint("scores half a percent apart must not tie"))
}
