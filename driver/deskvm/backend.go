package deskvm

import (
	"context"
	"errors"
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
	// Restore starts a VM for spec from the checkpoint in dir, paused: the caller resumes it.
	Restore(ctx context.Context, spec vm.Spec, dir string) (Machine, error)
}

// Machine is one running VM.
type Machine interface {
	PID() int
	// Spec is the VM's spec as it runs: a VM restored in image mode runs its disk from the
	// checkpoint.
	Spec() vm.Spec
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

	// SetIdle puts the VM in the idle CPU class (its threads SCHED_IDLE, its cgroup
	// cpu.idle) or takes it out.
	SetIdle(on bool) error
	// SetCPUCap caps the VM's CPU at percent of its vCPUs; 100 lifts the cap.
	SetCPUCap(percent int) error
	// CPUCap returns the VM's CPU cap in percent of its vCPUs, 100 when uncapped.
	CPUCap() (int, error)
	// SetBalloon sets the guest's memory target in MiB; it returns before the guest gets there.
	SetBalloon(ctx context.Context, mib int) error
	// Memory returns the guest's memory now (balloon) and what it uses, in MiB; used is 0
	// while the guest has not reported it.
	Memory(ctx context.Context) (balloonMiB, usedMiB int, err error)
	// Pause stops the guest's vCPUs; Resume lets them run again.
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// Paused reports whether the guest's vCPUs are stopped.
	Paused(ctx context.Context) (bool, error)
	// Checkpoint saves the VM to dir and ends it; see vm.Machine.Checkpoint.
	Checkpoint(ctx context.Context, dir string) (vm.Checkpoint, error)
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

func (qemuHypervisor) Restore(ctx context.Context, spec vm.Spec, dir string) (Machine, error) {
	m, err := vm.Restore(ctx, spec, dir)
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

func (m *qemuMachine) SetIdle(on bool) error {
	spec := m.Spec()
	dir, err := vm.CPUDir(spec.CgroupDirs)
	if !on {
		errs := []error{vm.SetNormalClass(m.PID())}
		if err == nil {
			errs = append(errs, vm.ClearCgroupIdle(dir))
		}
		return errors.Join(errs...)
	}
	if err := vm.SetIdleClass(m.PID()); err != nil {
		return err
	}
	if err != nil {
		// No cpu cgroup to mark (a VM outside Nomad's cgroups): the class alone still
		// orders the VM after the owner's threads in the same cgroup.
		return nil
	}
	return vm.SetCgroupIdle(dir)
}

func (m *qemuMachine) SetCPUCap(percent int) error {
	spec := m.Spec()
	return vm.SetCPUCap(spec.CgroupDirs, percent, spec.CPUs)
}

func (m *qemuMachine) CPUCap() (int, error) {
	spec := m.Spec()
	return vm.CPUCap(spec.CgroupDirs, spec.CPUs)
}

func (m *qemuMachine) Memory(ctx context.Context) (int, int, error) {
	b, err := m.Balloon(ctx)
	if err != nil {
		return 0, 0, err
	}
	used, err := m.GuestMemory(ctx)
	if errors.Is(err, vm.ErrNoGuestStats) {
		return b, 0, nil
	}
	return b, used, err
}

func (m *qemuMachine) Paused(ctx context.Context) (bool, error) {
	return m.Machine.Paused(ctx)
}

// untilExit returns a context that also ends when m exits: for waits on the VM that must not
// outlive it.
func untilExit(ctx context.Context, m Machine) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-m.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}
