package owner

import (
	"bufio"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"time"
)

// Trace columns. A trace is a CSV file of owner samples:
//
//	# comment lines start with '#'
//	timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked
//	2026-03-02T08:59:00Z,2.5,12288,5400,true
//	2026-03-02T09:00:00.5Z,41,9830,0,false
//
// The first line that is not a comment is a header naming the columns, in any order. The
// five above are required; mem_total_mib and session may follow. A trace whose first line is
// already a row (its first cell a timestamp) has no header and its columns in the order
// above, all seven or the first five: a reader joining a named pipe midway starts at a row.
// Values:
//
//   - timestamp: RFC 3339, with a fraction of a second if wanted; rows must not go back in time.
//   - cpu_percent: the owner's CPU, deskcloud's VMs excluded, as a percentage of all cores
//     (0 to 100); Sample.CPU is this over 100.
//   - mem_available_mib, mem_total_mib: whole MiB.
//   - input_idle_seconds: seconds since the last keyboard or mouse input, fractions allowed.
//   - locked, session: true or false (1 or 0 too).
//
// An empty cell means not observed: the sample's Has bit for it stays clear. A file may start
// with a UTF-8 byte-order mark and end its lines with CRLF.
const (
	ColumnTimestamp    = "timestamp"
	ColumnCPUPercent   = "cpu_percent"
	ColumnMemAvailable = "mem_available_mib"
	ColumnInputIdle    = "input_idle_seconds"
	ColumnLocked       = "locked"
	ColumnMemTotal     = "mem_total_mib"
	ColumnSession      = "session"
)

// traceColumns lists every column in the order TraceWriter writes them; the first five are
// required.
var traceColumns = []string{
	ColumnTimestamp, ColumnCPUPercent, ColumnMemAvailable, ColumnInputIdle, ColumnLocked,
	ColumnMemTotal, ColumnSession,
}

const requiredColumns = 5

// TraceReader reads samples from a trace.
type TraceReader struct {
	csv  *csv.Reader
	col  [7]int // index of each traceColumns entry in a record, -1 if absent
	last time.Time
	// first is the first row of a trace without a header, read while looking for one, and
	// firstLine its line number.
	first     []string
	firstLine int
}

// NewTraceReader reads the header of the trace in r and returns a reader of its samples.
func NewTraceReader(r io.Reader) (*TraceReader, error) {
	br := bufio.NewReader(r)
	if bom, err := br.Peek(3); err == nil && string(bom) == "\uFEFF" {
		br.Discard(3)
	}
	cr := csv.NewReader(br)
	cr.Comment = '#'
	cr.ReuseRecord = true
	header, err := cr.Read()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("trace is empty: want a header line")
		}
		return nil, fmt.Errorf("read trace header: %w", err)
	}
	tr := &TraceReader{csv: cr}
	for i := range tr.col {
		tr.col[i] = -1
	}
	if _, err := time.Parse(time.RFC3339Nano, header[0]); err == nil {
		n := len(header)
		if n != requiredColumns && n != len(traceColumns) {
			return nil, fmt.Errorf("trace line 1: a trace without a header needs %d or %d columns in the documented order, got %d", requiredColumns, len(traceColumns), n)
		}
		for j := range n {
			tr.col[j] = j
		}
		tr.first = slices.Clone(header)
		tr.firstLine, _ = cr.FieldPos(0)
		cr.FieldsPerRecord = n
		return tr, nil
	}
	for i, name := range header {
		j := slices.Index(traceColumns, name)
		switch {
		case j < 0:
			return nil, fmt.Errorf("trace header: unknown column %q, want some of %q", name, traceColumns)
		case tr.col[j] >= 0:
			return nil, fmt.Errorf("trace header: column %q appears twice", name)
		}
		tr.col[j] = i
	}
	for j, name := range traceColumns[:requiredColumns] {
		if tr.col[j] < 0 {
			return nil, fmt.Errorf("trace header: missing column %q, got %q", name, header)
		}
	}
	cr.FieldsPerRecord = len(header)
	return tr, nil
}

// Next returns the next sample, or io.EOF after the last one. Errors name the line.
func (tr *TraceReader) Next() (Sample, error) {
	var rec []string
	var line int
	if tr.first != nil {
		rec, line, tr.first = tr.first, tr.firstLine, nil
	} else {
		var err error
		if rec, err = tr.csv.Read(); err != nil {
			return Sample{}, err
		}
		line, _ = tr.csv.FieldPos(0)
	}
	s, err := tr.parse(rec)
	if err != nil {
		return Sample{}, fmt.Errorf("trace line %d: %w", line, err)
	}
	if s.Time.Before(tr.last) {
		return Sample{}, fmt.Errorf("trace line %d: timestamp %s is before the previous row's %s", line, s.Time.Format(time.RFC3339Nano), tr.last.Format(time.RFC3339Nano))
	}
	tr.last = s.Time
	return s, nil
}

func (tr *TraceReader) parse(rec []string) (Sample, error) {
	cell := func(j int) string {
		if tr.col[j] < 0 {
			return ""
		}
		return rec[tr.col[j]]
	}
	var s Sample
	var errs []error
	ts := cell(0)
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		errs = append(errs, fmt.Errorf("%s must be an RFC 3339 time, got %q", ColumnTimestamp, ts))
	}
	s.Time = t
	if v := cell(1); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f >= 0 && f <= 100) {
			errs = append(errs, fmt.Errorf("%s must be a number from 0 to 100, got %q", ColumnCPUPercent, v))
		}
		s.CPU, s.Has = f/100, s.Has|HasCPU
	}
	for _, m := range []struct {
		j   int
		dst *int
	}{{2, &s.MemAvailableMiB}, {5, &s.MemTotalMiB}} {
		if v := cell(m.j); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				errs = append(errs, fmt.Errorf("%s must be a whole number of MiB, got %q", traceColumns[m.j], v))
			}
			*m.dst, s.Has = n, s.Has|HasMemory
		}
	}
	if v := cell(3); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f >= 0 && f < math.MaxInt64/float64(time.Second)) {
			errs = append(errs, fmt.Errorf("%s must be zero or more seconds, got %q", ColumnInputIdle, v))
		}
		s.InputIdle, s.Has = time.Duration(f*float64(time.Second)), s.Has|HasInput
	}
	for _, b := range []struct {
		j    int
		dst  *bool
		flag Fields
	}{{4, &s.Locked, HasLocked}, {6, &s.Session, HasSession}} {
		if v := cell(b.j); v != "" {
			on, err := strconv.ParseBool(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s must be true or false, got %q", traceColumns[b.j], v))
			}
			*b.dst, s.Has = on, s.Has|b.flag
		}
	}
	return s, errors.Join(errs...)
}

// TraceWriter writes samples as a trace that TraceReader reads back.
type TraceWriter struct {
	csv *csv.Writer
	rec []string
	err error
}

// NewTraceWriter writes a trace header to w and returns a writer of samples. Call Flush at
// the end.
func NewTraceWriter(w io.Writer) *TraceWriter {
	tw := &TraceWriter{csv: csv.NewWriter(w), rec: make([]string, len(traceColumns))}
	tw.err = tw.csv.Write(traceColumns)
	return tw
}

// Write writes one sample; fields missing from s.Has are left empty.
func (tw *TraceWriter) Write(s Sample) error {
	if tw.err != nil {
		return tw.err
	}
	clear(tw.rec)
	tw.rec[0] = s.Time.Format(time.RFC3339Nano)
	if s.Has&HasCPU != 0 {
		tw.rec[1] = strconv.FormatFloat(s.CPU*100, 'f', -1, 64)
	}
	if s.Has&HasMemory != 0 {
		tw.rec[2], tw.rec[5] = strconv.Itoa(s.MemAvailableMiB), strconv.Itoa(s.MemTotalMiB)
	}
	if s.Has&HasInput != 0 {
		tw.rec[3] = strconv.FormatFloat(s.InputIdle.Seconds(), 'f', -1, 64)
	}
	if s.Has&HasLocked != 0 {
		tw.rec[4] = strconv.FormatBool(s.Locked)
	}
	if s.Has&HasSession != 0 {
		tw.rec[6] = strconv.FormatBool(s.Session)
	}
	tw.err = tw.csv.Write(tw.rec)
	return tw.err
}

// Flush writes out anything buffered and returns the first error of any write.
func (tw *TraceWriter) Flush() error {
	tw.csv.Flush()
	if tw.err != nil {
		return tw.err
	}
	return tw.csv.Error()
}

// ReplayConfig configures a Replay.
type ReplayConfig struct {
	// Speed is trace time per unit of clock time: 1 replays in real time, 3600 plays an hour
	// a second, and 0 plays as fast as emit returns, ignoring the clock.
	Speed float64
	// Clock paces the replay when Speed is above 0; default SystemClock.
	Clock Clock
	// Start, unless zero, shifts every timestamp so the trace begins at Start.
	Start time.Time
	// StartNow, when Start is zero, shifts every timestamp so the trace begins when its first
	// row is read: for a trace file played live, or a named pipe written as a test goes.
	StartNow bool
}

// Replay is a [Source] that plays a trace, for tests, demos and simulators. Its samples carry
// the trace's timestamps (shifted to Start if set), so whatever consumes them sees trace time,
// however fast the replay runs.
type Replay struct {
	r   io.Reader
	cfg ReplayConfig
}

// NewReplay returns a Replay of the trace in r; the trace is read as Run goes.
func NewReplay(r io.Reader, cfg ReplayConfig) *Replay {
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	return &Replay{r: r, cfg: cfg}
}

// Name returns "replay".
func (rp *Replay) Name() string { return "replay" }

// Run plays the trace until its end, returning nil, or until ctx ends.
func (rp *Replay) Run(ctx context.Context, emit func(Sample)) error {
	if !(rp.cfg.Speed >= 0) || math.IsInf(rp.cfg.Speed, 0) {
		return fmt.Errorf("replay: speed must be zero or more, got %v", rp.cfg.Speed)
	}
	tr, err := NewTraceReader(rp.r)
	if err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	var traceStart, clockStart time.Time
	var shift time.Duration
	for n := 0; ; n++ {
		s, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("replay: %w", err)
		}
		if n == 0 {
			traceStart, clockStart = s.Time, rp.cfg.Clock.Now()
			switch {
			case !rp.cfg.Start.IsZero():
				shift = rp.cfg.Start.Sub(traceStart)
			case rp.cfg.StartNow:
				shift = clockStart.Sub(traceStart)
			}
		}
		if rp.cfg.Speed > 0 {
			due := clockStart.Add(time.Duration(float64(s.Time.Sub(traceStart)) / rp.cfg.Speed))
			if wait := due.Sub(rp.cfg.Clock.Now()); wait > 0 {
				select {
				case <-ctx.Done():
					return nil
				case <-rp.cfg.Clock.After(wait):
				}
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		s.Time = s.Time.Add(shift)
		emit(s)
	}
}
