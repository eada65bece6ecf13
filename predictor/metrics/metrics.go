// Package metrics scores probability forecasts of a binary event: ROC-AUC, PR-AUC (average
// precision), the Brier score and its skill against the base rate, recall at a fixed
// precision, and reliability.
//
// The slice functions are exact. An [Accumulator] streams any number of forecasts in
// bounded memory by counting them in fine score bins (scores equal to 9 significant bits
// are ties), which is how the evaluation of a whole trace is scored; both share the tie
// handling below.
//
// Ties: forecasts with equal scores are one threshold. ROC-AUC counts a tied positive and
// negative pair as half a correct ranking (the Mann-Whitney statistic). Average precision
// is the sum over thresholds, from the highest score down, of the recall gained at the
// threshold times the precision there, as scikit-learn computes it.
package metrics

import (
	"math"
	"sort"
)

// Summary holds the scores of one set of forecasts.
type Summary struct {
	// N counts forecasts; Positives those whose event happened.
	N         int64 `json:"n"`
	Positives int64 `json:"positives"`
	// BaseRate is Positives/N.
	BaseRate float64 `json:"base_rate"`
	// ROCAUC is the area under the ROC curve: the chance that a random positive is scored
	// above a random negative.
	ROCAUC float64 `json:"roc_auc"`
	// PRAUC is the average precision, the area under the precision-recall curve; a
	// forecast with no skill scores BaseRate.
	PRAUC float64 `json:"pr_auc"`
	// Brier is the mean squared error of the probabilities.
	Brier float64 `json:"brier"`
	// BrierSkill is 1 - Brier/(BaseRate*(1-BaseRate)): the improvement over always
	// forecasting the sample's own base rate. 0 is no skill, 1 is perfect, negative worse
	// than the base rate.
	BrierSkill float64 `json:"brier_skill"`
	// MinPrecision is the precision at which RecallAtPrecision is measured.
	MinPrecision float64 `json:"min_precision"`
	// RecallAtPrecision is the largest recall of any threshold whose precision is at least
	// MinPrecision, 0 if there is none.
	RecallAtPrecision float64 `json:"recall_at_precision"`
	// MeanForecast is the mean probability forecast.
	MeanForecast float64 `json:"mean_forecast"`
}

// group is one threshold: the positives and negatives sharing a score.
type group struct{ pos, neg float64 }

// ranking computes the ranking metrics from tie groups in descending score order.
func ranking(groups []group, minPrecision float64) (auc, ap, recallAtP float64) {
	var P, N float64
	for _, g := range groups {
		P += g.pos
		N += g.neg
	}
	if P == 0 || N == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	var tp, fp, area float64
	for _, g := range groups {
		area += g.neg * (tp + g.pos/2)
		tp += g.pos
		fp += g.neg
		if g.pos > 0 {
			ap += g.pos / P * tp / (tp + fp)
		}
		if tp/(tp+fp) >= minPrecision {
			recallAtP = max(recallAtP, tp/P)
		}
	}
	return area / (P * N), ap, recallAtP
}

func check(scores []float64, labels []bool) {
	if len(scores) != len(labels) {
		panic("metrics: scores and labels differ in length")
	}
}

// groupsOf sorts forecasts by descending score and groups ties.
func groupsOf(scores []float64, labels []bool) []group {
	check(scores, labels)
	idx := make([]int, len(scores))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return scores[idx[a]] > scores[idx[b]] })
	var gs []group
	for i := 0; i < len(idx); {
		var g group
		j := i
		for ; j < len(idx) && scores[idx[j]] == scores[idx[i]]; j++ {
			if labels[idx[j]] {
				g.pos++
			} else {
				g.neg++
			}
		}
		gs = append(gs, g)
		i = j
	}
	return gs
}

// ROCAUC returns the area under the ROC curve, ties counting half; NaN without both
// classes.
func ROCAUC(scores []float64, labels []bool) float64 {
	auc, _, _ := ranking(groupsOf(scores, labels), 1)
	return auc
}

// AveragePrecision returns the area under the precision-recall curve as average precision;
// NaN without both classes.
func AveragePrecision(scores []float64, labels []bool) float64 {
	_, ap, _ := ranking(groupsOf(scores, labels), 1)
	return ap
}

// RecallAtPrecision returns the largest recall of a threshold whose precision is at least
// minPrecision; NaN without both classes.
func RecallAtPrecision(scores []float64, labels []bool, minPrecision float64) float64 {
	_, _, r := ranking(groupsOf(scores, labels), minPrecision)
	return r
}

// Brier returns the mean squared difference between probabilities and outcomes.
func Brier(probs []float64, labels []bool) float64 {
	check(probs, labels)
	var s float64
	for i, p := range probs {
		d := p - b2f(labels[i])
		s += d * d
	}
	return s / float64(len(probs))
}

// BrierSkill returns 1 - Brier/(b(1-b)) with b the sample's base rate; NaN without both
// classes.
func BrierSkill(probs []float64, labels []bool) float64 {
	check(probs, labels)
	var pos float64
	for _, l := range labels {
		pos += b2f(l)
	}
	return brierSkill(Brier(probs, labels), pos/float64(len(labels)))
}

func brierSkill(brier, base float64) float64 {
	ref := base * (1 - base)
	if ref == 0 {
		return math.NaN()
	}
	return 1 - brier/ref
}

// Summarize returns every score of a set of forecasts, exactly.
func Summarize(probs []float64, labels []bool, minPrecision float64) Summary {
	gs := groupsOf(probs, labels)
	s := Summary{N: int64(len(probs)), MinPrecision: minPrecision}
	var sum float64
	for i, p := range probs {
		sum += p
		if labels[i] {
			s.Positives++
		}
	}
	s.ROCAUC, s.PRAUC, s.RecallAtPrecision = ranking(gs, minPrecision)
	if s.N > 0 {
		s.BaseRate = float64(s.Positives) / float64(s.N)
		s.MeanForecast = sum / float64(s.N)
		s.Brier = Brier(probs, labels)
		s.BrierSkill = brierSkill(s.Brier, s.BaseRate)
	}
	return s
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
