package predictor

import (
	"errors"
	"fmt"
	"math"
	"time"
)

const numHorizons = 5

// Horizons are the lead times a Forecast gives probabilities for, shortest first.
var Horizons = [numHorizons]time.Duration{time.Minute, 5 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour}

var horizonMs = [numHorizons]int64{msMinute, 5 * msMinute, 15 * msMinute, 30 * msMinute, msHour}

// SampleEvery is the cadence at which a model takes a learning sample while its desktop is
// harvestable. Samples fall on multiples of it on the wall clock.
const SampleEvery = 5 * time.Minute

const sampleMs = int64(SampleEvery / time.Millisecond)

// ExpectedIdleCap bounds Forecast.ExpectedIdle: it is the expectation of the idle time left,
// capped at this.
const ExpectedIdleCap = 8 * time.Hour

// Bounds of the model's history.
const (
	// arrivalCap is how many of the owner's most recent arrivals are kept: enough for a
	// day of a busy public desktop.
	arrivalCap = 64
	// pendingCap is how many samples can wait for their outcome: the longest horizon over
	// the sampling cadence, plus room.
	pendingCap = 16
)

// Learning says what a Model learns from the samples it sees.
type Learning uint8

const (
	// LearnNone freezes the model: it tracks its desktop's state and forecasts, and learns
	// nothing.
	LearnNone Learning = iota
	// LearnDesktop updates this desktop's own seasonal profile and correction weights; the
	// pool is only read. This is how a model runs on its node.
	LearnDesktop
	// LearnFleet also updates the pool, for building a pool from a fleet's history.
	LearnFleet
)

// ErrPast is returned when a model is given a time before one it has already seen.
var ErrPast = errors.New("time is before the model's clock")

// Forecast is what a model expects of its desktop's owner.
type Forecast struct {
	// At is the time the forecast is for.
	At time.Time
	// OwnerAway is whether the owner was away at At. When they are not, every P is 1 and
	// ExpectedIdle is 0.
	OwnerAway bool
	// P[i] is the probability that the owner is active within Horizons[i] after At: that
	// an in-use period starts in (At, At+Horizons[i]]. It never decreases with i.
	P [numHorizons]float64
	// ExpectedIdle is the expected time until the owner is active, capped at
	// ExpectedIdleCap.
	ExpectedIdle time.Duration
}

// pending is a learning sample whose outcome is not yet known for every horizon.
type pending struct {
	At   int64
	Done uint8 // bit j set once horizon j has been learned
	_    [7]byte
	F    features
}

// desktopState is everything a model knows. It holds no pointers or slices, so it has a
// fixed size and is persisted as it is.
type desktopState struct {
	Clock      int64 // wall ms the model has advanced to
	NextTick   int64 // the next sampling time not yet processed
	ExposedTo  int64 // idle exposure counted up to here
	Week       int64 // the last week whose seasonal decay has been applied
	StateSince int64
	// LastActiveEnd is when the owner was last active; SessionStart when the current or
	// last in-use period began.
	LastActiveEnd int64
	SessionStart  int64
	Samples       uint64
	State         State
	Seen          bool // whether anything has been observed
	HasActive     bool // whether the owner has ever been seen active
	_             [5]byte
	LastSession   float32 // minutes of the last finished in-use period, -1 for none
	RecentA       [2]float32
	RecentE       [2]float32
	// InUse holds exponentially weighted fractions of recent time the desktop was in use.
	InUse [2]float32
	// Context holds the last Context's FleetInUse, FleetArrivals and GroupInUse.
	Context  [3]float32
	ArrHead  uint16 // index of the oldest arrival in Arr
	ArrN     uint16
	PendHead uint16
	PendN    uint16
	Arr      [arrivalCap]int64
	SeasonA  [cellsPerWeek]float32
	SeasonE  [cellsPerWeek]float32
	Delta    [numHorizons][numFeatures]float32
	Pend     [pendingCap]pending
}

// recentTau are the time constants, in ms, of the recent-activity level features.
var recentTau = [2]float64{float64(msDay), float64(msWeek)}

// inUseTau are the time constants, in ms, of the recent in-use fractions.
var inUseTau = [2]float64{float64(msHour), 4 * float64(msHour)}

// Model forecasts one desktop's owner. It is not safe for concurrent use.
type Model struct {
	pool  *Pool
	learn Learning
	st    desktopState

	cache   features // features at cacheAt, valid if cacheOK
	cacheAt int64
	cacheOK bool
}

// NewModel returns a model of a desktop nothing is known about yet, which forecasts from
// the pool's prior and learns as its desktop is observed.
func NewModel(pool *Pool, learn Learning) *Model {
	m := &Model{pool: pool, learn: learn}
	m.st.LastSession = -1
	m.st.Context = [3]float32{-1, -1, -1}
	return m
}

// Context is what the platform knows of the whole fleet and tells every node. It carries
// no desktop's activity, only aggregates of the OwnerAway flags that forecasts publish. A
// negative value means unknown; a model with no context forecasts from its own history.
type Context struct {
	// FleetInUse is the fraction, from 0 to 1, of the fleet's desktops whose owner is
	// present.
	FleetInUse float64
	// FleetArrivals is the rate at which owners came back across the fleet over the last
	// quarter of an hour, per desktop and hour.
	FleetArrivals float64
	// GroupInUse is as FleetInUse for the desktop's group: its room, floor or node pool.
	GroupInUse float64
}

// The rules by which a Context is made from the fleet's published OwnerAway flags, the same
// wherever it is made (the forecast evaluation, the fleet simulator), so that a pool built
// with a fleet context in one reads the same features in the other.
const (
	// ContextSilence is how long after its last report a desktop still counts in the fleet.
	ContextSilence = 7 * 24 * time.Hour
	// ContextSession is how long after its last report an owner at the desktop still counts
	// as present: a session that never logged its end is not occupancy.
	ContextSession = 24 * time.Hour
	// ContextFlow is the window over which the fleet's arrival rate (FleetArrivals) is
	// measured.
	ContextFlow = 15 * time.Minute
)

// NoContext is the Context of a model told nothing about its fleet.
var NoContext = Context{FleetInUse: -1, FleetArrivals: -1, GroupInUse: -1}

// SetContext tells the model the fleet's state from now on, until the next call.
func (m *Model) SetContext(c Context) {
	v := [3]float32{-1, -1, -1}
	for i, x := range [3]float64{c.FleetInUse, c.FleetArrivals, c.GroupInUse} {
		if x >= 0 {
			v[i] = float32(x)
		}
	}
	if v != m.st.Context {
		m.st.Context = v
		m.cacheOK = false
	}
}

// SetLearning changes what the model learns from now on.
func (m *Model) SetLearning(l Learning) { m.learn = l }

// Samples returns how many samples the model has learned from.
func (m *Model) Samples() uint64 { return m.st.Samples }

// StateSize is the size in bytes of a model's persisted state.
func StateSize() int { return stateSize }

func wallMs(t time.Time) int64 {
	_, off := t.Zone()
	return t.UnixMilli() + int64(off)*1000
}

// Observe records that the desktop entered state s at time t. Times must not go back.
func (m *Model) Observe(t time.Time, s State) error {
	return m.observe(wallMs(t), s)
}

// Advance moves the model's clock to t with no change of state, learning what the passing
// time reveals: that the owner did not come back.
func (m *Model) Advance(t time.Time) error {
	ms := wallMs(t)
	if !m.st.Seen {
		return nil
	}
	if ms < m.st.Clock {
		return fmt.Errorf("advance to %s: %w", t.Format(time.RFC3339), ErrPast)
	}
	m.advance(ms, true)
	return nil
}

// Forecast advances the model to t and forecasts the owner's return from there.
func (m *Model) Forecast(t time.Time) (Forecast, error) {
	if err := m.Advance(t); err != nil {
		return Forecast{}, err
	}
	f := Forecast{At: t}
	m.forecast(wallMs(t), &f)
	return f, nil
}

// ForecastProbabilities is Forecast without ExpectedIdle, which it leaves zero: cheaper, for
// callers that only weigh the probabilities.
func (m *Model) ForecastProbabilities(t time.Time) (Forecast, error) {
	if err := m.Advance(t); err != nil {
		return Forecast{}, err
	}
	f := Forecast{At: t}
	m.probabilities(wallMs(t), &f)
	return f, nil
}

func (m *Model) observe(t int64, s State) error {
	st := &m.st
	if s == Unknown {
		return errors.New("observe unknown state")
	}
	if !st.Seen {
		st.Seen = true
		st.Clock, st.ExposedTo, st.StateSince = t, t, t
		st.NextTick = (floorDiv(t, sampleMs) + 1) * sampleMs
		st.Week = floorDiv(t, msWeek)
		st.State = s
		if s == InUse {
			st.SessionStart = t
		}
		return nil
	}
	if t < st.Clock {
		return fmt.Errorf("observe %s: %w", s, ErrPast)
	}
	m.advance(t, false)
	prev := st.State
	switch {
	case s == prev:
		return nil // a repeated state is no change
	case s == InUse:
		if prev.OwnerAway() {
			m.arrive(t)
		}
		st.SessionStart = t
	case prev == InUse:
		st.LastActiveEnd, st.HasActive = t, true
		st.LastSession = float32(t-st.SessionStart) / float32(msMinute)
	}
	st.State, st.StateSince = s, t
	m.cacheOK = false
	return nil
}

// advance moves the clock to t, processing the sampling ticks before t (and at t if
// inclusive: a state change at t comes after the tick at t).
func (m *Model) advance(t int64, inclusive bool) {
	st := &m.st
	for st.NextTick < t || (inclusive && st.NextTick == t) {
		tick := st.NextTick
		m.account(tick)
		m.resolveElapsed(tick)
		if m.learn != LearnNone && st.State.Harvestable() {
			m.sample(tick)
		}
		st.NextTick += sampleMs
	}
	m.account(t)
	st.Clock = t
}

// account counts the idle exposure up to t into the seasonal profile and recent levels.
func (m *Model) account(t int64) {
	st := &m.st
	a := st.ExposedTo
	if t <= a {
		return
	}
	if w := floorDiv(t, msWeek); w > st.Week {
		if m.learn != LearnNone {
			f := float32(math.Pow(seasonDecay, float64(w-st.Week)))
			for c := range st.SeasonA {
				st.SeasonA[c] *= f
				st.SeasonE[c] *= f
			}
		}
		st.Week = w
		if m.learn == LearnFleet {
			m.pool.decayTo(w)
		}
	}
	for k := range st.RecentA {
		d := float32(math.Exp(-float64(t-a) / recentTau[k]))
		st.RecentA[k] *= d
		st.RecentE[k] *= d
	}
	for k := range st.InUse {
		d := float32(math.Exp(-float64(t-a) / inUseTau[k]))
		st.InUse[k] *= d
		if st.State == InUse {
			st.InUse[k] += 1 - d
		}
	}
	if st.State.OwnerAway() {
		for a < t {
			c := cellOf(a)
			end := min(t, cellEnd(a))
			mins := float64(end-a) / float64(msMinute)
			rate := m.rate(c)
			for k := range st.RecentE {
				st.RecentE[k] += float32(rate * mins)
			}
			if m.learn != LearnNone {
				st.SeasonE[c] += float32(mins)
			}
			if m.learn == LearnFleet {
				m.pool.SeasonE[c] += mins
				m.pool.addCalendar(a, 0, mins)
			}
			a = end
		}
	}
	st.ExposedTo = t
}

// rate is this desktop's arrival rate per idle minute in cell c: its own counts shrunk
// towards the fleet's rate.
func (m *Model) rate(c int) float64 {
	return (float64(m.st.SeasonA[c]) + seasonPrior*m.pool.rate(c)) / (float64(m.st.SeasonE[c]) + seasonPrior)
}

// arrive records the owner's arrival at t and teaches every waiting sample its outcome.
func (m *Model) arrive(t int64) {
	st := &m.st
	m.account(t)
	c := cellOf(t)
	if m.learn != LearnNone {
		st.SeasonA[c]++
	}
	if m.learn == LearnFleet {
		m.pool.SeasonA[c]++
		m.pool.addCalendar(t, 1, 0)
	}
	for k := range st.RecentA {
		st.RecentA[k]++
	}
	if st.ArrN == arrivalCap {
		st.ArrHead = (st.ArrHead + 1) % arrivalCap
		st.ArrN--
	}
	st.Arr[(int(st.ArrHead)+int(st.ArrN))%arrivalCap] = t
	st.ArrN++
	for st.PendN > 0 {
		p := &st.Pend[st.PendHead]
		for j, h := range horizonMs {
			if p.Done&(1<<j) == 0 {
				m.learnFrom(&p.F, j, t <= p.At+h)
			}
		}
		m.popPending()
	}
}

// resolveElapsed teaches waiting samples whose horizons ended by t with no arrival.
func (m *Model) resolveElapsed(t int64) {
	st := &m.st
	for i := 0; i < int(st.PendN); i++ {
		p := &st.Pend[(int(st.PendHead)+i)%pendingCap]
		for j, h := range horizonMs {
			if p.Done&(1<<j) == 0 && p.At+h <= t {
				m.learnFrom(&p.F, j, false)
				p.Done |= 1 << j
			}
		}
	}
	for st.PendN > 0 && st.Pend[st.PendHead].Done == 1<<numHorizons-1 {
		m.popPending()
	}
}

func (m *Model) popPending() {
	m.st.PendHead = (m.st.PendHead + 1) % pendingCap
	m.st.PendN--
}

// sample queues a learning sample at tick t.
func (m *Model) sample(t int64) {
	st := &m.st
	if st.PendN == pendingCap {
		m.popPending() // cannot happen with pendingCap above the longest horizon's ticks
	}
	p := &st.Pend[(int(st.PendHead)+int(st.PendN))%pendingCap]
	st.PendN++
	p.At, p.Done = t, 0
	m.features(t, &p.F)
	m.cache, m.cacheAt, m.cacheOK = p.F, t, true
}

// learnFrom takes one gradient step on horizon j for features f and outcome y.
func (m *Model) learnFrom(f *features, j int, y bool) {
	if m.learn == LearnNone {
		return
	}
	w := &m.pool.W[j]
	d := &m.st.Delta[j]
	g := sigmoid(f.logit(j, w, d))
	if y {
		g--
	}
	idx, val := &f.Idx[j], &f.Val[j]
	if m.learn == LearnFleet {
		gsum := &m.pool.G[j]
		for k := range f.N[j] {
			i := idx[k]
			gx := g * float64(val[k])
			gsum[i] += gx * gx
			w[i] -= poolRate * gx / math.Sqrt(gsum[i])
			d[i] -= float32(desktopRate * (gx + desktopL2*float64(d[i])))
		}
	} else {
		for k := range f.N[j] {
			i := idx[k]
			d[i] -= float32(desktopRate * (g*float64(val[k]) + desktopL2*float64(d[i])))
		}
	}
	if j == 0 {
		m.st.Samples++
		if m.learn == LearnFleet {
			m.pool.Samples++
		}
	}
}

// recentArrivals counts the owner's arrivals in the hour and the day up to t.
func (m *Model) recentArrivals(t int64) (hour, day int) {
	st := &m.st
	for i := int(st.ArrN) - 1; i >= 0; i-- {
		a := st.Arr[(int(st.ArrHead)+i)%arrivalCap]
		if a <= t-msDay {
			break
		}
		if a > t {
			continue
		}
		day++
		if a > t-msHour {
			hour++
		}
	}
	return hour, day
}

// features computes the feature vectors at time t.
func (m *Model) features(t int64, f *features) {
	st := &m.st
	f.N = [numHorizons]uint8{}
	f.add(fBias, 1)
	idleBucket := numIdleBuckets - 1
	if st.HasActive {
		idleBucket = bucket(float64(t-st.LastActiveEnd)/float64(msMinute), idleEdges[:])
	}
	f.add(fIdle+idleBucket, 1)
	f.add(idleByHour(t, idleBucket), 1)
	calDay, calQuarter := m.pool.calendar(t)
	f.add(fCalendarDay, calDay)
	f.add(fCalendarQuarter, calQuarter)
	switch st.State {
	case Available:
		f.add(fAvailable, 1)
	case Restarted:
		f.add(fRestarted, 1)
	case Offline:
		f.add(fOffline, 1)
	}
	f.add(fInState+bucket(float64(t-st.StateSince)/float64(msMinute), inStateEdges[:]), 1)
	if st.LastSession < 0 {
		f.add(fSessionNone, 1)
	} else {
		f.add(fSession+bucket(float64(st.LastSession), sessionEdges[:]), 1)
	}
	n1h, n1d := m.recentArrivals(t)
	f.add(fArrivals1h, math.Log1p(float64(n1h)))
	f.add(fArrivals1d, math.Log1p(float64(n1d))/2)
	for k, fi := range [2]int{fLevel1d, fLevel7d} {
		lv := math.Log((float64(st.RecentA[k]) + 0.5) / (float64(st.RecentE[k]) + 0.5))
		f.add(fi, max(-3, min(3, lv)))
	}
	f.add(fInUse1h, float64(st.InUse[0]))
	f.add(fInUse4h, float64(st.InUse[1]))

	ctx := &st.Context
	if ctx[0] < 0 {
		f.add(fNoContext, 1)
	} else {
		f.add(fFleet, occupancyLogit(ctx[0]))
		f.add(fFleetBucket+bucket(float64(ctx[0]), fleetEdges[:]), 1)
	}
	if ctx[1] >= 0 {
		f.add(fFlow, math.Log(float64(ctx[1])+0.01)/4)
	}
	if ctx[2] >= 0 {
		f.add(fGroup, occupancyLogit(ctx[2]))
		f.add(fGroupBucket+bucket(float64(ctx[2]), fleetEdges[:]), 1)
	}

	// The desktop's seasonal hazard integrated over (t, t+h], cell by cell.
	var hazard float64
	a := t
	for j, h := range horizonMs {
		for a < t+h {
			end := min(t+h, cellEnd(a))
			hazard += m.rate(cellOf(a)) * float64(end-a) / float64(msMinute)
			a = end
		}
		f.addH(j, fSeason, seasonLogit(hazard))
	}
}

// occupancyLogit scales an in-use fraction's log-odds to about unit range.
func occupancyLogit(v float32) float64 {
	fl := min(max(float64(v), 0.005), 0.995)
	return math.Log(fl/(1-fl)) / 4
}

// forecast fills f for time t, the model's clock.
func (m *Model) forecast(t int64, f *Forecast) {
	m.probabilities(t, f)
	if f.OwnerAway {
		f.ExpectedIdle = m.expectedIdle(t, &f.P)
	}
}

// probabilities fills f's probabilities for time t, the model's clock.
func (m *Model) probabilities(t int64, f *Forecast) {
	st := &m.st
	if st.Seen && !st.State.OwnerAway() {
		for j := range f.P {
			f.P[j] = 1
		}
		return
	}
	f.OwnerAway = true
	var fv *features
	if m.cacheOK && m.cacheAt == t {
		fv = &m.cache
	} else {
		m.features(t, &m.cache)
		m.cacheAt, m.cacheOK = t, true
		fv = &m.cache
	}
	prev := 0.0
	for j := range f.P {
		p := max(prev, sigmoid(fv.logit(j, &m.pool.W[j], &st.Delta[j])))
		f.P[j], prev = p, p
	}
}

// expectedIdle integrates the survival curve: piecewise linear through the horizons, then
// the desktop's seasonal hazard, scaled to agree with the forecast at the last horizon and
// relaxing to the plain seasonal hazard over a couple of hours.
func (m *Model) expectedIdle(t int64, p *[numHorizons]float64) time.Duration {
	const step = 15.0 // minutes
	capMin := ExpectedIdleCap.Minutes()
	var area, u, s float64 = 0, 0, 1
	for j, h := range horizonMs {
		hm := float64(h) / float64(msMinute)
		next := max(1-p[j], 1e-9)
		area += (hm - u) * (s + next) / 2
		u, s = hm, next
	}
	// Seasonal hazard over the last half hour, to scale the tail by.
	seasonal := 0.0
	for v := 30.0; v < 60; v += 5 {
		seasonal += m.rate(cellOf(t+int64(v)*msMinute)) * 5
	}
	kappa0 := 1.0
	if seasonal > 0 && p[numHorizons-2] < 1 {
		kappa0 = math.Log((1-p[numHorizons-2])/max(1-p[numHorizons-1], 1e-9)) / seasonal
		kappa0 = max(0.1, min(10, kappa0))
	}
	for ; u < capMin && s > 1e-6; u += step {
		kappa := 1 + (kappa0-1)*math.Exp(-(u-60)/120)
		next := s * math.Exp(-kappa*m.rate(cellOf(t+int64(u)*msMinute))*step)
		area += step * (s + next) / 2
		s = next
	}
	return time.Duration(min(area, capMin) * float64(time.Minute))
}
