package predictor

import (
	"math"
	"time"
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
	// calendarPrior is how many idle minutes of one calendar cell weigh as much as the
	// fleet's usual rate on its weekday. A fleet's cell holds thousands; the prior only
	// keeps a pool built on little history near "an ordinary day".
	calendarPrior = 600.0
)

// The fleet calendar's cells are the quarters of each day of the year. A day is named by
// its week of the year (weeks begin on Sunday; week 0 holds the days before the first
// Sunday) and its weekday, so a cell falls on the same weekday every year and within three
// days of the same date: a term that starts on a Monday in mid-August, or a break in the
// fourth week of November, lands in the same cells year after year.
const (
	calendarDays   = 54 * 7
	quartersPerDay = 4
	calendarCells  = calendarDays * quartersPerDay
	weekdayCells   = 7 * quartersPerDay
)

var seasonDecay = math.Pow(0.5, 1/seasonHalfLife)

// Pool is the fleet-level prior that every desktop's Model starts from: logistic weights
// for each horizon, the fleet's arrival rate for each hour of the week, and its calendar:
// how busy each day of the year was, against its weekday, in the years it has seen. It learns from
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
	// CalendarA and CalendarE are the fleet's arrivals and idle minutes in each calendar
	// cell, summed over every year seen, without decay. The day in progress is held in
	// TodayA and TodayE and joins them when it is over, so a calendar feature never reads
	// the day it describes: a pool learns from the same calendar it will forecast with.
	CalendarA, CalendarE [calendarCells]float64
	// WeekdayA and WeekdayE are the fleet's arrivals and idle minutes by weekday and quarter
	// of the day, over every year seen: the usual rate a calendar cell is compared with.
	WeekdayA, WeekdayE [weekdayCells]float64
	// Today is the day, counted from the epoch in wall-clock time, that TodayA and TodayE
	// hold by quarter.
	Today          int64
	TodayA, TodayE [quartersPerDay]float64
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

// calendarCell returns the fleet calendar's cell of wall-clock time ms, and its weekday
// cell.
func calendarCell(ms int64) (cell, wcell int) {
	d := time.UnixMilli(ms).UTC()
	yd, wd := d.YearDay()-1, int(d.Weekday())
	week := (yd - wd + 7) / 7
	q := int(floorMod(ms, msDay) / (msDay / quartersPerDay))
	return (week*7+wd)*quartersPerDay + q, wd*quartersPerDay + q
}

// addCalendar counts arrivals and idle minutes at wall-clock time ms into the calendar.
// The fleet's desktops learn into the pool in time order, but a desktop that was off for
// days accounts its idle minutes only at its next event: those belong to days already
// over, and go straight to their cells.
func (p *Pool) addCalendar(ms int64, arrivals, minutes float64) {
	cell, wcell := calendarCell(ms)
	p.WeekdayA[wcell] += arrivals
	p.WeekdayE[wcell] += minutes
	day := floorDiv(ms, msDay)
	if day > p.Today {
		p.closeDay()
		p.Today = day
	}
	if day == p.Today {
		q := cell % quartersPerDay
		p.TodayA[q] += arrivals
		p.TodayE[q] += minutes
		return
	}
	p.CalendarA[cell] += arrivals
	p.CalendarE[cell] += minutes
}

// closeDay moves the day in progress into its calendar cells.
func (p *Pool) closeDay() {
	first, _ := calendarCell(p.Today * msDay)
	for q := range quartersPerDay {
		p.CalendarA[first+q] += p.TodayA[q]
		p.CalendarE[first+q] += p.TodayE[q]
		p.TodayA[q], p.TodayE[q] = 0, 0
	}
}

// calendar returns the log of the fleet's arrival rate on the day of wall-clock time ms,
// and in its quarter of the day, in the years the pool has seen, over its usual rate on
// that weekday and quarter. Both are 0 for a pool that has seen no such day.
func (p *Pool) calendar(ms int64) (day, quarter float64) {
	cell, wcell := calendarCell(ms)
	first, wfirst := cell-cell%quartersPerDay, wcell-wcell%quartersPerDay
	var a, e, wa, we float64
	for q := range quartersPerDay {
		a += p.CalendarA[first+q]
		e += p.CalendarE[first+q]
		wa += p.WeekdayA[wfirst+q]
		we += p.WeekdayE[wfirst+q]
	}
	return calendarLogRatio(a, e, wa, we),
		calendarLogRatio(p.CalendarA[cell], p.CalendarE[cell], p.WeekdayA[wcell], p.WeekdayE[wcell])
}

// calendarLogRatio is the log of the rate a/e over the usual rate wa/we, the first shrunk
// towards the second with calendarPrior and the result held within ±3.
func calendarLogRatio(a, e, wa, we float64) float64 {
	usual := (wa + defaultRate*defaultExposure) / (we + defaultExposure)
	rate := (a + calendarPrior*usual) / (e + calendarPrior)
	return max(-3, min(3, math.Log(rate/usual)))
}

// Clone returns a deep copy of the pool.
func (p *Pool) Clone() *Pool {
	c := *p
	return &c
}
