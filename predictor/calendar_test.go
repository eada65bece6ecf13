package predictor

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func wall(t time.Time) int64 { return wallMs(t) }

func TestCalendarCell(t *testing.T) {
	at := func(y int, m time.Month, d, h int) int64 { return wall(time.Date(y, m, d, h, 0, 0, 0, time.UTC)) }
	tests := []struct {
		name string
		a, b int64
		same bool
	}{
		{"fourth Thursday of November", at(2014, time.November, 27, 10), at(2015, time.November, 26, 10), true},
		{"a Monday in mid-August, across a leap year", at(2015, time.August, 17, 10), at(2016, time.August, 15, 10), true},
		{"same hour, next day", at(2015, time.August, 17, 10), at(2015, time.August, 18, 10), false},
		{"same day, next quarter", at(2015, time.August, 17, 5), at(2015, time.August, 17, 7), false},
		{"same quarter of the day", at(2015, time.August, 17, 7), at(2015, time.August, 17, 11), true},
		{"same date, other weekday", at(2014, time.August, 17, 10), at(2015, time.August, 17, 10), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ca, wa := calendarCell(tc.a)
			cb, wb := calendarCell(tc.b)
			must.Eq(t, tc.same, ca == cb, must.Sprintf("cells %d and %d", ca, cb))
			if tc.same {
				must.Eq(t, wa, wb, must.Sprint("the same calendar cell must be the same weekday cell"))
			}
		})
	}

	// Every hour of years that start on each weekday, leap or not, has a cell in range.
	for y := 2020; y <= 2028; y++ {
		for d := time.Date(y, 1, 1, 0, 0, 0, 0, time.UTC); d.Year() == y; d = d.Add(time.Hour) {
			c, w := calendarCell(wall(d))
			if c < 0 || c >= calendarCells || w < 0 || w >= weekdayCells {
				t.Fatalf("%s: cell %d of %d, weekday cell %d of %d", d, c, calendarCells, w, weekdayCells)
			}
			if w/quartersPerDay != int(d.Weekday()) {
				t.Fatalf("%s: weekday cell %d, want weekday %d", d, w, d.Weekday())
			}
		}
	}
}

func TestPoolCalendarWaitsForTheDayToEnd(t *testing.T) {
	p := NewPool()
	monday := wall(time.Date(2014, time.November, 24, 10, 0, 0, 0, time.UTC))
	cell, wcell := calendarCell(monday)

	p.addCalendar(monday, 3, 120)
	must.Eq(t, 0, p.CalendarA[cell], must.Sprint("the day in progress must not reach its calendar cell"))
	must.Eq(t, 3, p.WeekdayA[wcell], must.Sprint("the weekday's usual rate counts at once"))
	day, quarter := p.calendar(monday)
	must.Eq(t, 0, day, must.Sprint("a pool that has seen no such day reads an ordinary day"))
	must.Eq(t, 0, quarter)

	p.addCalendar(monday+msDay, 0, 60)
	must.Eq(t, 3, p.CalendarA[cell], must.Sprint("the day joins its cell once the next one begins"))
	must.Eq(t, 120, p.CalendarE[cell])
	next, _ := calendarCell(monday + msDay)
	must.Eq(t, 0, p.CalendarE[next])

	// Idle minutes of a day already over, accounted late, go straight to their cell.
	p.addCalendar(monday-msDay, 0, 90)
	prev, _ := calendarCell(monday - msDay)
	must.Eq(t, 90, p.CalendarE[prev])
}

func TestPoolCalendarRatio(t *testing.T) {
	// Two years of Mondays: the fleet arrives once an idle hour, except that the 47th
	// week's Monday was closed both years.
	p := NewPool()
	first := time.Date(2013, time.January, 7, 0, 0, 0, 0, time.UTC) // a Monday
	var closed time.Time
	for w := range 104 {
		d := first.AddDate(0, 0, 7*w)
		_, week := d.ISOWeek()
		shut := week == 47
		if shut && d.Year() == 2014 {
			closed = d
		}
		for h := range 24 {
			at := wall(d.Add(time.Duration(h) * time.Hour))
			arrivals := 1.0
			if shut {
				arrivals = 0
			}
			p.addCalendar(at, arrivals, 60)
		}
	}
	p.addCalendar(wall(first.AddDate(3, 0, 0)), 0, 0) // close the last day

	day, quarter := p.calendar(wall(closed.AddDate(0, 0, 364).Add(10 * time.Hour)))
	// Two closed days (2,880 idle minutes) against the prior's 600 minutes of an ordinary
	// day: the day reads about -1.8, its quarter (720 minutes) about -0.8.
	must.Less(t, -1.5, day, must.Sprintf("a day closed in the years seen should read quiet, got %.2f", day))
	must.Less(t, -0.6, quarter, must.Sprintf("its quarter too, got %.2f", quarter))
	day, quarter = p.calendar(wall(closed.AddDate(0, 0, 364-7).Add(10 * time.Hour)))
	must.Between(t, -0.1, day, 0.1, must.Sprintf("an ordinary Monday should read about 0, got %.2f", day))
	must.Between(t, -0.1, quarter, 0.1)
}

func TestFeaturesCrossIdleWithTimeOfDay(t *testing.T) {
	// The cross of idle time with the hour and the day type: one feature in its block, the
	// same for the same hour of two weekdays, another for another hour or a weekend.
	cross := func(at time.Time, idle time.Duration) int {
		t.Helper()
		m := NewModel(NewPool(), LearnNone)
		must.NoError(t, m.Observe(at.Add(-idle-time.Hour), InUse))
		must.NoError(t, m.Observe(at.Add(-idle), Available))
		var f features
		m.features(wallMs(at), &f)
		found := -1
		for k := range f.N[0] {
			if i := int(f.Idx[0][k]); i >= fIdleByHour && i < fCalendarDay {
				must.Eq(t, -1, found, must.Sprint("one cross feature at a time"))
				found = i
			}
		}
		must.NotEq(t, -1, found, must.Sprint("no cross feature"))
		return found
	}
	mon11 := time.Date(2015, time.March, 2, 11, 0, 0, 0, time.UTC)
	base := cross(mon11, 7*time.Minute)
	must.Eq(t, base, cross(mon11.AddDate(0, 0, 1).Add(20*time.Minute), 7*time.Minute), must.Sprint("Tuesday 11:20 is Monday 11:00's cell"))
	must.NotEq(t, base, cross(mon11.Add(10*time.Hour), 7*time.Minute), must.Sprint("21:00 is not 11:00"))
	must.NotEq(t, base, cross(mon11.AddDate(0, 0, 5), 7*time.Minute), must.Sprint("Saturday is not Monday"))
	must.NotEq(t, base, cross(mon11, 70*time.Minute), must.Sprint("idle 70 minutes is not idle 7"))
}

func TestReadModelFileDropsOutOfRangeFeature(t *testing.T) {
	// A file with a valid checksum whose sample names a feature the model does not have is
	// refused, not indexed with.
	m := NewModel(NewPool(), LearnDesktop)
	m.st.Seen = true
	m.st.PendN = 1
	m.st.Pend[0].F.N[0] = 1
	m.st.Pend[0].F.Idx[0][0] = uint16(numFeatures)
	path := filepath.Join(t.TempDir(), "desk.state")
	must.NoError(t, WriteModelFile(path, m))
	_, err := ReadModelFile(path, NewPool(), LearnDesktop)
	must.True(t, errors.Is(err, ErrCorrupt), must.Sprintf("want ErrCorrupt, got %v", err))
}
