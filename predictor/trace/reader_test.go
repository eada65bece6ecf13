package trace

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/trace/tracetest"
)

// The fixtures here are synthetic: they reproduce the quirks of the library trace (a
// byte-order mark, CRLF, no header, rows a little out of order) without any of its rows.

const bomStr = "\uFEFF"

func write(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	must.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o600) }

func gz(t *testing.T, content string) string {
	t.Helper()
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	_, err := w.Write([]byte(content))
	must.NoError(t, err)
	must.NoError(t, w.Close())
	return b.String()
}

func readAll(t *testing.T, paths []string, opt Options) ([]Record, Report) {
	t.Helper()
	r, err := Open(paths, opt)
	must.NoError(t, err)
	defer r.Close()
	var recs []Record
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		must.NoError(t, err)
		recs = append(recs, rec)
	}
	return recs, r.Report()
}

func ts(s string) time.Time {
	t, err := time.Parse("2006-01-02 15:04:05.000", s)
	if err != nil {
		panic(err)
	}
	return t
}

// brief is a record reduced to what tests compare.
type brief struct {
	Node  string
	Time  time.Time
	State predictor.State
	Line  int
}

func briefs(recs []Record) []brief {
	out := make([]brief, len(recs))
	for i, r := range recs {
		out[i] = brief{r.Node, r.Time, r.State, r.Pos.Line}
	}
	return out
}

const logons = "PC01,restarted,2014-05-19 06:30:05.870\r\n" +
	"PC02,in-use,2014-05-19 06:31:00.000\r\n" +
	"PC01,in-use,2014-05-19 07:02:11.5\r\n" +
	"PC02,available,2014-05-19 07:40:00.125\r\n"

var logonsWant = []brief{
	{"PC01", ts("2014-05-19 06:30:05.870"), predictor.Restarted, 1},
	{"PC02", ts("2014-05-19 06:31:00.000"), predictor.InUse, 2},
	{"PC01", ts("2014-05-19 07:02:11.500"), predictor.InUse, 3},
	{"PC02", ts("2014-05-19 07:40:00.125"), predictor.Available, 4},
}

func TestReaderLogonsQuirks(t *testing.T) {
	tests := []struct {
		name, file, content string
	}{
		{"plain LF", "a.csv", strings.ReplaceAll(logons, "\r\n", "\n")},
		{"byte-order mark and CRLF", "a.csv", bomStr + logons},
		{"gzip", "a.csv.gz", gz(t, bomStr+logons)},
		{"gzip whatever its name", "a.csv", gz(t, bomStr+logons)},
		{"no final newline", "a.csv", bomStr + strings.TrimSuffix(logons, "\r\n")},
		{"blank lines", "a.csv", bomStr + "\r\n" + strings.ReplaceAll(logons, "\r\n", "\r\n\r\n")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := write(t, t.TempDir(), tc.file, tc.content)
			recs, rep := readAll(t, []string{path}, Options{})
			got := briefs(recs)
			if tc.name == "blank lines" {
				for i := range got {
					got[i].Line = 0 // the blank lines shift line numbers
				}
				want := append([]brief(nil), logonsWant...)
				for i := range want {
					want[i].Line = 0
				}
				must.Eq(t, want, got)
			} else {
				must.Eq(t, logonsWant, got)
			}
			must.Eq(t, 0, rep.Malformed)
			must.Eq(t, 4, rep.Rows)
			must.Eq(t, 4, rep.Records)
			must.SliceLen(t, 1, rep.Files)
			must.Eq(t, "logons", rep.Files[0].Format)
			must.Eq(t, strings.HasSuffix(tc.name, "gzip") || strings.Contains(tc.name, "gzip"), rep.Files[0].Gzip)
		})
	}
}

func TestReaderMalformedRows(t *testing.T) {
	content := bomStr +
		"PC01,available,2014-05-19 06:30:05.870\r\n" + // 1 fine
		"PC01,available\r\n" + // 2 too few fields
		"PC01,sleeping,2014-05-19 06:31:00.000\r\n" + // 3 unknown state
		"PC01,in-use,2014-05-19 25:00:00.000\r\n" + // 4 bad hour
		",in-use,2014-05-19 06:32:00.000\r\n" + // 5 empty node
		"PC01,in-use,2014-04-31 06:32:00.000\r\n" + // 6 no such day
		"PC01,in-use,2014-05-19 06:33:00.000,extra\r\n" + // 7 too many fields
		"PC01,in-use,yesterday\r\n" + // 8 not a timestamp
		"PC01," + strings.Repeat("x", maxLine+10) + "\r\n" + // 9 too long
		"PC01,in-use,2014-05-19 06:40:00.000\r\n" // 10 fine
	path := write(t, t.TempDir(), "bad.csv", content)
	recs, rep := readAll(t, []string{path}, Options{})
	must.Eq(t, []brief{
		{"PC01", ts("2014-05-19 06:30:05.870"), predictor.Available, 1},
		{"PC01", ts("2014-05-19 06:40:00.000"), predictor.InUse, 10},
	}, briefs(recs))
	must.Eq(t, 10, rep.Rows)
	must.Eq(t, 8, rep.Malformed)
	must.Eq(t, 8, rep.Files[0].Malformed)
	var lines []int
	for _, is := range rep.Issues {
		must.Eq(t, KindMalformed, is.Kind)
		must.Eq(t, path, is.File)
		must.NotEq(t, "", is.Reason)
		lines = append(lines, is.Line)
	}
	must.Eq(t, []int{2, 3, 4, 5, 6, 7, 8, 9}, lines)
}

func TestReaderIssueListIsBounded(t *testing.T) {
	var b strings.Builder
	for range 10 {
		b.WriteString("garbage\n")
	}
	path := write(t, t.TempDir(), "bad.csv", "PC01,available,2014-05-19 06:30:05.870\n"+b.String())
	_, rep := readAll(t, []string{path}, Options{MaxIssues: 3})
	must.Eq(t, 10, rep.Malformed)
	must.SliceLen(t, 3, rep.Issues)
	must.Eq(t, 7, rep.IssuesLeftOff)
}

func TestReaderOutOfOrder(t *testing.T) {
	content := "PC01,available,2014-05-19 06:30:00.000\n" + // 1
		"PC02,in-use,2014-05-19 06:35:00.000\n" + // 2
		"PC01,in-use,2014-05-19 06:32:00.000\n" + // 3 three minutes back: reordered
		"PC03,in-use,2014-05-19 07:00:00.000\n" + // 4 moves the window on
		"PC02,available,2014-05-19 06:50:00.000\n" + // 5 ten minutes back: reordered
		"PC03,available,2014-05-19 08:00:00.000\n" + // 6
		"PC01,offline,2014-05-19 06:31:00.000\n" // 7 far too late
	path := write(t, t.TempDir(), "a.csv", content)
	recs, rep := readAll(t, []string{path}, Options{ReorderWindow: 20 * time.Minute})
	must.Eq(t, []brief{
		{"PC01", ts("2014-05-19 06:30:00.000"), predictor.Available, 1},
		{"PC01", ts("2014-05-19 06:32:00.000"), predictor.InUse, 3},
		{"PC02", ts("2014-05-19 06:35:00.000"), predictor.InUse, 2},
		{"PC02", ts("2014-05-19 06:50:00.000"), predictor.Available, 5},
		{"PC03", ts("2014-05-19 07:00:00.000"), predictor.InUse, 4},
		{"PC03", ts("2014-05-19 08:00:00.000"), predictor.Available, 6},
	}, briefs(recs))
	must.Eq(t, 2, rep.Reordered)
	must.Eq(t, 1, rep.Late)
	must.SliceLen(t, 1, rep.Issues)
	must.Eq(t, KindLate, rep.Issues[0].Kind)
	must.Eq(t, 7, rep.Issues[0].Line)
	must.Eq(t, rep.Rows, rep.Records+rep.Late+rep.Malformed, must.Sprint("every row is accounted for"))
}

func TestReaderOrderAcrossFiles(t *testing.T) {
	dir := t.TempDir()
	a := write(t, dir, "part-000.csv", bomStr+"PC01,available,2014-05-19 06:30:00.000\r\nPC01,in-use,2014-05-19 06:40:00.000\r\n")
	b := write(t, dir, "part-001.csv.gz", gz(t, bomStr+"PC02,in-use,2014-05-19 06:35:00.000\r\nPC02,available,2014-05-19 06:45:00.000\r\n"))
	for _, paths := range [][]string{{dir}, {a, b}} {
		recs, rep := readAll(t, paths, Options{})
		var times []string
		for _, r := range recs {
			times = append(times, r.Time.Format("15:04"))
		}
		must.Eq(t, []string{"06:30", "06:35", "06:40", "06:45"}, times)
		must.Eq(t, 1, rep.Reordered)
		must.SliceLen(t, 2, rep.Files)
	}
}

func TestReaderBoundedWindow(t *testing.T) {
	// With room for 4 rows, a long trace is read holding at most 5, and rows within the
	// room are still put in order.
	var b strings.Builder
	base := ts("2014-05-19 06:00:00.000")
	for i := range 100 {
		at := base.Add(time.Duration(i) * time.Minute)
		if i%2 == 1 {
			at = at.Add(-90 * time.Second) // a row a little late
		}
		b.WriteString("PC01,available," + at.Format("2006-01-02 15:04:05.000") + "\n")
	}
	path := write(t, t.TempDir(), "a.csv", b.String())
	recs, rep := readAll(t, []string{path}, Options{MaxBuffered: 4})
	must.SliceLen(t, 100, recs)
	must.LessEq(t, 5, rep.PeakBuffered)
	for i := 1; i < len(recs); i++ {
		must.False(t, recs[i].Time.Before(recs[i-1].Time), must.Sprintf("record %d out of order", i))
	}
}

func TestReaderGenericFormats(t *testing.T) {
	dir := t.TempDir()
	states := write(t, dir, "states.csv", "node,timestamp,state\r\n"+
		"desk1,2016-11-02T08:15:00-05:00,in-use\r\n"+
		"desk1,2016-11-02 12:00:00,available\r\n")
	samples := write(t, dir, "samples.csv", "node, timestamp, cpu, idle_seconds\n"+
		"desk2,2016-11-02 09:00:00,0.25,5\n"+ // active 5 seconds ago
		"desk2,2016-11-02 09:30:00,0.01,600\n"+ // idle since 09:20
		"desk2,2016-11-02 09:35:00,1.5,0\n") // cpu out of range
	// The files overlap in time by hours: a wide window puts them in order.
	recs, rep := readAll(t, []string{states, samples}, Options{ReorderWindow: 24 * time.Hour})
	var got []brief
	for _, r := range recs {
		got = append(got, brief{r.Node, r.Time.UTC(), r.State, r.Pos.Line})
	}
	must.Eq(t, []brief{
		{"desk2", ts("2016-11-02 08:59:55.000"), predictor.InUse, 2},
		{"desk2", ts("2016-11-02 09:20:00.000"), predictor.Available, 3},
		{"desk1", ts("2016-11-02 12:00:00.000"), predictor.Available, 3},
		{"desk1", ts("2016-11-02 13:15:00.000"), predictor.InUse, 2},
	}, got)
	must.Eq(t, "states", rep.Files[0].Format)
	must.Eq(t, "samples", rep.Files[1].Format)
	must.Eq(t, 1, rep.Malformed)
	must.Eq(t, 4, rep.Issues[0].Line)
	must.StrContains(t, rep.Issues[0].Reason, "cpu")
	// The RFC 3339 time keeps its zone, so its wall clock is the owner's.
	for _, r := range recs {
		if r.Node == "desk1" && r.State == predictor.InUse {
			must.Eq(t, 8, r.Time.Hour())
			must.Eq(t, 0.0, r.CPU+1, must.Sprint("states rows carry no cpu"))
		}
	}
}

func TestReaderSkipsForeignFiles(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "FullLogon-000.csv", bomStr+logons)
	write(t, dir, "machines.csv", "dbID,computerName,requiresLogon,isDesktop,is245\r\n1,PC01,1,1,1\r\n")
	write(t, dir, "terms.csv", "term,startDate,endDate\r\nFA14,8/18/14,12/12/14\r\n")
	write(t, dir, "SOURCE.md", "# not a trace\n")
	recs, rep := readAll(t, []string{dir}, Options{})
	must.SliceLen(t, 4, recs)
	must.SliceLen(t, 1, rep.Files)
	must.SliceLen(t, 2, rep.Skipped)
	must.StrContains(t, rep.Skipped[0], "machines.csv")
	must.StrContains(t, rep.Skipped[1], "terms.csv")
	must.Eq(t, 0, rep.Malformed)
}

func TestReaderTruncatedGzip(t *testing.T) {
	dir := t.TempDir()
	full := gz(t, strings.Repeat(logons, 50))
	write(t, dir, "a.csv.gz", full[:len(full)/2])
	write(t, dir, "b.csv", "PC09,available,2014-05-20 06:30:05.870\n")
	recs, rep := readAll(t, []string{dir}, Options{})
	must.Greater(t, 0, rep.Malformed, must.Sprint("the damage must be reported"))
	must.StrContains(t, rep.Issues[len(rep.Issues)-1].Reason, "unreadable")
	must.Eq(t, "PC09", recs[len(recs)-1].Node, must.Sprint("the next file is still read"))
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "notes.txt", "nothing here")
	tests := []struct {
		name  string
		paths []string
	}{
		{"nothing", nil},
		{"missing file", []string{filepath.Join(dir, "absent.csv")}},
		{"directory without traces", []string{dir}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(tc.paths, Options{})
			must.Error(t, err)
		})
	}
}

func TestParseTimestamp(t *testing.T) {
	tests := []struct {
		in   string
		want string // RFC 3339 in UTC, empty for an error
	}{
		{"2014-05-19 06:31:05.870", "2014-05-19T06:31:05.87Z"},
		{"2014-05-19 06:31:05", "2014-05-19T06:31:05Z"},
		{"2014-05-19T06:31:05.1", "2014-05-19T06:31:05.1Z"},
		{"2016-11-02T08:15:00-05:00", "2016-11-02T13:15:00Z"},
		{"2014-02-29 06:31:05", ""},
		{"2014-05-19 06:31:05.", ""},
		{"2014-05-19", ""},
		{"", ""},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseTimestamp([]byte(tc.in))
			if tc.want == "" {
				must.Error(t, err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got.UTC().Format(time.RFC3339Nano))
		})
	}
}

func TestReaderSharedLibraryTrace(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping the whole library trace in -short mode")
	}
	dir := tracetest.LibraryLogons(t)
	r, err := Open([]string{dir}, Options{})
	must.NoError(t, err)
	defer r.Close()
	nodes := map[string]bool{}
	var last time.Time
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		must.NoError(t, err)
		must.False(t, rec.Time.Before(last), must.Sprintf("%s: out of order", rec.Pos))
		last = rec.Time
		nodes[rec.Node] = true
	}
	rep := r.Report()
	t.Logf("%d files, %d rows, %d desktops, %d malformed, %d late, %d reordered, %d skipped",
		len(rep.Files), rep.Rows, len(nodes), rep.Malformed, rep.Late, rep.Reordered, len(rep.Skipped))
	must.Positive(t, rep.Rows)
	must.Eq(t, rep.Rows, rep.Records+rep.Malformed+rep.Late, must.Sprint("every row is accounted for"))
	for _, f := range rep.Files {
		must.Eq(t, "logons", f.Format, must.Sprint(f.Path))
		must.True(t, f.Gzip, must.Sprint(f.Path))
	}
	for _, n := range []string{"\uFEFF", "\r"} {
		for node := range nodes {
			must.StrNotContains(t, node, n, must.Sprint("the byte-order mark and CR must not leak into names"))
		}
	}
}
