package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Machine is one running QEMU process, started here or found again after a restart.
type Machine struct {
	spec Spec
	pid  int

	done chan struct{} // closed once QEMU has exited

	mu       sync.Mutex
	mon      *Monitor // the one QMP connection; nil once closed
	exitCode int      // QEMU's exit code, when known
	signaled bool     // QEMU was killed by a signal
	known    bool     // the exit status is known (only for a QEMU this process started)
}

// ExitStatus is how the QEMU process ended.
type ExitStatus struct {
	Code     int
	Signaled bool
	// Known is false for a VM found again after a restart: its exit status went to its
	// original parent, and the guest's own report must tell how it ended.
	Known bool
}

// Start launches QEMU for spec in its own session so that it outlives this process, joins it
// to spec.CgroupDirs, and returns once QMP answers: by then QEMU has opened every device,
// and a bad disk or path has become an error that quotes QEMU.
func Start(ctx context.Context, spec Spec) (*Machine, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	for _, d := range []string{spec.StateDir, spec.SocketDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create vm dir: %w", err)
		}
	}
	for _, sock := range []string{spec.QMPSocket(), spec.ControlSocket()} {
		if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	logFile, err := os.OpenFile(spec.QEMULog(), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open qemu log: %w", err)
	}
	defer logFile.Close()

	cmd := exec.Command(spec.QEMUBinary, spec.Args()...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = spec.StateDir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.QEMUBinary, err)
	}
	m := &Machine{spec: spec, pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		m.mu.Lock()
		m.known = true
		m.exitCode = cmd.ProcessState.ExitCode()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				m.signaled = true
			}
		}
		m.mu.Unlock()
		close(m.done)
	}()

	if err := joinCgroups(m.pid, spec.CgroupDirs, spec.CgroupMemoryLimitMiB, spec.CgroupCPUShares); err != nil {
		_ = m.Kill()
		return nil, fmt.Errorf("place vm in cgroup: %w", err)
	}
	if err := os.WriteFile(spec.PIDFile(), []byte(strconv.Itoa(m.pid)+"\n"), 0o600); err != nil {
		_ = m.Kill()
		return nil, fmt.Errorf("write pid file: %w", err)
	}
	mon, err := m.dialMonitor(ctx)
	if err != nil {
		_ = m.Kill()
		return nil, err
	}
	m.mon = mon
	return m, nil
}

// dialMonitor connects to QEMU's QMP socket as soon as QEMU listens on it, or fails with
// QEMU's own words if QEMU exits first.
func (m *Machine) dialMonitor(ctx context.Context) (*Monitor, error) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(m.spec.QMPSocket()); err == nil {
			dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			mon, err := DialMonitor(dctx, m.spec.QMPSocket())
			cancel()
			if err == nil {
				return mon, nil
			}
			// The socket file exists between QEMU's bind and listen; try again.
		}
		select {
		case <-m.done:
			return nil, fmt.Errorf("qemu exited at start: %s", m.LogTail(5))
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu did not open its monitor: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// Attach finds a running VM again by pid, after a restart of the process that started it. It
// checks that the pid still belongs to the QEMU named in spec, so a recycled pid is never
// mistaken for the VM.
func Attach(ctx context.Context, spec Spec, pid int) (*Machine, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("attach vm %s: invalid pid %d", spec.Name, pid)
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return nil, fmt.Errorf("attach vm %s: pid %d is gone: %w", spec.Name, pid, err)
	}
	if !bytes.Contains(cmdline, []byte("\x00"+spec.Name+",debug-threads=on\x00")) {
		return nil, fmt.Errorf("attach vm %s: pid %d is another process", spec.Name, pid)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("attach vm %s: open pidfd %d: %w", spec.Name, pid, err)
	}
	m := &Machine{spec: spec, pid: pid, done: make(chan struct{})}
	go func() {
		defer close(m.done)
		defer unix.Close(pidfd)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, -1)
			if n > 0 || (err != nil && !errors.Is(err, unix.EINTR)) {
				return
			}
		}
	}()
	mon, err := DialMonitor(ctx, spec.QMPSocket())
	if err != nil {
		return nil, fmt.Errorf("attach vm %s: %w", spec.Name, err)
	}
	m.mon = mon
	return m, nil
}

// Monitor returns the VM's QMP connection, or an error once it has been closed.
func (m *Machine) Monitor() (*Monitor, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mon == nil {
		return nil, fmt.Errorf("vm %s: monitor is closed", m.spec.Name)
	}
	return m.mon, nil
}

// ShutdownEvent returns QEMU's SHUTDOWN event if the monitor has seen one.
func (m *Machine) ShutdownEvent() *ShutdownEvent {
	mon, err := m.Monitor()
	if err != nil {
		return nil
	}
	return mon.Shutdown()
}

// Powerdown asks the guest to power off, as if its power button were pressed.
func (m *Machine) Powerdown(ctx context.Context) error {
	mon, err := m.Monitor()
	if err != nil {
		return err
	}
	return mon.Powerdown(ctx)
}

// Close drops the QMP connection; the VM keeps running.
func (m *Machine) Close() error {
	m.mu.Lock()
	mon := m.mon
	m.mon = nil
	m.mu.Unlock()
	if mon == nil {
		return nil
	}
	return mon.Close()
}

// Spec returns the spec the VM was started with.
func (m *Machine) Spec() Spec { return m.spec }

// PID returns QEMU's process id.
func (m *Machine) PID() int { return m.pid }

// Done is closed once QEMU has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Exited reports whether QEMU has exited.
func (m *Machine) Exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// ExitStatus tells how QEMU ended; call it after Done is closed.
func (m *Machine) ExitStatus() ExitStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	return ExitStatus{Code: m.exitCode, Signaled: m.signaled, Known: m.known}
}

// Kill ends QEMU at once with SIGKILL; the guest gets no chance to shut down.
func (m *Machine) Kill() error {
	if m.Exited() {
		return nil
	}
	if err := unix.Kill(m.pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill vm %s pid %d: %w", m.spec.Name, m.pid, err)
	}
	return nil
}

// Wait blocks until QEMU exits or ctx ends.
func (m *Machine) Wait(ctx context.Context) error {
	select {
	case <-m.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Cleanup removes the VM's sockets; its state dir stays with the task for inspection.
func (m *Machine) Cleanup() error {
	return os.RemoveAll(m.spec.SocketDir)
}

// LogTail returns the last n non-empty lines QEMU wrote to its log, joined with "; ".
func (m *Machine) LogTail(n int) string {
	return tailLines(m.spec.QEMULog(), n)
}

// ConsoleTail returns the last n non-empty lines of the guest's serial console.
func (m *Machine) ConsoleTail(n int) string {
	return tailLines(m.spec.ConsoleLog(), n)
}

// GuestPanic returns the kernel panic line from the guest console, if the guest panicked.
func (m *Machine) GuestPanic() string {
	b, err := readTail(m.spec.ConsoleLog(), 64<<10)
	if err != nil {
		return ""
	}
	i := bytes.LastIndex(b, []byte("Kernel panic"))
	if i < 0 {
		return ""
	}
	line, _, _ := bytes.Cut(b[i:], []byte("\n"))
	return strings.TrimSpace(string(line))
}

func tailLines(path string, n int) string {
	b, err := readTail(path, 16<<10)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	if len(lines) == 0 {
		return "(log is empty)"
	}
	return strings.Join(lines, "; ")
}

func readTail(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := fi.Size() - max
	if off < 0 {
		off = 0
	}
	b := make([]byte, fi.Size()-off)
	_, err = f.ReadAt(b, off)
	return b, err
}
