// Package synth generates synthetic desktop activity with a known weekly structure, and
// writes it in the trace formats, for tests and benchmarks. Nothing here comes from a real
// trace.
package synth

import (
	"fmt"
	"io"
	"math/rand/v2"
	"sort"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// Event is one state change of one desktop.
type Event struct {
	Node  string
	Time  time.Time
	State predictor.State
}

// Office returns the activity of one office desktop over the given weeks from the Monday
// on or after from: on weekdays its owner arrives around 09:00, goes to lunch around
// 12:15, is back around 13:15 and leaves around 17:30, each time give or take a quarter of
// an hour; now and then a day is skipped, and weekends are empty. The desktop restarts
// every night. The same seed gives the same events.
func Office(seed uint64, node string, from time.Time, weeks int) []Event {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	day := time.Date(from.Year(), from.Month(), from.Day(), 0, 0, 0, 0, time.UTC)
	for day.Weekday() != time.Monday {
		day = day.AddDate(0, 0, 1)
	}
	at := func(d time.Time, hour, minute float64, jitter float64) time.Time {
		m := hour*60 + minute + r.NormFloat64()*jitter
		return d.Add(time.Duration(m * float64(time.Minute)))
	}
	var evs []Event
	add := func(t time.Time, s predictor.State) { evs = append(evs, Event{Node: node, Time: t, State: s}) }
	add(day.Add(-time.Hour), predictor.Available)
	for d := range weeks * 7 {
		date := day.AddDate(0, 0, d)
		add(date.Add(2*time.Hour), predictor.Offline)
		add(date.Add(2*time.Hour+3*time.Minute), predictor.Restarted)
		if date.Weekday() == time.Saturday || date.Weekday() == time.Sunday || r.Float64() < 0.08 {
			continue
		}
		add(at(date, 9, 0, 15), predictor.InUse)
		add(at(date, 12, 15, 10), predictor.Available)
		add(at(date, 13, 15, 10), predictor.InUse)
		add(at(date, 17, 30, 15), predictor.Available)
	}
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Time.Before(evs[j].Time) })
	return evs
}

// Fleet returns the merged, time-ordered activity of n office desktops named prefix001,
// prefix002 and so on.
func Fleet(seed uint64, prefix string, n int, from time.Time, weeks int) []Event {
	var evs []Event
	for i := range n {
		evs = append(evs, Office(seed+uint64(i)*7919, fmt.Sprintf("%s%03d", prefix, i+1), from, weeks)...)
	}
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Time.Before(evs[j].Time) })
	return evs
}

// WriteLogons writes events in the headerless `machine,state,timestamp` format of the
// library trace: with a byte-order mark and CRLF line endings when asked.
func WriteLogons(w io.Writer, evs []Event, bom, crlf bool) error {
	eol := "\n"
	if crlf {
		eol = "\r\n"
	}
	if bom {
		if _, err := io.WriteString(w, "\uFEFF"); err != nil {
			return err
		}
	}
	for _, e := range evs {
		if _, err := fmt.Fprintf(w, "%s,%s,%s%s", e.Node, e.State, e.Time.Format("2006-01-02 15:04:05.000"), eol); err != nil {
			return err
		}
	}
	return nil
}
