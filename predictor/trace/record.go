package trace

import (
	"fmt"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// Format is the layout of a trace file.
type Format uint8

const (
	// FormatAuto recognises each file's format from its first line.
	FormatAuto Format = iota
	// FormatLogons is `machine,state,timestamp` with no header row.
	FormatLogons
	// FormatStates is `node,timestamp,state` with a header row.
	FormatStates
	// FormatSamples is `node,timestamp,cpu,idle_seconds` with a header row.
	FormatSamples
)

var formatNames = [...]string{"auto", "logons", "states", "samples"}

// String returns the format's name as the CLI spells it.
func (f Format) String() string {
	if int(f) < len(formatNames) {
		return formatNames[f]
	}
	return fmt.Sprintf("format(%d)", uint8(f))
}

// ParseFormat parses a format name: auto, logons, states or samples.
func ParseFormat(name string) (Format, error) {
	for i, n := range formatNames {
		if n == name {
			return Format(i), nil
		}
	}
	return FormatAuto, fmt.Errorf("unknown trace format %q, want auto, logons, states or samples", name)
}

// Pos is where a row was read.
type Pos struct {
	// File is the path of the file.
	File string `json:"file"`
	// Line is the 1-based line number in the (decompressed) file.
	Line int `json:"line"`
}

// String returns file:line.
func (p Pos) String() string { return fmt.Sprintf("%s:%d", p.File, p.Line) }

// Record is one state change of one desktop.
type Record struct {
	// Node names the desktop.
	Node string
	// Time is when the state began. Naive timestamps are read as UTC so that their wall
	// clock, which is what the owner lives by, is kept as written.
	Time time.Time
	// State is the state the desktop entered.
	State predictor.State
	// CPU is the owner's CPU share from 0 to 1 for FormatSamples rows, and -1 where the
	// format does not carry it.
	CPU float64
	// Pos is where the row was read.
	Pos Pos
}
