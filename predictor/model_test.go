package predictor_test

import (
	"errors"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/internal/synth"
	"github.com/deskcloud/deskcloud/predictor/metrics"
)

var monday = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) // a Monday

// scored is what replaying a desktop's events yields: at each harvestable moment from a
// point on, the forecast and whether the owner did arrive within 15 minutes.
type scored struct {
	probs, base []float64
	labels      []bool
}

// replay feeds events to m, and from scoreFrom on forecasts every 5 minutes while the
// desktop is harvestable. base is the base rate the baseline forecasts.
func replay(t *testing.T, m *predictor.Model, evs []synth.Event, scoreFrom time.Time, base float64) scored {
	t.Helper()
	const h = 2 // index of the 15-minute horizon
	var out scored
	var arrivals []time.Time
	for i, e := range evs {
		if e.State == predictor.InUse && i > 0 && evs[i-1].State != predictor.InUse {
			arrivals = append(arrivals, e.Time)
		}
	}
	next := 0 // first arrival after the current moment
	state := predictor.Unknown
	for i, e := range evs {
		if i > 0 {
			for at := evs[i-1].Time.Truncate(predictor.SampleEvery).Add(predictor.SampleEvery); at.Before(e.Time); at = at.Add(predictor.SampleEvery) {
				if at.Before(scoreFrom) || !state.Harvestable() {
					continue
				}
				f, err := m.Forecast(at)
				must.NoError(t, err)
				for next < len(arrivals) && !arrivals[next].After(at) {
					next++
				}
				label := next < len(arrivals) && !arrivals[next].After(at.Add(predictor.Horizons[h]))
				out.probs = append(out.probs, f.P[h])
				out.base = append(out.base, base)
				out.labels = append(out.labels, label)
			}
		}
		must.NoError(t, m.Observe(e.Time, e.State))
		state = e.State
	}
	return out
}

func TestModelLearnsWeeklyPattern(t *testing.T) {
	evs := synth.Office(1, "desk001", monday, 30)
	scoreFrom := monday.AddDate(0, 0, 7*24)

	m := predictor.NewModel(predictor.NewPool(), predictor.LearnDesktop)
	got := replay(t, m, evs, scoreFrom, 0)
	var pos float64
	for _, l := range got.labels {
		if l {
			pos++
		}
	}
	base := pos / float64(len(got.labels))
	for i := range got.base {
		got.base[i] = base
	}
	must.Greater(t, 100, len(got.labels), must.Sprint("too few scored moments"))
	must.Greater(t, 5, pos, must.Sprint("too few arrivals to score"))

	auc := metrics.ROCAUC(got.probs, got.labels)
	skill := metrics.BrierSkill(got.probs, got.labels)
	baseSkill := metrics.BrierSkill(got.base, got.labels)
	t.Logf("auc %.3f, brier skill %.3f (base rate %.4f scores %.3f), after %d samples", auc, skill, base, baseSkill, m.Samples())
	must.Greater(t, 0.9, auc, must.Sprintf("a weekly pattern should rank arrivals well, got auc %.3f", auc))
	must.Greater(t, 0.2, skill, must.Sprintf("the model should beat the base rate, got brier skill %.3f", skill))
	must.Greater(t, baseSkill, skill)
}

func TestModelUntrainedForecastsFromPool(t *testing.T) {
	// A desktop never seen forecasts from the pool alone, and sensibly.
	m := predictor.NewModel(predictor.NewPool(), predictor.LearnNone)
	f, err := m.Forecast(monday.Add(10 * time.Hour))
	must.NoError(t, err)
	must.True(t, f.OwnerAway)
	for i, p := range f.P {
		must.Between(t, 0, p, 1, must.Sprintf("P[%d]", i))
	}
	must.Positive(t, f.ExpectedIdle)
}

func TestModelForecastShape(t *testing.T) {
	evs := synth.Office(2, "desk002", monday, 6)
	m := predictor.NewModel(predictor.NewPool(), predictor.LearnDesktop)
	for i, e := range evs[:len(evs)-1] {
		must.NoError(t, m.Observe(e.Time, e.State))
		at := e.Time.Add(evs[i+1].Time.Sub(e.Time) / 2)
		f, err := m.Forecast(at)
		must.NoError(t, err)
		must.Eq(t, e.State.OwnerAway(), f.OwnerAway)
		if !f.OwnerAway {
			must.Eq(t, [5]float64{1, 1, 1, 1, 1}, f.P, must.Sprint("an owner at the desktop is active within every horizon"))
			must.Eq(t, 0, f.ExpectedIdle)
			continue
		}
		for i := range f.P {
			must.Between(t, 0, f.P[i], 1)
			if i > 0 {
				must.GreaterEq(t, f.P[i-1], f.P[i], must.Sprintf("P must not decrease with the horizon: %v", f.P))
			}
		}
		must.Between(t, 0, f.ExpectedIdle, predictor.ExpectedIdleCap)
	}
}

func TestModelRejectsThePast(t *testing.T) {
	m := predictor.NewModel(predictor.NewPool(), predictor.LearnDesktop)
	must.NoError(t, m.Observe(monday.Add(time.Hour), predictor.Available))
	must.NoError(t, m.Observe(monday.Add(2*time.Hour), predictor.InUse))
	tests := []struct {
		name string
		call func() error
	}{
		{"observe", func() error { return m.Observe(monday.Add(time.Hour), predictor.Available) }},
		{"advance", func() error { return m.Advance(monday) }},
		{"forecast", func() error { _, err := m.Forecast(monday); return err }},
		{"unknown state", func() error { return m.Observe(monday.Add(3*time.Hour), predictor.Unknown) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			must.Error(t, err)
			if tc.name != "unknown state" {
				must.True(t, errors.Is(err, predictor.ErrPast), must.Sprintf("want ErrPast, got %v", err))
			}
		})
	}
}

func TestModelContextChangesForecast(t *testing.T) {
	// A pool trained with a fleet context that predicts arrivals must move the forecast
	// when the context changes, and must still forecast without one.
	pool := predictor.NewPool()
	evs := synth.Fleet(3, "lab", 8, monday, 8)
	models := map[string]*predictor.Model{}
	busy := map[string]bool{}
	for _, e := range evs {
		m := models[e.Node]
		if m == nil {
			m = predictor.NewModel(pool, predictor.LearnFleet)
			models[e.Node] = m
		}
		busy[e.Node] = e.State == predictor.InUse
		n := 0
		for _, b := range busy {
			if b {
				n++
			}
		}
		for _, m := range models {
			m.SetContext(predictor.Context{FleetInUse: float64(n) / 8, FleetArrivals: -1, GroupInUse: -1})
		}
		must.NoError(t, m.Observe(e.Time, e.State))
	}
	at := monday.AddDate(0, 0, 7*8).Add(8*time.Hour + 50*time.Minute) // the Monday after, 08:50
	probe := models["lab001"]
	probe.SetLearning(predictor.LearnNone)
	var p [3]float64
	for i, c := range []predictor.Context{{FleetInUse: 0, FleetArrivals: -1, GroupInUse: -1}, {FleetInUse: 0.9, FleetArrivals: -1, GroupInUse: -1}, predictor.NoContext} {
		probe.SetContext(c)
		f, err := probe.Forecast(at)
		must.NoError(t, err)
		p[i] = f.P[4]
	}
	t.Logf("P(within 1h) with the fleet idle %.4f, busy %.4f, unknown %.4f", p[0], p[1], p[2])
	must.NotEq(t, p[0], p[1], must.Sprint("the fleet context should matter"))
	must.Between(t, 0, p[2], 1)
}

func TestParseState(t *testing.T) {
	tests := []struct {
		in   string
		want predictor.State
		err  bool
	}{
		{"in-use", predictor.InUse, false},
		{"available", predictor.Available, false},
		{"offline", predictor.Offline, false},
		{"restarted", predictor.Restarted, false},
		{"In-Use", predictor.Unknown, true},
		{"", predictor.Unknown, true},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := predictor.ParseState(tc.in)
			if tc.err {
				must.Error(t, err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
			must.Eq(t, tc.in, got.String())
		})
	}
}

func TestModelForeseesAClosureFromThePoolsCalendar(t *testing.T) {
	// A lab that closes for the week of the 47th Sunday-started week of the year, two years
	// running. In the third year, the pool's calendar should make the Monday of that week
	// look quiet before anyone has failed to turn up, which the desktop's own history, an
	// ordinary week so far, cannot say.
	first := time.Date(2023, time.January, 2, 0, 0, 0, 0, time.UTC) // a Monday
	closure := func(year int) time.Time {
		d := time.Date(year, time.January, 1, 0, 0, 0, 0, time.UTC)
		for d.Weekday() != time.Sunday {
			d = d.AddDate(0, 0, 1)
		}
		return d.AddDate(0, 0, 7*46+1) // the Monday of the 47th week that starts on a Sunday
	}
	var evs []synth.Event
	for _, e := range synth.Fleet(5, "lab", 3, first, 2*52+50) {
		if c := closure(e.Time.Year()); e.Time.Year() < 2025 && !e.Time.Before(c) && e.Time.Before(c.AddDate(0, 0, 5)) && e.State == predictor.InUse {
			continue
		}
		evs = append(evs, e)
	}
	pool := predictor.NewPool()
	models := map[string]*predictor.Model{}
	probeAt := closure(2025).Add(8*time.Hour + 45*time.Minute)
	weekBefore := probeAt.AddDate(0, 0, -7)
	var lab001 []synth.Event
	for _, e := range evs {
		if !e.Time.Before(weekBefore.AddDate(0, 0, -14)) {
			if e.Node == "lab001" && e.Time.Before(probeAt) {
				lab001 = append(lab001, e)
			}
			continue
		}
		m := models[e.Node]
		if m == nil {
			m = predictor.NewModel(pool, predictor.LearnFleet)
			models[e.Node] = m
		}
		must.NoError(t, m.Observe(e.Time, e.State))
	}

	noCalendar := pool.Clone()
	clear(noCalendar.CalendarA[:])
	clear(noCalendar.CalendarE[:])
	ratio := func(p *predictor.Pool) float64 {
		t.Helper()
		m := predictor.NewModel(p, predictor.LearnNone)
		var before, at float64
		for _, e := range lab001 {
			if !e.Time.Before(weekBefore) && before == 0 {
				f, err := m.Forecast(weekBefore)
				must.NoError(t, err)
				before = f.P[4]
			}
			must.NoError(t, m.Observe(e.Time, e.State))
		}
		f, err := m.Forecast(probeAt)
		must.NoError(t, err)
		at = f.P[4]
		t.Logf("P(within 1h) on Monday 08:45, the week before %.3f, the closure week %.3f", before, at)
		return at / before
	}
	with, without := ratio(pool), ratio(noCalendar)
	must.Less(t, 0.7, with, must.Sprintf("the calendar should make the closure's Monday look quieter than the week before, got ratio %.2f", with))
	must.Greater(t, 0.9, without, must.Sprintf("without the calendar the two Mondays should look alike, got ratio %.2f", without))
}
