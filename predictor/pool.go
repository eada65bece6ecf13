package predictor

import (
	"math"
)

// Learning rates and priors. They are round numbers chosen on a validation split inside
// the training years (docs/forecast.md), never on the evaluation's test year.
const (
	// poolRate is the AdaGrad step of the fleet weights.
	poolRate = 0.05
	// desktopRate is the SGD step of a desktop's own correction to the fleet weights: slow,
	// so that it follows a desktop's drift without chasing its noise.
	desktopRate = 0.001
	// desktopL2 pulls a desktop's correction back towards the fleet's weights.
	desktopL2 = 1e-3
	// seasonPrior is how many minutes of a desktop's own idle time, in one hour of the
	// week, weigh as much as the fleet's rate for that hour (Gamma-Poisson shrinkage).
	seasonPrior = 240.0
	// seasonHalfLife is the half-life, in weeks, of the seasonal counts, so a desktop's
	// profile follows term, holidays and a new owner.
	seasonHalfLife = 26.0
	// defaultRate is the arrival rate per idle minute the fleet assumes before it has seen
	// any desktop (one arrival in ten hours), weighted as defaultExposure minutes.
	defaultRate     = 1.0 / 600
	defaultExposure = 60.0
)

var seasonDecay = math.Pow(0.5, 1/seasonHalfLife)

// Pool is the fleet-level prior that every desktop's Model starts from: logistic weights
// for each horizon and the fleet's arrival rate for each hour of the week. It learns from
// every desktop model that is created with LearnFleet, which must all run on one goroutine;
// models that only read it may run concurrently once no model learns into it.
type Pool struct {
	// W holds the fleet weights of each horizon.
	W [numHorizons][numFeatures]float64
	// G holds AdaGrad's running sums of squared gradients for W.
	G [numHorizons][numFeatures]float64
	// SeasonA and SeasonE are the fleet's arrivals and idle minutes in each hour of the
	// week, decayed with seasonHalfLife.
	SeasonA, SeasonE [cellsPerWeek]float64
	// Week is the last week whose decay has been applied.
	Week int64
	// Samples counts the samples the weights learned from.
	Samples uint64
}

// NewPool returns the prior of a fleet nothing is known about: every hour of the week has
// the same modest arrival rate and the weights turn that rate into probabilities.
func NewPool() *Pool {
	p := &Pool{}
	for j := range p.W {
		// The seasonal log-odds are scaled by 1/4 (see seasonLogit); undo that.
		p.W[j][fSeason] = 4
		for i := range p.G[j] {
			p.G[j][i] = 1
		}
	}
	return p
}

// rate returns the fleet's arrival rate per idle minute in hour-of-week cell c.
func (p *Pool) rate(c int) float64 {
	return (p.SeasonA[c] + defaultRate*defaultExposure) / (p.SeasonE[c] + defaultExposure)
}

// decayTo applies the seasonal decay up to week w.
func (p *Pool) decayTo(w int64) {
	if p.Week == 0 {
		p.Week = w
		return
	}
	if w <= p.Week {
		return
	}
	f := math.Pow(seasonDecay, float64(w-p.Week))
	for c := range p.SeasonA {
		p.SeasonA[c] *= f
		p.SeasonE[c] *= f
	}
	p.Week = w
}

// Clone returns a deep copy of the pool.
func (p *Pool) Clone() *Pool {
	c := *p
	return &c
}
