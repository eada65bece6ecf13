package predictor_test

import (
	"errors"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/predictor"
)

// officeHours is an owner at the desktop Monday to Friday from 09:00 to 17:00, idle over
// lunch, and away otherwise.
func officeHours(t time.Time) owner.State {
	if wd := t.Weekday(); wd == time.Saturday || wd == time.Sunday {
		return owner.StateAway
	}
	switch h := t.Hour(); {
	case h == 12:
		return owner.StateIdle
	case h >= 9 && h < 17:
		return owner.StateActive
	}
	return owner.StateAway
}

// feed observes the owner every 5 minutes in [from, to), as the driver's sensing goroutine
// would, with states from pattern.
func feed(l *predictor.Live, from, to time.Time, pattern func(time.Time) owner.State) {
	for at := from; at.Before(to); at = at.Add(5 * time.Minute) {
		l.Observe(at, pattern(at))
	}
}

func newLive(t testing.TB, cfg predictor.LiveConfig) *predictor.Live {
	t.Helper()
	l, err := predictor.NewLive(cfg)
	must.NoError(t, err)
	return l
}

var liveKeys = []string{predictor.AttrReturn5m, predictor.AttrReturn15m, predictor.AttrReturn60m, predictor.AttrIdleMinutes}

// wellFormed checks that attrs holds every published key, that each probability is a number
// from 0 to 1 with at most one decimal, never decreasing with the horizon, and that the idle
// minutes are one of the buckets. It returns the parsed probabilities and idle minutes.
func wellFormed(t *testing.T, attrs map[string]string) (p [3]float64, idle int) {
	t.Helper()
	must.MapLen(t, len(liveKeys), attrs, must.Sprintf("want exactly the keys %v, got %v", liveKeys, attrs))
	for i, k := range liveKeys[:3] {
		v, err := strconv.ParseFloat(attrs[k], 64)
		must.NoError(t, err, must.Sprintf("%s = %q", k, attrs[k]))
		must.Between(t, 0, v, 1, must.Sprintf("%s = %q", k, attrs[k]))
		must.Eq(t, math.Round(v*10), v*10, must.Sprintf("%s = %q must have at most one decimal", k, attrs[k]))
		must.Eq(t, strconv.FormatFloat(v, 'f', -1, 64), attrs[k], must.Sprintf("%s must be written as short as it can be", k))
		p[i] = v
	}
	must.LessEq(t, p[1], p[0], must.Sprintf("return_5m must not exceed return_15m: %v", attrs))
	must.LessEq(t, p[2], p[1], must.Sprintf("return_15m must not exceed return_60m: %v", attrs))
	idle, err := strconv.Atoi(attrs[predictor.AttrIdleMinutes])
	must.NoError(t, err, must.Sprintf("idle_minutes = %q", attrs[predictor.AttrIdleMinutes]))
	must.SliceContains(t, predictor.IdleMinuteBuckets[:], idle, must.Sprintf("idle_minutes = %d is not a bucket", idle))
	return p, idle
}

func TestLiveStateMapping(t *testing.T) {
	type want int
	const (
		empty   want = iota // no attributes: nothing known
		present             // the owner is at the desktop
		away                // the owner is away: the desktop is harvestable
	)
	tests := []struct {
		name   string
		states []owner.State
		want   want
	}{
		{"unknown is ignored", []owner.State{owner.StateUnknown}, empty},
		{"active is present", []owner.State{owner.StateActive}, present},
		{"idle is present", []owner.State{owner.StateIdle}, present},
		{"away is away", []owner.State{owner.StateAway}, away},
		{"unknown after active is ignored", []owner.State{owner.StateActive, owner.StateUnknown}, present},
		{"unknown after away is ignored", []owner.State{owner.StateAway, owner.StateUnknown}, away},
		{"idle after away is present", []owner.State{owner.StateAway, owner.StateIdle}, present},
		{"away after active is away", []owner.State{owner.StateActive, owner.StateAway}, away},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newLive(t, predictor.LiveConfig{})
			at := monday.Add(10 * time.Hour)
			for _, s := range tc.states {
				at = at.Add(time.Minute)
				l.Observe(at, s)
			}
			attrs := l.Attributes(at.Add(time.Minute))
			switch tc.want {
			case empty:
				must.MapEmpty(t, attrs)
			case present:
				wellFormed(t, attrs)
				must.Eq(t, map[string]string{
					predictor.AttrReturn5m:    "1",
					predictor.AttrReturn15m:   "1",
					predictor.AttrReturn60m:   "1",
					predictor.AttrIdleMinutes: "0",
				}, attrs)
			case away:
				p, idle := wellFormed(t, attrs)
				// The default prior expects an owner back about once in ten idle hours.
				must.Less(t, 1, p[2], must.Sprintf("an away owner is not certain to be back within the hour: %v", attrs))
				must.Positive(t, idle, must.Sprintf("an away owner leaves idle time: %v", attrs))
			}
		})
	}
}

func TestLiveAttributesBeforeAndAfterObserving(t *testing.T) {
	l := newLive(t, predictor.LiveConfig{})
	must.MapEmpty(t, l.Attributes(monday), must.Sprint("nothing observed yet, nothing to publish"))

	feed(l, monday, monday.AddDate(0, 0, 14), officeHours)
	end := monday.AddDate(0, 0, 14)
	for _, at := range []time.Time{end, end.Add(3 * time.Hour), end.Add(8*time.Hour + 30*time.Minute)} {
		wellFormed(t, l.Attributes(at))
	}
	must.Positive(t, l.Samples(), must.Sprint("two weeks away from the desktop must give learning samples"))
}

func TestLiveLearnsWeeklyPattern(t *testing.T) {
	const weeks = 4
	l := newLive(t, predictor.LiveConfig{})
	feed(l, monday, monday.AddDate(0, 0, 7*weeks), officeHours)

	// The Monday after: the owner has been away since Friday 17:00.
	day := monday.AddDate(0, 0, 7*weeks)
	night, morning := day.Add(3*time.Hour), day.Add(8*time.Hour+30*time.Minute)
	feed(l, day, night, officeHours)
	atNight := l.Attributes(night)
	feed(l, night, morning, officeHours)
	atMorning := l.Attributes(morning)
	t.Logf("03:00 %v; 08:30 %v; %d samples", atNight, atMorning, l.Samples())

	pNight, idleNight := wellFormed(t, atNight)
	pMorning, idleMorning := wellFormed(t, atMorning)
	must.Greater(t, pNight[2], pMorning[2], must.Sprintf(
		"an owner who comes in at 09:00 every weekday should be likelier back within the hour at 08:30 than at 03:00: return_60m %q at 08:30, %q at 03:00",
		atMorning[predictor.AttrReturn60m], atNight[predictor.AttrReturn60m]))
	must.GreaterEq(t, idleMorning, idleNight, must.Sprintf(
		"more idle time should be left at 03:00 than at 08:30: idle_minutes %d at 03:00, %d at 08:30", idleNight, idleMorning))
}

func TestLiveIgnoresThePast(t *testing.T) {
	l := newLive(t, predictor.LiveConfig{})
	at := monday.Add(10 * time.Hour)
	l.Observe(at, owner.StateActive)
	l.Observe(at.Add(-5*time.Minute), owner.StateAway) // late: ignored
	must.Eq(t, "1", l.Attributes(at)[predictor.AttrReturn60m], must.Sprint("a late away sample must not hide the owner"))

	// Attributes moves the model's clock; a sample before it is late as well.
	wellFormed(t, l.Attributes(at.Add(20*time.Minute)))
	l.Observe(at.Add(15*time.Minute), owner.StateAway)
	must.Eq(t, "1", l.Attributes(at.Add(20 * time.Minute))[predictor.AttrReturn60m])

	// Asking for a time before the last observation forecasts at that observation.
	l.Observe(at.Add(30*time.Minute), owner.StateAway)
	attrs := l.Attributes(at)
	wellFormed(t, attrs)
	must.NotEq(t, "1", attrs[predictor.AttrReturn60m], must.Sprintf("the owner left at 10:30: %v", attrs))
}

func TestLiveStateRoundTrip(t *testing.T) {
	cfg := predictor.LiveConfig{StateFile: filepath.Join(t.TempDir(), "desk.state"), SaveEvery: 24 * time.Hour}
	a := newLive(t, cfg)
	end := monday.AddDate(0, 0, 14)
	feed(a, monday, end, officeHours)
	samples := a.Samples()
	must.Positive(t, samples)
	must.NoError(t, a.Close())
	a.Observe(end.Add(time.Hour), owner.StateAway) // after Close: ignored, not saved
	must.NoError(t, a.Close(), must.Sprint("closing twice is harmless"))

	b := newLive(t, cfg)
	must.NoError(t, b.Warning())
	must.Eq(t, samples, b.Samples(), must.Sprint("the samples learned before Close must carry over"))
	must.MapEmpty(t, b.Attributes(end), must.Sprint("a restarted Live does not know where the owner is until it observes"))

	feed(b, end, end.AddDate(0, 0, 7), officeHours)
	must.Greater(t, samples, b.Samples(), must.Sprint("the loaded model must go on learning"))
	wellFormed(t, b.Attributes(end.AddDate(0, 0, 7)))
	must.NoError(t, b.Close())
}

func TestLiveSavesAtMostEverySaveEvery(t *testing.T) {
	path := filepath.Join(t.TempDir(), "desk.state")
	l := newLive(t, predictor.LiveConfig{StateFile: path, SaveEvery: time.Hour})
	read := func() []byte {
		t.Helper()
		b, err := os.ReadFile(path)
		must.NoError(t, err)
		return b
	}
	at := monday.Add(18 * time.Hour)
	l.Observe(at, owner.StateAway)
	first := read()

	feed(l, at, at.Add(55*time.Minute), func(time.Time) owner.State { return owner.StateAway })
	must.Eq(t, first, read(), must.Sprint("the state must not be written again within SaveEvery"))

	l.Observe(at.Add(time.Hour), owner.StateAway)
	second := read()
	must.NotEq(t, first, second, must.Sprint("the state must be written again once SaveEvery has passed"))
	m, err := predictor.ReadModelFile(path, predictor.NewPool(), predictor.LearnDesktop)
	must.NoError(t, err)
	must.Eq(t, l.Samples(), m.Samples(), must.Sprint("the saved state must include the hour just learned"))
	must.NoError(t, l.Close())
}

func TestLiveTornStateFileStartsAfresh(t *testing.T) {
	path := filepath.Join(t.TempDir(), "desk.state")
	must.NoError(t, os.WriteFile(path, []byte("DCPM torn in half"), 0o600))

	l, err := predictor.NewLive(predictor.LiveConfig{StateFile: path, SaveEvery: 24 * time.Hour})
	must.NoError(t, err, must.Sprint("a torn state file is not an error"))
	must.True(t, errors.Is(l.Warning(), predictor.ErrCorrupt), must.Sprintf("want a warning wrapping ErrCorrupt, got %v", l.Warning()))
	must.Eq(t, 0, l.Samples())
	_, err = os.Stat(path)
	must.True(t, errors.Is(err, fs.ErrNotExist), must.Sprint("the torn file must be removed"))

	feed(l, monday, monday.AddDate(0, 0, 7), officeHours)
	must.NoError(t, l.Close())
	m, err := predictor.ReadModelFile(path, predictor.NewPool(), predictor.LearnDesktop)
	must.NoError(t, err, must.Sprint("Close must write a sound state file in its place"))
	must.Eq(t, l.Samples(), m.Samples())
}

func TestNewLiveConfig(t *testing.T) {
	dir := t.TempDir()
	poolFile := filepath.Join(dir, "pool")
	must.NoError(t, predictor.WritePoolFile(poolFile, predictor.NewPool()))

	tests := []struct {
		name string
		cfg  predictor.LiveConfig
		err  bool
	}{
		{"defaults", predictor.LiveConfig{}, false},
		{"pool file", predictor.LiveConfig{PoolFile: poolFile}, false},
		{"missing pool file", predictor.LiveConfig{PoolFile: filepath.Join(dir, "none")}, true},
		{"negative save interval", predictor.LiveConfig{SaveEvery: -time.Minute}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := predictor.NewLive(tc.cfg)
			if tc.err {
				must.Error(t, err)
				must.Nil(t, l)
				return
			}
			must.NoError(t, err)
			must.NoError(t, l.Warning())
			must.NoError(t, l.Close())
		})
	}
}

func TestLiveConcurrentUse(t *testing.T) {
	// Run with -race: the sensing goroutine observes while fingerprinting reads.
	l := newLive(t, predictor.LiveConfig{StateFile: filepath.Join(t.TempDir(), "desk.state"), SaveEvery: time.Hour})
	end := monday.AddDate(0, 0, 7)
	var wg sync.WaitGroup
	wg.Go(func() { feed(l, monday, end, officeHours) })
	results := make([]map[string]string, 0, 7*24)
	wg.Go(func() {
		for at := monday; at.Before(end); at = at.Add(time.Hour) {
			results = append(results, l.Attributes(at))
		}
	})
	wg.Wait()
	for _, attrs := range results {
		if len(attrs) > 0 {
			wellFormed(t, attrs)
		}
	}
	wellFormed(t, l.Attributes(end))
	must.NoError(t, l.Close())
}

// BenchmarkLiveAttributes measures one fingerprint's attributes, the forecast computed
// afresh at a new time, on a model that has learned 12 weeks of office hours.
func BenchmarkLiveAttributes(b *testing.B) {
	l := newLive(b, predictor.LiveConfig{})
	at := monday.AddDate(0, 0, 7*12)
	feed(l, monday, at, officeHours)
	b.ReportAllocs()
	for b.Loop() {
		at = at.Add(30 * time.Second) // Nomad's fingerprint period
		if len(l.Attributes(at)) == 0 {
			b.Fatal("no attributes")
		}
	}
}

func TestLiveForecast(t *testing.T) {
	l := newLive(t, predictor.LiveConfig{})
	_, ok := l.Forecast(monday)
	must.False(t, ok, must.Sprint("nothing observed yet, no forecast"))

	feed(l, monday, monday.AddDate(0, 0, 7), officeHours)
	at := monday.AddDate(0, 0, 7).Add(8*time.Hour + 30*time.Minute) // Monday 08:30, away
	feed(l, monday.AddDate(0, 0, 7), at, officeHours)
	f, ok := l.Forecast(at)
	must.True(t, ok)
	must.True(t, f.OwnerAway)
	attrs := l.Attributes(at)
	p60, err := strconv.ParseFloat(attrs[predictor.AttrReturn60m], 64)
	must.NoError(t, err)
	// The attribute is the full forecast rounded to one decimal.
	must.InDelta(t, p60, f.P[len(f.P)-1], 0.05+1e-9, must.Sprintf("return_60m %q against P %v", attrs[predictor.AttrReturn60m], f.P))

	l.Observe(at.Add(time.Minute), owner.StateActive)
	f, ok = l.Forecast(at.Add(time.Minute))
	must.True(t, ok)
	must.False(t, f.OwnerAway, must.Sprint("the owner is at the desktop"))
}
