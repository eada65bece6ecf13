package trace

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// Headers of the generic formats, compared after trimming and lowercasing.
const (
	headerStates  = "node,timestamp,state"
	headerSamples = "node,timestamp,cpu,idle_seconds"
)

// maxFields bounds the fields split out of one row; more is malformed in every format.
const maxFields = 4

// splitFields splits a row on commas into dst, trimming spaces around each field, and
// returns the number of fields, or maxFields+1 if there are more than maxFields.
func splitFields(line []byte, dst *[maxFields][]byte) int {
	n := 0
	for {
		i := bytes.IndexByte(line, ',')
		if n == maxFields {
			return maxFields + 1
		}
		if i < 0 {
			dst[n] = bytes.TrimSpace(line)
			return n + 1
		}
		dst[n] = bytes.TrimSpace(line[:i])
		n++
		line = line[i+1:]
	}
}

// parseTimestamp parses a naive local timestamp, `2006-01-02 15:04:05` with an optional
// fraction of a second (also with a T between date and time), as UTC; or an RFC 3339
// timestamp with its zone.
func parseTimestamp(b []byte) (time.Time, error) {
	if t, ok := parseNaive(b); ok {
		return t, nil
	}
	t, err := time.Parse(time.RFC3339Nano, string(b))
	if err != nil {
		return time.Time{}, fmt.Errorf("bad timestamp %q, want 2006-01-02 15:04:05.000 or RFC 3339", b)
	}
	return t, nil
}

// parseNaive is the allocation-free fast path of parseTimestamp for naive timestamps.
func parseNaive(b []byte) (time.Time, bool) {
	if len(b) < 19 || b[4] != '-' || b[7] != '-' || (b[10] != ' ' && b[10] != 'T') || b[13] != ':' || b[16] != ':' {
		return time.Time{}, false
	}
	num := func(s []byte) (int, bool) {
		v := 0
		for _, c := range s {
			if c < '0' || c > '9' {
				return 0, false
			}
			v = v*10 + int(c-'0')
		}
		return v, true
	}
	year, ok1 := num(b[0:4])
	month, ok2 := num(b[5:7])
	day, ok3 := num(b[8:10])
	hour, ok4 := num(b[11:13])
	minute, ok5 := num(b[14:16])
	sec, ok6 := num(b[17:19])
	if !(ok1 && ok2 && ok3 && ok4 && ok5 && ok6) {
		return time.Time{}, false
	}
	nsec := 0
	if len(b) > 19 {
		if b[19] != '.' || len(b) == 20 || len(b) > 29 {
			return time.Time{}, false
		}
		frac, ok := num(b[20:])
		if !ok {
			return time.Time{}, false
		}
		for i := len(b) - 20; i < 9; i++ {
			frac *= 10
		}
		nsec = frac
	}
	if month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || sec > 60 {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.UTC)
	if t.Day() != day { // 31 April and friends: time.Date normalises, we refuse
		return time.Time{}, false
	}
	return t, true
}

// parseStateField parses a state field without allocating for the known names.
func parseStateField(b []byte) (predictor.State, error) {
	switch string(b) {
	case "in-use":
		return predictor.InUse, nil
	case "available":
		return predictor.Available, nil
	case "offline":
		return predictor.Offline, nil
	case "restarted":
		return predictor.Restarted, nil
	}
	return predictor.Unknown, fmt.Errorf("unknown state %q, want in-use, available, offline or restarted", b)
}

// row is one parsed data row, before the node name is interned.
type row struct {
	node  []byte
	time  time.Time
	state predictor.State
	cpu   float64
	idle  time.Duration // FormatSamples only
}

var errEmptyNode = errors.New("empty node name")

// parseRow parses one data row of the given format.
func parseRow(f Format, line []byte) (row, error) {
	var fields [maxFields][]byte
	n := splitFields(line, &fields)
	want := 3
	if f == FormatSamples {
		want = 4
	}
	if n != want {
		if n > maxFields {
			return row{}, fmt.Errorf("more than %d fields, want %d", maxFields, want)
		}
		return row{}, fmt.Errorf("%d fields, want %d", n, want)
	}
	r := row{node: fields[0], cpu: -1}
	if len(r.node) == 0 {
		return row{}, errEmptyNode
	}
	var err error
	switch f {
	case FormatLogons:
		if r.state, err = parseStateField(fields[1]); err != nil {
			return row{}, err
		}
		if r.time, err = parseTimestamp(fields[2]); err != nil {
			return row{}, err
		}
	case FormatStates:
		if r.time, err = parseTimestamp(fields[1]); err != nil {
			return row{}, err
		}
		if r.state, err = parseStateField(fields[2]); err != nil {
			return row{}, err
		}
	case FormatSamples:
		if r.time, err = parseTimestamp(fields[1]); err != nil {
			return row{}, err
		}
		cpu, err := strconv.ParseFloat(string(fields[2]), 64)
		if err != nil || math.IsNaN(cpu) || cpu < 0 || cpu > 1 {
			return row{}, fmt.Errorf("bad cpu %q, want a share from 0 to 1", fields[2])
		}
		r.cpu = cpu
		idle, err := strconv.ParseFloat(string(fields[3]), 64)
		if err != nil || math.IsNaN(idle) || idle < 0 || idle > 1e9 {
			return row{}, fmt.Errorf("bad idle_seconds %q, want a number of seconds from 0", fields[3])
		}
		r.idle = time.Duration(idle * float64(time.Second))
	default:
		return row{}, fmt.Errorf("no parser for format %s", f)
	}
	return r, nil
}

// sniff recognises a file's format from its first line. It returns FormatAuto when the
// first line is a header of no known format, and reports whether that line is a header to
// be skipped.
func sniff(first []byte) (f Format, header bool) {
	h := bytes.ToLower(bytes.TrimSpace(first))
	h = bytes.ReplaceAll(h, []byte(" "), nil)
	switch string(h) {
	case headerStates:
		return FormatStates, true
	case headerSamples:
		return FormatSamples, true
	}
	if _, err := parseRow(FormatLogons, first); err == nil {
		return FormatLogons, false
	}
	// A line with a timestamp in it is a damaged data row of the headerless format; a
	// line without one is somebody else's header.
	var fields [maxFields][]byte
	n := min(splitFields(first, &fields), maxFields)
	for _, fl := range fields[:n] {
		if _, err := parseTimestamp(fl); err == nil {
			return FormatLogons, false
		}
	}
	return FormatAuto, true
}
