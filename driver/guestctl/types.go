// Package guestctl is the control protocol between the deskvm driver on the
// host and the guest agent that runs as PID 1 inside every task VM.
//
// The transport is one byte stream: on the host the QEMU chardev unix socket
// of the virtio-serial port named "deskvm.ctl", in the guest the port's
// character device. The host runs a yamux client over it and the agent a
// yamux server. Each request is its own yamux stream that starts with one
// JSON frame (see wire.go); exec streams then carry stdio frames.
//
// The agent keeps the task's exit status in memory until the host calls Ack,
// so a host that restarts (and so drops and re-dials the socket) never loses
// it. Only after Ack does the agent power the VM off.
package guestctl

import (
	"errors"
	"io"
	"time"
)

// Mount is a virtio-9p share that the agent mounts before it starts the
// command. Tag is the mount_tag of the QEMU virtio-9p-pci device.
type Mount struct {
	Tag      string `json:"tag"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`

	// Detached makes the share a copy in guest memory rather than a live
	// mount, because QEMU refuses to save (checkpoint or migrate) a VM
	// while the guest has a 9p share mounted. Before the command starts
	// the agent copies the share's tree (regular files, directories and
	// symlinks, with their modes and mtimes; no special files) into a
	// tmpfs at Path and unmounts the share. When the command has ended,
	// and before its exit shows as exited, the agent mounts the share
	// again and, unless ReadOnly, writes back every file, directory and
	// symlink that is new or whose size, mode or mtime changed, then
	// unmounts it. Deletions are not propagated: a file the command
	// removed stays on the host. Changes made on the host after the start
	// are not seen by the guest, and an unchanged file keeps the host's
	// version. The contents must fit in guest memory (a tmpfs holds at
	// most half of it). A failed write-back is appended to Status.Error
	// and turns an exit code of 0 into 1.
	Detached bool `json:"detached,omitempty"`
	// Skip lists slash-separated paths relative to the share's root, such
	// as "logs" or ".deskvm", that a Detached mount neither copies in nor
	// writes back; a name covers everything beneath it. It keeps out
	// what the host writes while the task runs (Nomad's log files) and
	// what the guest must not change: write-back never creates or
	// replaces anything under a skipped name, and never writes through a
	// symlink, so a guest cannot plant files there. Skip is ignored for a
	// share that is not Detached, since the guest then sees the share
	// itself.
	Skip []string `json:"skip,omitempty"`
}

// Network is the static configuration of the guest's first network interface,
// e.g. Address "10.0.2.15/24", Gateway "10.0.2.2", DNS "10.0.2.3" for QEMU
// user-mode networking.
type Network struct {
	Address string `json:"address"`
	Gateway string `json:"gateway,omitempty"`
	DNS     string `json:"dns,omitempty"`
}

// Spec is what the host asks the agent to run. The agent runs one Spec per
// boot.
type Spec struct {
	// TaskID identifies the task; Start with the same TaskID is a no-op.
	TaskID  string   `json:"task_id"`
	Command string   `json:"command"`
	Args    []string `json:"args,omitempty"`
	// Env is the command's whole environment as KEY=VALUE, exactly as given;
	// the agent adds only a default PATH when Env has none.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory inside the guest; "" means "/".
	Dir      string  `json:"dir,omitempty"`
	Hostname string  `json:"hostname,omitempty"`
	Mounts   []Mount `json:"mounts,omitempty"`
	// Network is nil when the task has no network.
	Network *Network `json:"network,omitempty"`
}

// State is the lifecycle state of the command inside the guest.
type State string

const (
	// StateWaiting means the agent has booted and has no Spec yet.
	StateWaiting State = "waiting"
	// StateRunning means the command runs.
	StateRunning State = "running"
	// StateExited means the command has exited (or could not start) and the
	// agent holds its status until the host calls Ack.
	StateExited State = "exited"
)

// Status describes the command. When the process was killed by a signal,
// Signal is its number and ExitCode is 128+Signal, as a shell reports it.
// When the command could not start, ExitCode is 127 (not found) or 126 (found
// but not executable, or the working directory is unusable) and Error says
// why.
type Status struct {
	State     State     `json:"state"`
	Pid       int       `json:"pid,omitempty"`
	ExitCode  int       `json:"exit_code"`
	Signal    int       `json:"signal,omitempty"`
	Error     string    `json:"error,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	ExitedAt  time.Time `json:"exited_at,omitzero"`
}

// Info describes the guest. Times come from the guest's clock.
type Info struct {
	AgentVersion    string    `json:"agent_version"`
	Kernel          string    `json:"kernel"`
	BootedAt        time.Time `json:"booted_at"`
	MemTotalMiB     int       `json:"mem_total_mib"`
	MemAvailableMiB int       `json:"mem_available_mib"`
}

// ExecRequest runs an extra process in the guest, as `nomad alloc exec` does.
// A nil Env means the task's environment (or a default PATH before Start);
// "" Dir means the task's working directory.
type ExecRequest struct {
	Command []string `json:"command"`
	Env     []string `json:"env,omitempty"`
	Dir     string   `json:"dir,omitempty"`
	TTY     bool     `json:"tty,omitempty"`
}

// TermSize is a terminal size for an exec with TTY.
type TermSize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExecIO carries an exec's standard streams. Any field may be nil: a nil
// Stdin is an empty stdin, nil writers discard. With TTY, stderr is merged
// into Stdout. Resize delivers terminal size changes (TTY only).
type ExecIO struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	Resize         <-chan TermSize
}

var (
	// ErrNotRunning is returned by Signal when the command is not running.
	ErrNotRunning = errors.New("command is not running")
	// ErrNotExited is returned by Ack when the command has not exited yet.
	ErrNotExited = errors.New("command has not exited")
	// ErrAlreadyStarted is returned by Start when the agent already runs a
	// Spec with another TaskID.
	ErrAlreadyStarted = errors.New("agent already started another task")
	// ErrIncompatible is returned by Dial when the agent speaks a protocol
	// version this client does not know.
	ErrIncompatible = errors.New("incompatible guest agent protocol")
)
