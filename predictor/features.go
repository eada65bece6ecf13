package predictor

import (
	"math"
)

// Time inside the model is wall-clock milliseconds: Unix milliseconds shifted by the
// timestamp's zone offset, so hour of week follows the owner's local clock.
const (
	msMinute = int64(60 * 1000)
	msHour   = 60 * msMinute
	msDay    = 24 * msHour
	msWeek   = 7 * msDay
)

// Seasonal cells: one per hour of the week.
const (
	cellMs       = msHour
	cellsPerWeek = int(msWeek / cellMs)
)

// cellOf returns the seasonal cell of a wall-clock time, 0 for Sunday 00:00-01:00.
func cellOf(ms int64) int {
	c := floorDiv(ms, cellMs)
	// 1970-01-01 was a Thursday: the epoch is 4 days into its week.
	return int(floorMod(c+4*msDay/cellMs, int64(cellsPerWeek)))
}

// cellEnd returns the end of the cell holding ms.
func cellEnd(ms int64) int64 { return (floorDiv(ms, cellMs) + 1) * cellMs }

func floorDiv(a, b int64) int64 {
	q := a / b
	if (a%b != 0) && ((a < 0) != (b < 0)) {
		q--
	}
	return q
}

func floorMod(a, b int64) int64 { return a - floorDiv(a, b)*b }

// Feature layout. Every horizon has its own sparse vector of (index, value) pairs over the
// same index space; all but the seasonal feature take the same value for every horizon.
const (
	fBias = iota
	fIdle // numIdleBuckets one-hot buckets of time since the owner was last active
)

// Bucket edges: a value v falls in the first bucket whose edge exceeds it.
var (
	idleEdges    = [...]float64{2, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2880, 10080} // minutes
	inStateEdges = [...]float64{3, 10, 30, 90, 270, 1440}                               // minutes
	sessionEdges = [...]float64{5, 15, 45, 120, 360}                                    // minutes
	fleetEdges   = [...]float64{0.02, 0.05, 0.1, 0.2, 0.35, 0.5}                        // in-use fraction
)

const (
	numIdleBuckets    = len(idleEdges) + 2 // + beyond the last edge, + never active
	numInStateBuckets = len(inStateEdges) + 1
	numSessionBuckets = len(sessionEdges) + 2 // + beyond, + no session yet
	numFleetBuckets   = len(fleetEdges) + 1

	fIdleNever   = fIdle + numIdleBuckets - 1
	fAvailable   = fIdle + numIdleBuckets // the state the desktop is in, one-hot
	fRestarted   = fAvailable + 1
	fOffline     = fAvailable + 2
	fInState     = fOffline + 1 // buckets of time in that state
	fSession     = fInState + numInStateBuckets
	fSessionNone = fSession + numSessionBuckets - 1 // buckets of the last session's length
	fArrivals1h  = fSession + numSessionBuckets     // log of 1 + the owner's arrivals in the last hour
	fArrivals1d  = fArrivals1h + 1                  // ... in the last day
	fLevel1d     = fArrivals1d + 1                  // log of arrivals over seasonal expectation, last day or so
	fLevel7d     = fLevel1d + 1                     // ... last week or so
	fInUse1h     = fLevel7d + 1                     // fraction of the last hour or so the desktop was in use
	fInUse4h     = fInUse1h + 1                     // ... of the last four hours or so
	// Context features: the log-odds of the fleet's in-use fraction and buckets of it, the
	// fleet's recent arrival rate, the same for the desktop's group, or a flag for none.
	fFleet       = fInUse4h + 1
	fFleetBucket = fFleet + 1
	fFlow        = fFleetBucket + numFleetBuckets
	fGroup       = fFlow + 1
	fGroupBucket = fGroup + 1
	fNoContext   = fGroupBucket + numFleetBuckets
	fSeason      = fNoContext + 1 // this desktop's seasonal log-odds of an arrival within the horizon
	// Time since the owner was last active, crossed with the hour of the day and whether
	// it is a weekend: how soon a desktop is taken again after its owner left depends on
	// the time of day, which the seasonal rate and the idle buckets, added on the log-odds
	// scale, cannot say alone.
	fIdleByHour = fSeason + 1
	// Calendar features: the log of the fleet's arrival rate on this day of the year, and
	// in this quarter of it, in the years the pool has seen, over its usual rate on that
	// weekday (and quarter). They anticipate terms, breaks and closures.
	fCalendarDay     = fIdleByHour + numDayTypes*hoursPerDay*numIdleBuckets
	fCalendarQuarter = fCalendarDay + 1
	numFeatures      = fCalendarQuarter + 1

	// maxActive bounds the features set at once in one horizon's vector.
	maxActive = 22
)

// Day types and hours of the fIdleByHour cross.
const (
	numDayTypes = 2 // weekday, weekend
	hoursPerDay = 24
)

// idleByHour returns the index of the fIdleByHour feature for wall time t and idle bucket b.
func idleByHour(t int64, b int) int {
	dayType := 0
	if wd := weekday(t); wd == 0 || wd == 6 {
		dayType = 1
	}
	hour := int(floorMod(t, msDay) / msHour)
	return fIdleByHour + (dayType*hoursPerDay+hour)*numIdleBuckets + b
}

// weekday returns the day of the week of a wall-clock time, 0 for Sunday.
func weekday(ms int64) int {
	// 1970-01-01 was a Thursday.
	return int(floorMod(floorDiv(ms, msDay)+4, 7))
}

func bucket(v float64, edges []float64) int {
	for i, e := range edges {
		if v < e {
			return i
		}
	}
	return len(edges)
}

// features is one feature vector per horizon.
type features struct {
	Idx [numHorizons][maxActive]uint16
	Val [numHorizons][maxActive]float32
	N   [numHorizons]uint8
	_   [3]byte
}

// add sets feature i to v in every horizon's vector.
func (f *features) add(i int, v float64) {
	for j := range numHorizons {
		f.addH(j, i, v)
	}
}

// addH sets feature i to v in horizon j's vector.
func (f *features) addH(j, i int, v float64) {
	n := f.N[j]
	f.Idx[j][n] = uint16(i)
	f.Val[j][n] = float32(v)
	f.N[j] = n + 1
}

// logit returns the log-odds that the weights w plus delta give horizon j.
func (f *features) logit(j int, w *[numFeatures]float64, delta *[numFeatures]float32) float64 {
	var s float64
	idx, val := &f.Idx[j], &f.Val[j]
	for k := range f.N[j] {
		i := idx[k]
		s += (w[i] + float64(delta[i])) * float64(val[k])
	}
	return s
}

func sigmoid(x float64) float64 {
	if x >= 0 {
		return 1 / (1 + math.Exp(-x))
	}
	e := math.Exp(x)
	return e / (1 + e)
}

// seasonLogit turns an integrated hazard into the log-odds of at least one arrival,
// log(e^L - 1), scaled to about unit range.
func seasonLogit(hazard float64) float64 {
	return math.Log(math.Expm1(max(hazard, 1e-6))) / 4
}
