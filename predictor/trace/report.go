package trace

import (
	"fmt"
	"io"
)

// Issue is one row that was not turned into a record, and why.
type Issue struct {
	Pos
	// Kind is "malformed" or "late".
	Kind string `json:"kind"`
	// Reason says what is wrong with the row.
	Reason string `json:"reason"`
}

// Issue kinds.
const (
	KindMalformed = "malformed"
	KindLate      = "late"
)

// FileReport describes one file that was read.
type FileReport struct {
	Path   string `json:"path"`
	Format string `json:"format"`
	// Gzip is true when the file was gzip-compressed.
	Gzip bool `json:"gzip"`
	// Rows counts data rows, header excluded, malformed included.
	Rows int `json:"rows"`
	// Malformed counts rows that could not be parsed.
	Malformed int `json:"malformed"`
}

// Report accounts for every row read: each one was emitted as a record, or is counted as
// malformed or late. The first Options.MaxIssues rows of the last two kinds are listed with
// their line numbers; all are counted.
type Report struct {
	Files []FileReport `json:"files"`
	// Skipped lists files that were not read as traces, with the reason.
	Skipped []string `json:"skipped,omitempty"`
	// Rows counts data rows in all files.
	Rows int `json:"rows"`
	// Records counts records emitted.
	Records int `json:"records"`
	// Malformed counts rows that could not be parsed.
	Malformed int `json:"malformed"`
	// Late counts rows that came after the reorder window had moved past their time.
	Late int `json:"late"`
	// Reordered counts rows that were read out of time order and put back in order.
	Reordered int `json:"reordered"`
	// PeakBuffered is the most rows the reorder window held at once.
	PeakBuffered int `json:"peak_buffered"`
	// Issues lists the first malformed and late rows.
	Issues []Issue `json:"issues,omitempty"`
	// IssuesLeftOff counts malformed and late rows beyond those listed.
	IssuesLeftOff int `json:"issues_left_off,omitempty"`
}

// WriteText writes a short human-readable account of the report.
func (r *Report) WriteText(w io.Writer) error {
	_, err := fmt.Fprintf(w, "trace: %d files, %d rows, %d records, %d malformed, %d late, %d reordered (peak window %d rows)\n",
		len(r.Files), r.Rows, r.Records, r.Malformed, r.Late, r.Reordered, r.PeakBuffered)
	if err != nil {
		return err
	}
	for _, s := range r.Skipped {
		if _, err := fmt.Fprintf(w, "  skipped %s\n", s); err != nil {
			return err
		}
	}
	for _, is := range r.Issues {
		if _, err := fmt.Fprintf(w, "  %s: %s: %s\n", is.Pos, is.Kind, is.Reason); err != nil {
			return err
		}
	}
	if r.IssuesLeftOff > 0 {
		if _, err := fmt.Fprintf(w, "  ... and %d more\n", r.IssuesLeftOff); err != nil {
			return err
		}
	}
	return nil
}
