package owner

import "time"

// Fields says which parts of a [Sample] were observed. A source fills only what it can see;
// the rest of the sample is unknown, not zero.
type Fields uint8

const (
	// HasCPU marks CPU as observed.
	HasCPU Fields = 1 << iota
	// HasMemory marks MemAvailableMiB and MemTotalMiB as observed.
	HasMemory
	// HasInput marks InputIdle as observed.
	HasInput
	// HasLocked marks Locked as observed.
	HasLocked
	// HasSession marks Session as observed.
	HasSession
)

// Sample is one observation of a desktop's owner at one instant.
type Sample struct {
	// Time is when the observation was made. Everything downstream takes time from here,
	// never from the wall clock, so a replayed trace decides exactly as the live one did.
	Time time.Time
	// Has says which of the fields below were observed.
	Has Fields
	// CPU is the owner's share of all the node's cores over the last sampling interval, from
	// 0 to 1, with the CPU of deskcloud's VMs taken out.
	CPU float64
	// MemAvailableMiB is the kernel's MemAvailable: what the owner could still allocate
	// without swapping.
	MemAvailableMiB int
	// MemTotalMiB is the node's MemTotal.
	MemTotalMiB int
	// InputIdle is how long ago the owner last used a keyboard, mouse or touchpad.
	InputIdle time.Duration
	// Locked is true when the owner's screen is locked.
	Locked bool
	// Session is true when someone is logged in at the node's seat.
	Session bool
}
