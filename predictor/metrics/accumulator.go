package metrics

import (
	"math"
)

// binShift drops the low mantissa bits of a float32 score: what remains orders scores in
// (0, 1) exactly as the scores do, to 9 significant bits.
const binShift = 14

// numBins is one bin for scores at or below 0, one per kept float32 pattern below 1, and
// one for scores at or above 1.
var numBins = int(math.Float32bits(1)>>binShift) + 2

func binOf(p float64) int {
	switch {
	case !(p > 0): // also NaN
		return 0
	case p >= 1:
		return numBins - 1
	}
	return int(math.Float32bits(float32(p))>>binShift) + 1
}

// ReliabilityBin is one bin of a reliability diagram.
type ReliabilityBin struct {
	// Lo and Hi bound the forecasts in the bin.
	Lo float64 `json:"lo"`
	Hi float64 `json:"hi"`
	// N counts forecasts in the bin.
	N int64 `json:"n"`
	// MeanForecast is their mean probability.
	MeanForecast float64 `json:"mean_forecast"`
	// Observed is the fraction of them whose event happened.
	Observed float64 `json:"observed"`
}

// Reliability bins are log-spaced, reliabilityPerDecade to a decade, from 10^-reliabilityDecades
// to 1, with one more bin below.
const (
	reliabilityDecades   = 4
	reliabilityPerDecade = 5
	numReliability       = reliabilityDecades*reliabilityPerDecade + 1
)

// reliabilityLo holds each bin's lower edge.
var reliabilityLo = func() (lo [numReliability]float64) {
	for i := range lo {
		lo[i], _ = reliabilityEdges(i)
	}
	return lo
}()

func reliabilityBin(p float64) int {
	i, j := 0, numReliability // the bin is the last i with reliabilityLo[i] <= p
	for j-i > 1 {
		h := (i + j) / 2
		if reliabilityLo[h] <= p {
			i = h
		} else {
			j = h
		}
	}
	return i
}

func reliabilityEdges(i int) (lo, hi float64) {
	if i == 0 {
		return 0, math.Pow(10, -reliabilityDecades)
	}
	lo = math.Pow(10, float64(i-1)/reliabilityPerDecade-reliabilityDecades)
	hi = math.Pow(10, float64(i)/reliabilityPerDecade-reliabilityDecades)
	return lo, hi
}

// Accumulator collects forecasts and outcomes in bounded memory (about 1 MB) and scores
// them. The zero value is not ready; use NewAccumulator. An Accumulator is not safe for
// concurrent use; give each goroutine its own and Merge them.
type Accumulator struct {
	pos, neg []uint64
	n, npos  int64
	sumSq    float64
	sumP     float64
	rel      [numReliability]struct {
		n          int64
		sumP, sumY float64
	}
}

// NewAccumulator returns an empty Accumulator.
func NewAccumulator() *Accumulator {
	return &Accumulator{pos: make([]uint64, numBins), neg: make([]uint64, numBins)}
}

// Add records a forecast probability p of an event and whether it happened.
func (a *Accumulator) Add(p float64, happened bool) {
	b := binOf(p)
	y := 0.0
	if happened {
		a.pos[b]++
		a.npos++
		y = 1
	} else {
		a.neg[b]++
	}
	a.n++
	d := p - y
	a.sumSq += d * d
	a.sumP += p
	r := &a.rel[reliabilityBin(p)]
	r.n++
	r.sumP += p
	r.sumY += y
}

// Merge adds b's forecasts to a. Counts add exactly, so merging in any order gives the
// same scores.
func (a *Accumulator) Merge(b *Accumulator) {
	for i := range a.pos {
		a.pos[i] += b.pos[i]
		a.neg[i] += b.neg[i]
	}
	a.n += b.n
	a.npos += b.npos
	a.sumSq += b.sumSq
	a.sumP += b.sumP
	for i := range a.rel {
		a.rel[i].n += b.rel[i].n
		a.rel[i].sumP += b.rel[i].sumP
		a.rel[i].sumY += b.rel[i].sumY
	}
}

// N returns the number of forecasts recorded.
func (a *Accumulator) N() int64 { return a.n }

// Summary scores the forecasts recorded so far.
func (a *Accumulator) Summary(minPrecision float64) Summary {
	s := Summary{N: a.n, Positives: a.npos, MinPrecision: minPrecision}
	if a.n == 0 {
		s.ROCAUC, s.PRAUC, s.RecallAtPrecision, s.BrierSkill = math.NaN(), math.NaN(), math.NaN(), math.NaN()
		return s
	}
	var gs []group
	for i := len(a.pos) - 1; i >= 0; i-- {
		if a.pos[i] > 0 || a.neg[i] > 0 {
			gs = append(gs, group{pos: float64(a.pos[i]), neg: float64(a.neg[i])})
		}
	}
	s.ROCAUC, s.PRAUC, s.RecallAtPrecision = ranking(gs, minPrecision)
	s.BaseRate = float64(a.npos) / float64(a.n)
	s.MeanForecast = a.sumP / float64(a.n)
	s.Brier = a.sumSq / float64(a.n)
	s.BrierSkill = brierSkill(s.Brier, s.BaseRate)
	return s
}

// Reliability returns the non-empty bins of the reliability diagram, lowest forecasts
// first.
func (a *Accumulator) Reliability() []ReliabilityBin {
	var out []ReliabilityBin
	for i, r := range a.rel {
		if r.n == 0 {
			continue
		}
		lo, hi := reliabilityEdges(i)
		out = append(out, ReliabilityBin{Lo: lo, Hi: hi, N: r.n, MeanForecast: r.sumP / float64(r.n), Observed: r.sumY / float64(r.n)})
	}
	return out
}
