package deskvm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

// fakeHypervisor stands in for QEMU in harness tests: each "VM" is a guest agent served over
// the real control protocol on the spec's control socket, whose command runs as a host
// process with the guest paths of the shares mapped to their host dirs. It lives across
// driver instances, as real VMs outlive the driver.
type fakeHypervisor struct {
	mu       sync.Mutex
	machines map[string]*fakeMachine
	// bootFailure, when set, makes every VM die while booting with this cause.
	bootFailure string
	// restoreFailure, when set, makes every restore fail with this cause.
	restoreFailure string
	// launched and restored count the VMs started afresh and from a checkpoint.
	launched, restored int
}

// newFakeHypervisor returns a fake whose host processes are all killed when the test ends,
// whether it passed or not.
func newFakeHypervisor(t *testing.T) *fakeHypervisor {
	f := &fakeHypervisor{machines: map[string]*fakeMachine{}}
	t.Cleanup(func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, m := range f.machines {
			_ = m.Kill()
		}
	})
	return f
}

func (f *fakeHypervisor) Launch(ctx context.Context, spec vm.Spec) (Machine, error) {
	f.mu.Lock()
	f.launched++
	f.mu.Unlock()
	m, err := f.launch(spec)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// counts returns how many VMs were launched afresh and restored from checkpoints.
func (f *fakeHypervisor) counts() (launched, restored int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.launched, f.restored
}

func (f *fakeHypervisor) launch(spec vm.Spec) (*fakeMachine, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(spec.SocketDir, 0o700); err != nil {
		return nil, err
	}
	m := &fakeMachine{spec: spec, done: make(chan struct{}), failure: f.bootFailure}
	m.agent = &hostAgent{machine: m, exited: make(chan struct{})}
	if f.bootFailure != "" {
		m.end()
		return m, nil
	}
	_ = os.Remove(spec.ControlSocket())
	l, err := net.Listen("unix", spec.ControlSocket())
	if err != nil {
		return nil, err
	}
	m.listener = l
	go m.serve()
	f.mu.Lock()
	f.machines[spec.Name] = m
	f.mu.Unlock()
	return m, nil
}

func (f *fakeHypervisor) Attach(ctx context.Context, spec vm.Spec, pid int) (Machine, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.machines[spec.Name]
	if !ok || m.PID() != pid {
		return nil, fmt.Errorf("attach vm %s: pid %d is gone", spec.Name, pid)
	}
	select {
	case <-m.done:
		return nil, fmt.Errorf("attach vm %s: pid %d is gone", spec.Name, pid)
	default:
	}
	return m, nil
}

type fakeMachine struct {
	spec     vm.Spec
	agent    *hostAgent
	listener net.Listener
	failure  string

	doneOnce sync.Once
	done     chan struct{}

	mu         sync.Mutex
	poweroff   bool
	idle       bool
	capPercent int
	balloon    int
	paused     bool
}

func (m *fakeMachine) PID() int               { return os.Getpid() }
func (m *fakeMachine) Spec() vm.Spec          { return m.spec }
func (m *fakeMachine) Done() <-chan struct{}  { return m.done }
func (m *fakeMachine) Failure() string        { return m.failure }
func (m *fakeMachine) Close() error           { return nil }
func (m *fakeMachine) ConsoleTail(int) string { return "(fake console)" }
func (m *fakeMachine) Cleanup() error         { return os.RemoveAll(m.spec.SocketDir) }

func (m *fakeMachine) GuestPoweredOff() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.poweroff
}

func (m *fakeMachine) end() {
	m.doneOnce.Do(func() {
		if m.listener != nil {
			m.listener.Close()
		}
		close(m.done)
	})
}

// serve accepts one host connection at a time, as a virtio-serial port does.
func (m *fakeMachine) serve() {
	for {
		conn, err := m.listener.Accept()
		if err != nil {
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-m.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		_ = guestctl.Serve(ctx, conn, m.agent)
		cancel()
	}
}

func (m *fakeMachine) Guest(ctx context.Context) (Guest, error) {
	if m.failure != "" {
		return nil, errors.New(m.failure)
	}
	return guestctl.Dial(ctx, m.spec.ControlSocket())
}

func (m *fakeMachine) Powerdown(ctx context.Context) error {
	m.mu.Lock()
	m.poweroff = true
	m.mu.Unlock()
	m.agent.kill()
	m.end()
	return nil
}

func (m *fakeMachine) Kill() error {
	m.agent.kill()
	m.end()
	return nil
}

// hostAgent is a guestctl.Handler that runs the command on the host.
type hostAgent struct {
	machine *fakeMachine

	mu     sync.Mutex
	taskID string
	cmd    *exec.Cmd
	status guestctl.Status
	exited chan struct{}
}

// hostPath maps a guest path under a share's mount point to the share's host dir.
func (a *hostAgent) hostPath(spec guestctl.Spec, p string) string {
	for _, mnt := range spec.Mounts {
		if p == mnt.Path || strings.HasPrefix(p, mnt.Path+"/") {
			for _, sh := range a.machine.spec.Shares {
				if sh.Tag == mnt.Tag {
					return filepath.Join(sh.HostPath, strings.TrimPrefix(p, mnt.Path))
				}
			}
		}
	}
	return p
}

func (a *hostAgent) Info(ctx context.Context) (guestctl.Info, error) {
	return guestctl.Info{AgentVersion: "fake", Kernel: "host"}, nil
}

func (a *hostAgent) Start(ctx context.Context, s guestctl.Spec) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.taskID != "" {
		if a.taskID == s.TaskID {
			return nil
		}
		return guestctl.ErrAlreadyStarted
	}
	a.taskID = s.TaskID
	cmd := exec.Command(a.hostPath(s, s.Command), s.Args...)
	cmd.Env = s.Env
	if s.Dir != "" {
		cmd.Dir = a.hostPath(s, s.Dir)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := os.OpenFile(a.machine.spec.Stdout, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	stderr, err := os.OpenFile(a.machine.spec.Stderr, os.O_WRONLY, 0)
	if err != nil {
		stdout.Close()
		return err
	}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		stdout.Close()
		stderr.Close()
		code := 126
		if errors.Is(err, os.ErrNotExist) {
			code = 127
		}
		a.status = guestctl.Status{State: guestctl.StateExited, ExitCode: code, Error: err.Error(), ExitedAt: time.Now()}
		close(a.exited)
		return nil
	}
	a.cmd = cmd
	a.status = guestctl.Status{State: guestctl.StateRunning, Pid: cmd.Process.Pid, StartedAt: time.Now()}
	go func() {
		_ = cmd.Wait()
		stdout.Close()
		stderr.Close()
		ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
		a.mu.Lock()
		a.status.State = guestctl.StateExited
		a.status.ExitedAt = time.Now()
		if ws.Signaled() {
			a.status.Signal = int(ws.Signal())
			a.status.ExitCode = 128 + int(ws.Signal())
		} else {
			a.status.ExitCode = ws.ExitStatus()
		}
		a.mu.Unlock()
		close(a.exited)
	}()
	return nil
}

func (a *hostAgent) Status(ctx context.Context) (guestctl.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.taskID == "" {
		return guestctl.Status{State: guestctl.StateWaiting}, nil
	}
	return a.status, nil
}

func (a *hostAgent) Wait(ctx context.Context) (guestctl.Status, error) {
	select {
	case <-a.exited:
		return a.Status(ctx)
	case <-ctx.Done():
		return guestctl.Status{}, ctx.Err()
	}
}

func (a *hostAgent) Signal(ctx context.Context, sig syscall.Signal) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil || a.status.State != guestctl.StateRunning {
		return guestctl.ErrNotRunning
	}
	return syscall.Kill(-a.cmd.Process.Pid, sig)
}

func (a *hostAgent) Ack(ctx context.Context) error {
	a.machine.mu.Lock()
	a.machine.poweroff = true
	a.machine.mu.Unlock()
	a.machine.end()
	return nil
}

func (a *hostAgent) Exec(ctx context.Context, r guestctl.ExecRequest, stdio guestctl.ExecIO) (int, error) {
	if len(r.Command) == 0 {
		return 0, errors.New("empty command")
	}
	cmd := exec.CommandContext(ctx, r.Command[0], r.Command[1:]...)
	cmd.Env = r.Env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdio.Stdin, stdio.Stdout, stdio.Stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	if err != nil {
		return 0, err
	}
	return 0, nil
}

func (a *hostAgent) kill() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil && a.status.State == guestctl.StateRunning {
		_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// The fake's yield controls: pause stops the command's process group, the rest is recorded.

// Restore starts a VM from a fake checkpoint (writeFakeCheckpoint): its state file is the
// guest command as JSON, which the restored VM runs, stopped (paused) until Resume.
func (f *fakeHypervisor) Restore(ctx context.Context, spec vm.Spec, dir string) (Machine, error) {
	f.mu.Lock()
	f.restored++
	failure := f.restoreFailure
	f.mu.Unlock()
	if failure != "" {
		return nil, fmt.Errorf("restore vm %s from %s: %s", spec.Name, dir, failure)
	}
	if err := vm.CheckCheckpoint(dir); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, vm.CheckpointStateFile))
	if err != nil {
		return nil, err
	}
	var gs guestctl.Spec
	if err := json.Unmarshal(b, &gs); err != nil {
		return nil, fmt.Errorf("fake checkpoint %s: %w", dir, err)
	}
	m, err := f.launch(spec)
	if err != nil {
		return nil, err
	}
	if err := m.agent.Start(ctx, gs); err != nil {
		_ = m.Kill()
		return nil, err
	}
	if err := m.setPaused(true); err != nil {
		_ = m.Kill()
		return nil, err
	}
	return m, nil
}

// writeFakeCheckpoint writes a complete checkpoint of the fake's format into task's
// checkpoint dir: a VM that runs gs when restored. It returns the checkpoint's dir.
func writeFakeCheckpoint(t *testing.T, task *drivers.TaskConfig, gs guestctl.Spec) string {
	t.Helper()
	dir := filepath.Join(checkpointBase(task), checkpointPrefix+time.Now().UTC().Format("20060102T150405.000000000"))
	must.NoError(t, os.MkdirAll(dir, 0o700))
	state, err := json.Marshal(gs)
	must.NoError(t, err)
	must.NoError(t, os.WriteFile(filepath.Join(dir, vm.CheckpointStateFile), state, 0o600))
	sum := sha256.Sum256(state)
	mf, err := json.Marshal(map[string]any{
		"version": 1,
		"vm":      "fake",
		"state":   map[string]any{"file": vm.CheckpointStateFile, "size": len(state), "sha256": hex.EncodeToString(sum[:])},
	})
	must.NoError(t, err)
	must.NoError(t, os.WriteFile(filepath.Join(dir, vm.CheckpointManifestFile), mf, 0o600))
	must.NoError(t, vm.CheckCheckpoint(dir), must.Sprint("the fake checkpoint must pass the driver's check"))
	signForTest(t, dir, task)
	return dir
}

func (m *fakeMachine) SetIdle(on bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.idle = on
	return nil
}

func (m *fakeMachine) SetCPUCap(percent int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.capPercent = percent
	return nil
}

func (m *fakeMachine) CPUCap() (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.capPercent == 0 {
		return 100, nil
	}
	return m.capPercent, nil
}

func (m *fakeMachine) SetBalloon(ctx context.Context, mib int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.balloon = mib
	return nil
}

func (m *fakeMachine) Memory(ctx context.Context) (int, int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.balloon == 0 {
		return m.spec.MemoryMiB, 64, nil
	}
	return m.balloon, 64, nil
}

func (m *fakeMachine) Pause(ctx context.Context) error { return m.setPaused(true) }

func (m *fakeMachine) Resume(ctx context.Context) error { return m.setPaused(false) }

func (m *fakeMachine) setPaused(on bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.paused = on
	sig := syscall.SIGCONT
	if on {
		sig = syscall.SIGSTOP
	}
	m.agent.mu.Lock()
	defer m.agent.mu.Unlock()
	if m.agent.cmd != nil && m.agent.status.State == guestctl.StateRunning {
		return syscall.Kill(-m.agent.cmd.Process.Pid, sig)
	}
	return nil
}

func (m *fakeMachine) Paused(ctx context.Context) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.paused, nil
}

func (m *fakeMachine) Checkpoint(ctx context.Context, dir string) (vm.Checkpoint, error) {
	return vm.Checkpoint{}, errors.New("the fake hypervisor cannot checkpoint")
}

// yieldState returns what the yield controls last set.
func (m *fakeMachine) yieldState() (idle bool, capPercent, balloon int, paused bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.idle, m.capPercent, m.balloon, m.paused
}
