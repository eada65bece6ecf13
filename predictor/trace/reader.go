package trace

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// Defaults for Options.
const (
	DefaultReorderWindow = time.Hour
	DefaultMaxBuffered   = 1 << 16
	DefaultMaxIssues     = 100
	DefaultActiveBelow   = time.Minute
)

// maxLine bounds a line's length; a longer line is reported as malformed and skipped.
const maxLine = 64 << 10

// Options tune a Reader. The zero value means the defaults.
type Options struct {
	// Format forces every file's format; FormatAuto recognises each from its first line.
	Format Format
	// ReorderWindow is how far back in time a row may arrive and still be put in order.
	ReorderWindow time.Duration
	// MaxBuffered bounds the rows the reorder window holds, and so the reader's memory.
	MaxBuffered int
	// MaxIssues bounds the malformed and late rows listed in the Report; all are counted.
	MaxIssues int
	// ActiveBelow is the idle_seconds under which a FormatSamples row means in use.
	ActiveBelow time.Duration
}

func (o Options) withDefaults() Options {
	if o.ReorderWindow <= 0 {
		o.ReorderWindow = DefaultReorderWindow
	}
	if o.MaxBuffered <= 0 {
		o.MaxBuffered = DefaultMaxBuffered
	}
	if o.MaxIssues <= 0 {
		o.MaxIssues = DefaultMaxIssues
	}
	if o.ActiveBelow <= 0 {
		o.ActiveBelow = DefaultActiveBelow
	}
	return o
}

// Reader streams the records of one or more trace files in time order.
type Reader struct {
	opt    Options
	paths  []string
	next   int // index in paths of the next file to open
	cur    *fileReader
	buf    recordHeap
	seq    uint64
	maxT   time.Time // latest time read
	lastT  time.Time // time of the last record emitted
	sent   bool      // whether any record was emitted
	eof    bool
	intern map[string]string
	report Report
}

// Open prepares to read the given files and directories (a directory stands for its *.csv
// and *.csv.gz files in name order). It fails if a path does not exist or a directory
// holds no trace file; problems inside files are reported, not returned.
func Open(paths []string, opt Options) (*Reader, error) {
	files, err := Expand(paths)
	if err != nil {
		return nil, err
	}
	return &Reader{opt: opt.withDefaults(), paths: files, intern: make(map[string]string)}, nil
}

// Expand turns files and directories into the list of files Open reads.
func Expand(paths []string) ([]string, error) {
	if len(paths) == 0 {
		return nil, errors.New("no trace paths given")
	}
	var files []string
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("open trace: %w", err)
		}
		if !fi.IsDir() {
			files = append(files, p)
			continue
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			return nil, fmt.Errorf("read trace directory: %w", err)
		}
		var found []string
		for _, e := range entries {
			name := e.Name()
			if e.Type().IsRegular() && (strings.HasSuffix(name, ".csv") || strings.HasSuffix(name, ".csv.gz")) {
				found = append(found, filepath.Join(p, name))
			}
		}
		if len(found) == 0 {
			return nil, fmt.Errorf("trace directory %s holds no *.csv or *.csv.gz file", p)
		}
		sort.Strings(found)
		files = append(files, found...)
	}
	return files, nil
}

// Report returns the account of the rows read so far; after Next has returned io.EOF it
// accounts for every row.
func (r *Reader) Report() Report {
	rep := r.report
	rep.Files = append([]FileReport(nil), r.report.Files...)
	rep.Issues = append([]Issue(nil), r.report.Issues...)
	rep.Skipped = append([]string(nil), r.report.Skipped...)
	return rep
}

// Close closes the file being read, if any.
func (r *Reader) Close() error {
	if r.cur == nil {
		return nil
	}
	err := r.cur.close()
	r.cur = nil
	return err
}

// Next returns the next record in time order, or io.EOF after the last. Other errors are
// I/O failures opening a file; bad rows never end the stream.
func (r *Reader) Next() (Record, error) {
	for {
		if len(r.buf) > 0 {
			top := r.buf[0].rec.Time
			if r.eof || len(r.buf) > r.opt.MaxBuffered || !top.Add(r.opt.ReorderWindow).After(r.maxT) {
				it := r.buf.pop()
				r.lastT, r.sent = it.rec.Time, true
				r.report.Records++
				return it.rec, nil
			}
		}
		if r.eof {
			return Record{}, io.EOF
		}
		rec, ok, err := r.read()
		if err != nil {
			return Record{}, err
		}
		if !ok {
			r.eof = true
			continue
		}
		if r.sent && rec.Time.Before(r.lastT) {
			r.issue(rec.Pos, KindLate, fmt.Sprintf("time %s is before %s, already emitted; widen the reorder window",
				rec.Time.Format(time.RFC3339), r.lastT.Format(time.RFC3339)))
			r.report.Late++
			continue
		}
		if rec.Time.Before(r.maxT) {
			r.report.Reordered++
		} else {
			r.maxT = rec.Time
		}
		r.seq++
		r.buf.push(heapItem{rec: rec, seq: r.seq})
		r.report.PeakBuffered = max(r.report.PeakBuffered, len(r.buf))
	}
}

// read returns the next well-formed record in file order, or ok false after the last file.
func (r *Reader) read() (Record, bool, error) {
	for {
		if r.cur == nil {
			if r.next == len(r.paths) {
				return Record{}, false, nil
			}
			path := r.paths[r.next]
			r.next++
			fr, err := openFile(path, r.opt.Format)
			if err != nil {
				return Record{}, false, err
			}
			if fr.format == FormatAuto {
				r.report.Skipped = append(r.report.Skipped, fmt.Sprintf("%s: first line is not a known header or row: %q", path, truncate(fr.first, 80)))
				_ = fr.close()
				continue
			}
			r.cur = fr
			r.report.Files = append(r.report.Files, FileReport{Path: path, Format: fr.format.String(), Gzip: fr.gz != nil})
		}
		fr := r.cur
		rep := &r.report.Files[len(r.report.Files)-1]
		line, ok, err := fr.line()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				// A damaged file (say, a truncated gzip stream) ends that file, not the run.
				r.issue(Pos{File: fr.path, Line: fr.n}, KindMalformed, fmt.Sprintf("unreadable after this line: %v", err))
				r.report.Malformed++
				rep.Malformed++
			}
			_ = fr.close()
			r.cur = nil
			continue
		}
		if !ok {
			continue // blank line or skipped header
		}
		r.report.Rows++
		rep.Rows++
		pos := Pos{File: fr.path, Line: fr.n}
		if line.tooLong {
			r.issue(pos, KindMalformed, fmt.Sprintf("line longer than %d bytes", maxLine))
			r.report.Malformed++
			rep.Malformed++
			continue
		}
		rw, err := parseRow(fr.format, line.b)
		if err != nil {
			r.issue(pos, KindMalformed, err.Error())
			r.report.Malformed++
			rep.Malformed++
			continue
		}
		rec := Record{Node: r.internNode(rw.node), Time: rw.time, State: rw.state, CPU: rw.cpu, Pos: pos}
		if fr.format == FormatSamples {
			// The owner's state changed at their last input, not when the sample was taken.
			rec.Time = rw.time.Add(-rw.idle)
			rec.State = predictor.Available
			if rw.idle < r.opt.ActiveBelow {
				rec.State = predictor.InUse
			}
		}
		return rec, true, nil
	}
}

func (r *Reader) internNode(b []byte) string {
	if s, ok := r.intern[string(b)]; ok {
		return s
	}
	s := string(b)
	r.intern[s] = s
	return s
}

func (r *Reader) issue(p Pos, kind, reason string) {
	if len(r.report.Issues) < r.opt.MaxIssues {
		r.report.Issues = append(r.report.Issues, Issue{Pos: p, Kind: kind, Reason: reason})
		return
	}
	r.report.IssuesLeftOff++
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}

// fileReader reads the lines of one trace file.
type fileReader struct {
	path         string
	f            *os.File
	gz           *gzip.Reader
	br           *bufio.Reader
	format       Format
	first        []byte // the first line, for the report when the file is skipped
	firstTooLong bool
	n            int  // number of the last line read
	header       bool // whether the first line is a header still to be skipped
	peeked       bool // whether the first line has been read but not yet returned
}

type lineData struct {
	b       []byte
	tooLong bool
}

var bom = []byte{0xEF, 0xBB, 0xBF}

func openFile(path string, force Format) (*fileReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open trace: %w", err)
	}
	fr := &fileReader{path: path, f: f, br: bufio.NewReaderSize(f, maxLine)}
	if magic, _ := fr.br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		gz, err := gzip.NewReader(fr.br)
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("open gzip trace %s: %w", path, err)
		}
		fr.gz = gz
		fr.br = bufio.NewReaderSize(gz, maxLine)
	}
	// Read the first line to recognise the format; line() returns it again.
	first, err := fr.rawLine()
	if err != nil && !errors.Is(err, io.EOF) {
		_ = fr.close()
		return nil, fmt.Errorf("read trace %s: %w", path, err)
	}
	fr.first = append([]byte(nil), first.b...)
	fr.firstTooLong = first.tooLong
	fr.peeked = true
	fr.format, fr.header = sniff(fr.first)
	if force != FormatAuto {
		fr.format = force
		fr.header = fr.header && force != FormatLogons
	}
	if len(bytes.TrimSpace(fr.first)) == 0 {
		fr.format, fr.header = max(force, FormatLogons), false
	}
	return fr, nil
}

// rawLine reads one line with its ending and (on line 1) its byte-order mark removed.
func (fr *fileReader) rawLine() (lineData, error) {
	b, err := fr.br.ReadSlice('\n')
	tooLong := false
	if errors.Is(err, bufio.ErrBufferFull) {
		tooLong = true
		for errors.Is(err, bufio.ErrBufferFull) {
			_, err = fr.br.ReadSlice('\n')
		}
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return lineData{}, err
	}
	if len(b) == 0 && errors.Is(err, io.EOF) {
		return lineData{}, io.EOF
	}
	fr.n++
	b = bytes.TrimSuffix(b, []byte("\n"))
	b = bytes.TrimSuffix(b, []byte("\r"))
	if fr.n == 1 {
		b = bytes.TrimPrefix(b, bom)
	}
	return lineData{b: b, tooLong: tooLong}, nil
}

// line returns the next line; ok is false for a blank line or the header. At the end it
// returns io.EOF.
func (fr *fileReader) line() (ld lineData, ok bool, err error) {
	if fr.peeked {
		fr.peeked = false
		if fr.header {
			return lineData{}, false, nil
		}
		ld = lineData{b: fr.first, tooLong: fr.firstTooLong}
		if len(fr.first) == 0 && fr.n == 0 {
			return lineData{}, false, io.EOF
		}
	} else if ld, err = fr.rawLine(); err != nil {
		return lineData{}, false, err
	}
	if len(bytes.TrimSpace(ld.b)) == 0 && !ld.tooLong {
		return lineData{}, false, nil
	}
	return ld, true, nil
}

func (fr *fileReader) close() error {
	if fr.gz != nil {
		_ = fr.gz.Close()
	}
	return fr.f.Close()
}

// heapItem is a record waiting in the reorder window; seq keeps rows with equal times in
// the order they were read.
type heapItem struct {
	rec Record
	seq uint64
}

func (a *heapItem) before(b *heapItem) bool {
	if !a.rec.Time.Equal(b.rec.Time) {
		return a.rec.Time.Before(b.rec.Time)
	}
	return a.seq < b.seq
}

// recordHeap is a binary min-heap of waiting records, earliest first.
type recordHeap []heapItem

func (h *recordHeap) push(it heapItem) {
	*h = append(*h, it)
	s := *h
	for i := len(s) - 1; i > 0; {
		p := (i - 1) / 2
		if !s[i].before(&s[p]) {
			break
		}
		s[i], s[p] = s[p], s[i]
		i = p
	}
}

func (h *recordHeap) pop() heapItem {
	s := *h
	top := s[0]
	n := len(s) - 1
	s[0] = s[n]
	s[n] = heapItem{}
	s = s[:n]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < n && s[l].before(&s[m]) {
			m = l
		}
		if r < n && s[r].before(&s[m]) {
			m = r
		}
		if m == i {
			break
		}
		s[i], s[m] = s[m], s[i]
		i = m
	}
	*h = s
	return top
}
