package predictor

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/deskcloud/deskcloud/internal/owner"
)

// Keys of the node attributes Live publishes. The driver prefixes them with its own
// namespace ("driver.deskvm."); schedulers and the autoscaler read them by these names, so
// they are an API and never change.
const (
	// AttrReturn5m is the probability, to one decimal, that the owner is active within 5
	// minutes.
	AttrReturn5m = "forecast.return_5m"
	// AttrReturn15m is as AttrReturn5m within 15 minutes.
	AttrReturn15m = "forecast.return_15m"
	// AttrReturn60m is as AttrReturn5m within an hour.
	AttrReturn60m = "forecast.return_60m"
	// AttrIdleMinutes is the expected idle time left, in minutes, rounded down to one of
	// IdleMinuteBuckets.
	AttrIdleMinutes = "forecast.idle_minutes"
)

// IdleMinuteBuckets are the values AttrIdleMinutes takes, smallest first: the expected idle
// time left is rounded down to the largest of them it reaches.
var IdleMinuteBuckets = [...]int{0, 5, 15, 30, 60, 120, 240}

// DefaultSaveEvery is how often Live persists its model when LiveConfig.SaveEvery is zero.
const DefaultSaveEvery = 5 * time.Minute

// liveReturns maps each published probability to its horizon in Forecast.P.
var liveReturns = [...]struct {
	key string
	i   int
}{
	{AttrReturn5m, horizonIndex(5 * time.Minute)},
	{AttrReturn15m, horizonIndex(15 * time.Minute)},
	{AttrReturn60m, horizonIndex(time.Hour)},
}

// horizonIndex returns the index of h in Horizons. Every published horizon must be one the
// model forecasts, so a missing one is a programming error caught when the package loads.
func horizonIndex(h time.Duration) int {
	for i, x := range Horizons {
		if x == h {
			return i
		}
	}
	panic(fmt.Sprintf("predictor: horizon %s is not in Horizons", h))
}

// LiveConfig configures a Live.
type LiveConfig struct {
	// StateFile is where the model persists between runs of the driver. Empty keeps the
	// model in memory only, so it starts from the pool each time.
	StateFile string
	// PoolFile is the fleet prior a new model starts from, written by WritePoolFile. Empty
	// uses NewPool's default prior.
	PoolFile string
	// SaveEvery bounds how often the model is written to StateFile, measured on the times
	// of the observations. Zero means DefaultSaveEvery.
	SaveEvery time.Duration
	// Logger receives the failures of periodic saves, which Observe cannot return. The
	// zero value discards them.
	Logger zerolog.Logger
}

// Live runs one desktop's model on its node: it turns the stream of owner states sensed
// there into forecasts and publishes them as a few coarse node attributes. The model and
// the owner's activity stay on the node; only the attributes leave it.
//
// A Live is safe for concurrent use: the driver observes from its sensing goroutine and
// reads attributes from fingerprinting.
type Live struct {
	stateFile string
	saveEvery time.Duration
	log       zerolog.Logger
	warning   error

	// saveMu serialises writes of the state file. It is never taken while mu is held.
	saveMu  sync.Mutex
	written uint64 // sequence number of the last snapshot written

	mu      sync.Mutex
	model   *Model
	state   State     // the owner's state as last observed by this Live; Unknown before
	last    time.Time // the latest time the model has been given
	savedAt time.Time // time of the last snapshot taken for saving
	seq     uint64    // sequence number of the last snapshot taken
	closed  bool
}

// NewLive returns a Live whose model is loaded from cfg.StateFile if one is there, or
// starts from the pool if not. A state file that is torn or corrupt is removed and the
// model starts afresh: that is not an error, and Warning says why it happened. The model
// learns its desktop (LearnDesktop).
func NewLive(cfg LiveConfig) (*Live, error) {
	if cfg.SaveEvery < 0 {
		return nil, fmt.Errorf("save interval must not be negative, got %q", cfg.SaveEvery)
	}
	if cfg.SaveEvery == 0 {
		cfg.SaveEvery = DefaultSaveEvery
	}
	pool := NewPool()
	if cfg.PoolFile != "" {
		p, err := ReadPoolFile(cfg.PoolFile)
		if err != nil {
			return nil, fmt.Errorf("load pool: %w", err)
		}
		pool = p
	}
	l := &Live{stateFile: cfg.StateFile, saveEvery: cfg.SaveEvery, log: cfg.Logger}
	if cfg.StateFile != "" {
		m, err := ReadModelFile(cfg.StateFile, pool, LearnDesktop)
		switch {
		case err == nil:
			l.model = m
		case errors.Is(err, fs.ErrNotExist):
		case errors.Is(err, ErrCorrupt):
			l.warning = err
		default:
			return nil, fmt.Errorf("load model: %w", err)
		}
	}
	if l.model == nil {
		l.model = NewModel(pool, LearnDesktop)
	}
	return l, nil
}

// Warning returns why NewLive dropped the state file and started afresh from the pool (an
// error wrapping ErrCorrupt), or nil if it did not.
func (l *Live) Warning() error { return l.warning }

// Samples returns how many samples the model has learned from, this run and the runs
// before it. A model with few samples forecasts mostly from the pool's prior.
func (l *Live) Samples() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.model.Samples()
}

// fromOwner maps an owner state to the model's: an owner who is active or idle is at the
// desktop, one who is away leaves it harvestable. Unknown says nothing.
func fromOwner(st owner.State) State {
	switch st {
	case owner.StateActive, owner.StateIdle:
		return InUse
	case owner.StateAway:
		return Available
	}
	return Unknown
}

// Observe records the owner's state at t. It can be called with every classification, not
// only with changes: the model is told only of changes, and learns from the time passing
// between them whenever it is advanced. An unknown state, or a t before one already seen,
// is ignored. At most every SaveEvery of observed time the model is saved to the state
// file; a failed save is logged and tried again SaveEvery later. Observe after Close is
// ignored.
func (l *Live) Observe(t time.Time, st owner.State) {
	s := fromOwner(st)
	if s == Unknown {
		return
	}
	l.mu.Lock()
	if l.closed || t.Before(l.last) {
		l.mu.Unlock()
		return
	}
	if s != l.state {
		if err := l.model.Observe(t, s); err != nil {
			// Only ErrPast can come here: a model loaded from a run whose clock was ahead
			// of this one's. Its samples wait for the clock to pass it.
			l.mu.Unlock()
			return
		}
		l.state = s
	}
	l.last = t
	var snap *Model
	var seq uint64
	if l.stateFile != "" && t.Sub(l.savedAt) >= l.saveEvery {
		// Advance so that the time since the last change is learned before it is saved.
		if err := l.model.Advance(t); err == nil {
			snap, seq = l.snapshotLocked()
			l.savedAt = t
		}
	}
	l.mu.Unlock()
	if snap != nil {
		if err := l.save(snap, seq); err != nil {
			l.log.Warn().Err(err).Str("state_file", l.stateFile).Msg("save forecast state")
		}
	}
}

// Attributes returns the forecast at now as node attributes, keyed without the driver's
// prefix: AttrReturn5m, AttrReturn15m and AttrReturn60m, the probabilities that the owner
// is active within 5, 15 and 60 minutes, rounded to one decimal ("0.3"; "1" while the
// owner is at the desktop), and AttrIdleMinutes, the expected idle time left in minutes,
// rounded down to one of IdleMinuteBuckets ("0" while the owner is there).
//
// The rounding is deliberate. Nomad re-registers a node with its servers each time a
// fingerprinted attribute changes, so a value at full precision would update every node
// at every fingerprint; coarse values change only when the forecast moves materially,
// and say no more about the owner than a scheduler needs.
//
// The map is empty until this Live has observed a known state: a model loaded from the
// state file does not know whether the owner came back while the driver was down. A now
// before the latest observation is taken as that observation's time.
func (l *Live) Attributes(now time.Time) map[string]string {
	f, ok := l.Forecast(now)
	if !ok {
		return map[string]string{}
	}
	attrs := make(map[string]string, len(liveReturns)+1)
	for _, r := range liveReturns {
		attrs[r.key] = strconv.FormatFloat(math.Round(f.P[r.i]*10)/10, 'f', -1, 64)
	}
	attrs[AttrIdleMinutes] = strconv.Itoa(idleBucket(f.ExpectedIdle))
	return attrs
}

// Forecast returns the full forecast at now, for decisions made on the desktop itself (the
// harvest policy's start, shrink and drain thresholds need more than one decimal). It is
// false until this Live has observed a known state. A now before the latest observation is
// taken as that observation's time.
func (l *Live) Forecast(now time.Time) (Forecast, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.state == Unknown {
		return Forecast{}, false
	}
	if now.Before(l.last) {
		now = l.last
	}
	f, err := l.model.Forecast(now)
	if err != nil {
		// Cannot happen: now is at or after every time the model has been given.
		return Forecast{}, false
	}
	l.last = now
	return f, true
}

// idleBucket rounds d down to the largest of IdleMinuteBuckets it reaches.
func idleBucket(d time.Duration) int {
	b := IdleMinuteBuckets[0]
	for _, x := range IdleMinuteBuckets {
		if d >= time.Duration(x)*time.Minute {
			b = x
		}
	}
	return b
}

// Close saves the model one last time and stops further observations. It returns the
// error of that save; closing again does nothing.
func (l *Live) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	if l.stateFile == "" {
		l.mu.Unlock()
		return nil
	}
	snap, seq := l.snapshotLocked()
	l.mu.Unlock()
	return l.save(snap, seq)
}

// snapshotLocked copies the model's state for saving without holding mu during the write,
// so fingerprinting never waits on the disk. l.mu must be held.
func (l *Live) snapshotLocked() (*Model, uint64) {
	l.seq++
	return &Model{st: l.model.st}, l.seq
}

// save writes snapshot seq to the state file unless a later one has been written already.
func (l *Live) save(snap *Model, seq uint64) error {
	l.saveMu.Lock()
	defer l.saveMu.Unlock()
	if seq <= l.written {
		return nil
	}
	if err := WriteModelFile(l.stateFile, snap); err != nil {
		return err
	}
	l.written = seq
	return nil
}
