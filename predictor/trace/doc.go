// Package trace reads desktop activity traces, streaming and in bounded memory, into a
// single stream of [Record] values in time order.
//
// Three formats are understood; a file's format is recognised from its first line:
//
//   - [FormatLogons]: the availability log of a fleet of public PCs, `machine,state,timestamp`
//     with state one of in-use, available, offline or restarted and a local timestamp such
//     as `2014-05-19 06:31:05.870`. No header row. This is the layout of the library trace
//     that docs/forecast.md evaluates on.
//   - [FormatStates]: a generic state log with the header `node,timestamp,state`, the same
//     state names, and a timestamp in RFC 3339 (`2016-11-02T08:15:00-05:00`) or the naive
//     local form above.
//   - [FormatSamples]: periodic owner samples with the header
//     `node,timestamp,cpu,idle_seconds`: cpu is the owner's share of the node's cores from 0
//     to 1, idle_seconds how long ago the owner last touched keyboard or mouse. A sample
//     whose idle_seconds is below [Options.ActiveBelow] means the owner is in use, else
//     available; the record is dated at the owner's last input (timestamp minus
//     idle_seconds), which is when the state really changed.
//
// Every file may start with a UTF-8 byte-order mark, may use CRLF or LF line endings, and
// may be gzip-compressed (recognised by its magic bytes, whatever its name). A directory
// stands for its *.csv and *.csv.gz files in name order; files whose first line is a header
// of no known format (say, a table of machine attributes) are skipped and listed in the
// [Report].
//
// Rows need not be in time order. The reader restores order with a bounded reorder window:
// a row is held until a row at least [Options.ReorderWindow] later has been read, or until
// [Options.MaxBuffered] rows are held, whichever comes first, so memory is bounded by
// MaxBuffered rows (about 100 bytes each) whatever the size of the trace. A row that
// arrives after rows later than it have already been emitted is counted as late and
// reported with its file and line; it is not emitted. Malformed rows are likewise counted
// and reported with their line numbers, and reading goes on.
package trace
