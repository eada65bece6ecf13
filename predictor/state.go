package predictor

import "fmt"

// State is what a desktop is doing at an instant, as far as its owner is concerned.
type State uint8

const (
	// Unknown is the state before anything has been observed.
	Unknown State = iota
	// InUse means the owner is at the desktop.
	InUse
	// Available means the desktop is up and its owner is away: it can be harvested.
	Available
	// Offline means the desktop is off or unreachable: its owner is away but it cannot
	// be harvested.
	Offline
	// Restarted means the desktop has just come back up with no one at it: like
	// Available, it can be harvested.
	Restarted
)

// numStates is the number of State values, Unknown included.
const numStates = 5

var stateNames = [numStates]string{"unknown", "in-use", "available", "offline", "restarted"}

// String returns the state's name as it is spelled in traces.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// ParseState parses a state name as it is spelled in traces: in-use, available, offline or
// restarted.
func ParseState(name string) (State, error) {
	switch name {
	case "in-use":
		return InUse, nil
	case "available":
		return Available, nil
	case "offline":
		return Offline, nil
	case "restarted":
		return Restarted, nil
	}
	return Unknown, fmt.Errorf("unknown state %q, want in-use, available, offline or restarted", name)
}

// OwnerAway reports whether the owner is away from the desktop in this state.
func (s State) OwnerAway() bool { return s == Available || s == Offline || s == Restarted }

// Harvestable reports whether a desktop in this state is up with its owner away, so a VM
// could run on it. Forecasts matter at these moments.
func (s State) Harvestable() bool { return s == Available || s == Restarted }
