package owner

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

const sampleTrace = "\uFEFF# an owner's morning\r\n" +
	"timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked,session\r\n" +
	"2026-03-02T08:59:00Z,2.5,12288,5400,true,true\r\n" +
	"# they arrive\r\n" +
	"2026-03-02T09:00:00.5Z,41,9830,0,false,true\r\n" +
	"2026-03-02T09:00:01Z,,,,,\r\n"

func TestTraceReader(t *testing.T) {
	tr, err := NewTraceReader(strings.NewReader(sampleTrace))
	must.NoError(t, err)
	want := []Sample{
		{Time: t0.Add(-time.Minute), Has: HasCPU | HasMemory | HasInput | HasLocked | HasSession, CPU: 0.025, MemAvailableMiB: 12288, InputIdle: 90 * time.Minute, Locked: true, Session: true},
		{Time: t0.Add(500 * time.Millisecond), Has: HasCPU | HasMemory | HasInput | HasLocked | HasSession, CPU: 0.41, MemAvailableMiB: 9830, Session: true},
		{Time: t0.Add(time.Second)},
	}
	for i, w := range want {
		got, err := tr.Next()
		must.NoError(t, err, must.Sprintf("row %d", i))
		must.Eq(t, w, got, must.Sprintf("row %d", i))
	}
	_, err = tr.Next()
	must.ErrorIs(t, err, io.EOF)
}

func TestTraceReaderErrors(t *testing.T) {
	const header = "timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked\n"
	cases := []struct {
		name  string
		trace string
		want  []string
	}{
		{"empty", "", []string{"trace is empty: want a header line"}},
		{"unknown column", "timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked,cpu\n", []string{`trace header: unknown column "cpu"`}},
		{"missing column", "timestamp,cpu_percent,mem_available_mib,locked\n", []string{`trace header: missing column "input_idle_seconds"`}},
		{"twice", "timestamp,timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked\n", []string{`trace header: column "timestamp" appears twice`}},
		{"bad values", header + "yesterday,120,-1,-5,maybe\n", []string{
			`trace line 2: timestamp must be an RFC 3339 time, got "yesterday"`,
			`cpu_percent must be a number from 0 to 100, got "120"`,
			`mem_available_mib must be a whole number of MiB, got "-1"`,
			`input_idle_seconds must be zero or more seconds, got "-5"`,
			`locked must be true or false, got "maybe"`,
		}},
		{"not a number", header + "2026-03-02T09:00:00Z,NaN,1,1,false\n", []string{`trace line 2: cpu_percent must be a number from 0 to 100, got "NaN"`}},
		{"back in time", header + "2026-03-02T09:00:00Z,1,1,1,false\n2026-03-02T08:00:00Z,1,1,1,false\n", []string{
			"trace line 3: timestamp 2026-03-02T08:00:00Z is before the previous row's 2026-03-02T09:00:00Z",
		}},
		{"wrong field count", header + "2026-03-02T09:00:00Z,1,1\n", []string{"wrong number of fields"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, err := NewTraceReader(strings.NewReader(tc.trace))
			if err == nil {
				for err == nil {
					_, err = tr.Next()
				}
			}
			for _, w := range tc.want {
				must.ErrorContains(t, err, w)
			}
		})
	}
}

func TestTraceRoundTrip(t *testing.T) {
	in := []Sample{
		{Time: t0, Has: HasCPU | HasMemory | HasInput | HasLocked | HasSession, CPU: 0.125, MemAvailableMiB: 2000, MemTotalMiB: 16000, InputIdle: 1500 * time.Millisecond, Locked: true, Session: true},
		{Time: t0.Add(100 * time.Millisecond), Has: HasCPU, CPU: 1},
		{Time: t0.Add(time.Hour), Has: HasInput, InputIdle: time.Hour},
	}
	var buf bytes.Buffer
	tw := NewTraceWriter(&buf)
	for _, s := range in {
		must.NoError(t, tw.Write(s))
	}
	must.NoError(t, tw.Flush())
	tr, err := NewTraceReader(&buf)
	must.NoError(t, err)
	for i, w := range in {
		got, err := tr.Next()
		must.NoError(t, err)
		must.Eq(t, w, got, must.Sprintf("row %d", i))
	}
}

func collect(t *testing.T, src Source) []Sample {
	t.Helper()
	var out []Sample
	must.NoError(t, src.Run(t.Context(), func(s Sample) { out = append(out, s) }))
	return out
}

func TestReplayAsFastAsPossible(t *testing.T) {
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	got := collect(t, NewReplay(strings.NewReader(sampleTrace), ReplayConfig{Start: start}))
	must.SliceLen(t, 3, got)
	must.Eq(t, start, got[0].Time)
	must.Eq(t, start.Add(time.Minute+500*time.Millisecond), got[1].Time)
	must.Eq(t, start.Add(time.Minute+time.Second), got[2].Time)
	must.Eq(t, 0.41, got[1].CPU)
}

// TestReplayPaced plays a trace at 60 times real speed on a fake clock: a sample falls due
// each time the clock passes its trace time divided by the speed.
func TestReplayPaced(t *testing.T) {
	clock := NewFakeClock(t0)
	rp := NewReplay(strings.NewReader(sampleTrace), ReplayConfig{Speed: 60, Clock: clock})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	got := make(chan Sample, 3)
	done := make(chan error, 1)
	go func() { done <- rp.Run(ctx, func(s Sample) { got <- s }) }()

	must.Eq(t, t0.Add(-time.Minute), (<-got).Time) // the first at once
	must.NoError(t, clock.WaitForWaiters(ctx, 1))
	clock.Advance(1 * time.Second) // a trace minute at 60x; the second row is half a second later
	must.NoError(t, clock.WaitForWaiters(ctx, 1))
	must.Eq(t, 0, len(got))
	clock.Advance(10 * time.Millisecond) // 0.5 s of trace is 8.33 ms
	must.Eq(t, t0.Add(500*time.Millisecond), (<-got).Time)
	must.NoError(t, clock.WaitForWaiters(ctx, 1))
	clock.Advance(10 * time.Millisecond)
	must.Eq(t, t0.Add(time.Second), (<-got).Time)
	must.NoError(t, <-done)
}

func TestReplayErrors(t *testing.T) {
	cases := []struct {
		name  string
		cfg   ReplayConfig
		trace string
		want  string
	}{
		{"negative speed", ReplayConfig{Speed: -1}, sampleTrace, "replay: speed must be zero or more, got -1"},
		{"bad header", ReplayConfig{}, "when,what\n", `replay: trace header: unknown column "when", want some of ["timestamp" "cpu_percent" "mem_available_mib" "input_idle_seconds" "locked" "mem_total_mib" "session"]`},
		{"bad row", ReplayConfig{}, "timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked\nnow,1,1,1,false\n", `replay: trace line 2: timestamp must be an RFC 3339 time, got "now"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := NewReplay(strings.NewReader(tc.trace), tc.cfg).Run(t.Context(), func(Sample) {})
			must.EqError(t, err, tc.want)
		})
	}
}

func TestTraceReaderWithoutHeader(t *testing.T) {
	trace := "# joined midway\n2026-03-02T09:00:00Z,41,9830,0,false\n2026-03-02T09:00:01Z,,,2.5,\n"
	tr, err := NewTraceReader(strings.NewReader(trace))
	must.NoError(t, err)
	s, err := tr.Next()
	must.NoError(t, err)
	must.Eq(t, 0.41, s.CPU)
	must.Eq(t, 9830, s.MemAvailableMiB)
	s, err = tr.Next()
	must.NoError(t, err)
	must.Eq(t, HasInput, s.Has, must.Sprint("empty cells stay unobserved"))
	must.Eq(t, 2500*time.Millisecond, s.InputIdle)
	_, err = tr.Next()
	must.ErrorIs(t, err, io.EOF)

	_, err = NewTraceReader(strings.NewReader("2026-03-02T09:00:00Z,41,9830\n"))
	must.ErrorContains(t, err, "trace line 1: a trace without a header needs 5 or 7 columns in the documented order, got 3")
}
