package deskvm

import (
	"context"
	"syscall"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/vm"
)

// Hypervisor starts VMs and finds them again. The driver speaks to VMs only through it, so
// the driver's lifecycle can be tested through Nomad's harness with a fake.
type Hypervisor interface {
	// Launch starts a VM for spec and returns once its monitor answers.
	Launch(ctx context.Context, spec vm.Spec) (Machine, error)
	// Attach finds a running VM again by its spec and pid after a restart.
	Attach(ctx context.Context, spec vm.Spec, pid int) (Machine, error)
}

// Machine is one running VM.
type Machine interface {
	PID() int
	// Done is closed once the VM has exited.
	Done() <-chan struct{}
	// GuestPoweredOff tells, once Done is closed, whether the guest shut itself down cleanly.
	GuestPoweredOff() bool
	// Failure describes why the VM ended abnormally: a guest kernel panic or QEMU's last
	// words. Empty when nothing is known.
	Failure() string
	// ConsoleTail returns the last n lines of the guest's serial console, for errors.
	ConsoleTail(n int) string
	// Guest connects to the guest agent (command mode), waiting for it to boot until ctx ends.
	Guest(ctx context.Context) (Guest, error)
	// Powerdown asks the guest to power off (ACPI power button).
	Powerdown(ctx context.Context) error
	// Kill ends the VM at once.
	Kill() error
	// Close drops this process's connections to the VM; the VM keeps running.
	Close() error
	// Cleanup removes the VM's sockets after it has exited.
	Cleanup() error
}

// Guest is a connection to the agent inside a command-mode VM.
type Guest interface {
	Start(ctx context.Context, s guestctl.Spec) error
	Status(ctx context.Context) (guestctl.Status, error)
	Wait(ctx context.Context) (guestctl.Status, error)
	Signal(ctx context.Context, sig syscall.Signal) error
	Ack(ctx context.Context) error
	Exec(ctx context.Context, r guestctl.ExecRequest, stdio guestctl.ExecIO) (int, error)
	Close() error
}

// qemuHypervisor runs real QEMU VMs.
type qemuHypervisor struct{}

func (qemuHypervisor) Launch(ctx context.Context, spec vm.Spec) (Machine, error) {
	m, err := vm.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	return &qemuMachine{Machine: m}, nil
}

func (qemuHypervisor) Attach(ctx context.Context, spec vm.Spec, pid int) (Machine, error) {
	m, err := vm.Attach(ctx, spec, pid)
	if err != nil {
		return nil, err
	}
	return &qemuMachine{Machine: m}, nil
}

// qemuMachine adapts vm.Machine and guestctl to Machine.
type qemuMachine struct {
	*vm.Machine
}

func (m *qemuMachine) Guest(ctx context.Context) (Guest, error) {
	spec := m.Spec()
	return guestctl.Dial(ctx, spec.ControlSocket())
}

func (m *qemuMachine) GuestPoweredOff() bool {
	if se := m.Machine.ShutdownEvent(); se != nil {
		return se.Guest && se.Reason == "guest-shutdown"
	}
	st := m.ExitStatus()
	return st.Known && st.Code == 0 && !st.Signaled && m.Machine.GuestPanic() == ""
}

func (m *qemuMachine) Failure() string {
	if p := m.Machine.GuestPanic(); p != "" {
		return "guest kernel panic: " + p
	}
	st := m.ExitStatus()
	switch {
	case st.Known && st.Signaled:
		return "qemu was killed by a signal: " + m.LogTail(3)
	case st.Known && st.Code != 0:
		return "qemu failed: " + m.LogTail(3)
	}
	if se := m.Machine.ShutdownEvent(); se != nil && se.Reason == "guest-panic" {
		return "guest kernel panic: " + m.ConsoleTail(3)
	}
	return ""
}
