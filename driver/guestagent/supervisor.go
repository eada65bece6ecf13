package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestctl"
)

// outputGrace bounds how long an exec waits, after its process has exited,
// for output still held open by processes it left behind.
const outputGrace = 2 * time.Second

// supervisor runs the task's command and exec sessions; it is the agent's
// guestctl.Handler. The command's status outlives any host session.
type supervisor struct {
	log      *slog.Logger
	reaper   *reaper
	bootedAt time.Time
	// setup configures the guest for a Spec (mounts, hostname, network).
	// It must be safe to call again after it failed.
	setup func(ctx context.Context, s guestctl.Spec) error
	// stdio opens the descriptors the command's stdout and stderr go to.
	// Its descriptors are blocking and stay open for the agent's life.
	stdio func(ctx context.Context) (stdout, stderr int, err error)
	// finish runs once the command has ended (or could not start) and
	// before its status shows as exited, e.g. to write detached shares
	// back to the host. Its error is appended to Status.Error and turns a
	// zero exit code into 1, so that a task whose output did not reach the
	// host does not look successful.
	finish func(ctx context.Context) error
	// powerOff is called when the host has acknowledged the exit.
	powerOff func()

	startMu sync.Mutex // serialises Start

	mu     sync.Mutex // guards the fields below
	spec   *guestctl.Spec
	status guestctl.Status
	ended  bool          // the command's process is gone; finish may still run
	exited chan struct{} // closed when status.State becomes exited
}

var _ guestctl.Handler = (*supervisor)(nil)

func newSupervisor(log *slog.Logger, r *reaper) *supervisor {
	return &supervisor{
		log:      log,
		reaper:   r,
		bootedAt: time.Now(),
		status:   guestctl.Status{State: guestctl.StateWaiting},
		exited:   make(chan struct{}),
		setup:    func(context.Context, guestctl.Spec) error { return nil },
		finish:   func(context.Context) error { return nil },
		powerOff: func() {},
	}
}

// Info describes the guest.
func (s *supervisor) Info(context.Context) (guestctl.Info, error) {
	var uts unix.Utsname
	unix.Uname(&uts)
	info := guestctl.Info{
		AgentVersion: version,
		Kernel:       string(bytes.TrimRight(uts.Release[:], "\x00")),
		BootedAt:     s.bootedAt,
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		info.MemTotalMiB, info.MemAvailableMiB = parseMeminfo(f)
		f.Close()
	}
	return info, nil
}

// parseMeminfo returns MemTotal and MemAvailable in MiB.
func parseMeminfo(r io.Reader) (total, avail int) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		kib, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		switch f[0] {
		case "MemTotal:":
			total = kib / 1024
		case "MemAvailable:":
			avail = kib / 1024
		}
	}
	return total, avail
}

// Start configures the guest and starts the command.
func (s *supervisor) Start(ctx context.Context, spec guestctl.Spec) error {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	s.mu.Lock()
	cur := s.spec
	s.mu.Unlock()
	if cur != nil {
		if cur.TaskID == spec.TaskID {
			return nil
		}
		return fmt.Errorf("start task %s: running task %s: %w", spec.TaskID, cur.TaskID, guestctl.ErrAlreadyStarted)
	}
	if spec.Command == "" {
		return fmt.Errorf("start task %s: spec has no command", spec.TaskID)
	}
	if err := s.setup(ctx, spec); err != nil {
		return fmt.Errorf("start task %s: %w", spec.TaskID, err)
	}
	stdout, stderr, err := s.stdio(ctx)
	if err != nil {
		return fmt.Errorf("start task %s: %w", spec.TaskID, err)
	}
	devnull, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("start task %s: open /dev/null: %w", spec.TaskID, err)
	}
	defer unix.Close(devnull)

	dir := spec.Dir
	if dir == "" {
		dir = "/"
	}
	argv := append([]string{spec.Command}, spec.Args...)
	pid, ch, err := s.reaper.start(argv, withDefaultPath(spec.Env), dir,
		[]uintptr{uintptr(devnull), uintptr(stdout), uintptr(stderr)},
		&syscall.SysProcAttr{Setsid: true})

	now := time.Now()
	var se *startError
	if errors.As(err, &se) {
		unix.Write(stderr, []byte("deskvm: "+se.Error()+"\n"))
		code, msg := s.settle(se.code, se.Error())
		s.mu.Lock()
		defer s.mu.Unlock()
		s.spec = &spec
		s.status = guestctl.Status{State: guestctl.StateExited, ExitCode: code, Error: msg, StartedAt: now, ExitedAt: now}
		close(s.exited)
		s.log.Info("command could not start", "task_id", spec.TaskID, "exit_code", code, "error", msg)
		return nil
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	s.spec = &spec
	if err != nil {
		s.spec = nil
		return fmt.Errorf("start task %s: %w", spec.TaskID, err)
	}
	s.status = guestctl.Status{State: guestctl.StateRunning, Pid: pid, StartedAt: now}
	s.log.Info("command started", "task_id", spec.TaskID, "pid", pid, "uptime", uptime())
	go s.waitCommand(spec.TaskID, pid, ch)
	return nil
}

func (s *supervisor) waitCommand(taskID string, pid int, ch <-chan unix.WaitStatus) {
	ws := <-ch
	exitedAt := time.Now()
	code, sig := exitStatus(ws)
	s.mu.Lock()
	s.ended = true
	s.mu.Unlock()

	code, msg := s.settle(code, "")
	s.mu.Lock()
	defer s.mu.Unlock()
	s.status.State = guestctl.StateExited
	s.status.ExitCode = code
	s.status.Signal = sig
	s.status.Error = msg
	s.status.ExitedAt = exitedAt
	close(s.exited)
	attrs := []any{"task_id", taskID, "pid", pid, "exit_code", code, "signal", sig}
	if msg != "" {
		attrs = append(attrs, "error", msg)
	}
	s.log.Info("command exited", attrs...)
}

// settle runs finish after the command has ended and folds its failure into
// the exit code and error text the command ended with.
func (s *supervisor) settle(code int, msg string) (int, string) {
	// Not bounded by any request's context: the host waits for the exit
	// status, and a write-back cut short would lose the task's output.
	err := s.finish(context.Background())
	if err == nil {
		return code, msg
	}
	if msg != "" {
		msg += "; "
	}
	if code == 0 {
		code = 1
	}
	return code, msg + err.Error()
}

// Status returns the command's status.
func (s *supervisor) Status(context.Context) (guestctl.Status, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status, nil
}

// Wait blocks until the command has exited.
func (s *supervisor) Wait(ctx context.Context) (guestctl.Status, error) {
	select {
	case <-s.exited:
		return s.Status(ctx)
	case <-ctx.Done():
		return guestctl.Status{}, ctx.Err()
	}
}

// Signal signals the command's process group.
func (s *supervisor) Signal(_ context.Context, sig syscall.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.status.State != guestctl.StateRunning {
		return fmt.Errorf("signal %d: command is %s: %w", sig, s.status.State, guestctl.ErrNotRunning)
	}
	if s.ended {
		// The process group may be gone and its id reused.
		return fmt.Errorf("signal %d: command has ended and its shares are being written back: %w", sig, guestctl.ErrNotRunning)
	}
	// Under the lock, so the pid cannot have been reaped and reused.
	err := unix.Kill(-s.status.Pid, sig)
	if err == unix.ESRCH {
		return fmt.Errorf("signal %d: %w", sig, guestctl.ErrNotRunning)
	}
	if err != nil {
		return fmt.Errorf("signal %d to process group %d: %w", sig, s.status.Pid, err)
	}
	return nil
}

// Ack powers the VM off: the host holds the exit status.
func (s *supervisor) Ack(context.Context) error {
	s.log.Info("host acknowledged exit")
	s.powerOff()
	return nil
}

// Exec runs a process beside the command, with a pty when asked (and
// TERM=xterm when the environment names no terminal type).
func (s *supervisor) Exec(ctx context.Context, r guestctl.ExecRequest, stdio guestctl.ExecIO) (int, error) {
	s.mu.Lock()
	env, dir := r.Env, r.Dir
	if s.spec != nil {
		if env == nil {
			env = s.spec.Env
		}
		if dir == "" {
			dir = s.spec.Dir
		}
	}
	s.mu.Unlock()
	if dir == "" {
		dir = "/"
	}
	env = withDefaultPath(env)
	if stdio.Stdout == nil {
		stdio.Stdout = io.Discard
	}
	if stdio.Stderr == nil {
		stdio.Stderr = io.Discard
	}
	if stdio.Stdin == nil {
		stdio.Stdin = bytes.NewReader(nil)
	}
	if r.TTY {
		if envValue(env, "TERM") == "" {
			// A terminal without TERM leaves full-screen programs guessing.
			env = append(slices.Clip(env), "TERM=xterm")
		}
		return s.execTTY(ctx, r.Command, env, dir, stdio)
	}
	return s.execPipes(ctx, r.Command, env, dir, stdio)
}

func (s *supervisor) execPipes(ctx context.Context, argv, env []string, dir string, stdio guestctl.ExecIO) (int, error) {
	var parent, child [3]*os.File
	defer func() {
		for _, f := range append(parent[:], child[:]...) {
			if f != nil {
				f.Close()
			}
		}
	}()
	for i := range 3 {
		r, w, err := os.Pipe()
		if err != nil {
			return 0, fmt.Errorf("exec: %w", err)
		}
		if i == 0 {
			parent[i], child[i] = w, r
		} else {
			parent[i], child[i] = r, w
		}
	}
	// Fd puts the child's ends into blocking mode, as programs expect.
	files := []uintptr{child[0].Fd(), child[1].Fd(), child[2].Fd()}
	pid, ch, err := s.reaper.start(argv, env, dir, files, &syscall.SysProcAttr{Setsid: true})
	for i := range child {
		child[i].Close()
		child[i] = nil
	}
	if err != nil {
		return startFailure(stdio.Stderr, err)
	}

	go func() {
		io.Copy(parent[0], stdio.Stdin)
		parent[0].Close()
	}()
	var wg sync.WaitGroup
	for i, w := range []io.Writer{stdio.Stdout, stdio.Stderr} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			io.Copy(w, parent[i+1])
		}()
	}
	ws := waitOrKill(ctx, pid, ch)
	drain(&wg, parent[1], parent[2])
	code, _ := exitStatus(ws)
	return code, nil
}

func (s *supervisor) execTTY(ctx context.Context, argv, env []string, dir string, stdio guestctl.ExecIO) (int, error) {
	master, tty, err := pty.Open()
	if err != nil {
		return 0, fmt.Errorf("exec: open pty: %w", err)
	}
	defer master.Close()
	setWinsize(master, guestctl.TermSize{Rows: 24, Cols: 80})
	fd := tty.Fd()
	pid, ch, err := s.reaper.start(argv, env, dir, []uintptr{fd, fd, fd},
		&syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0})
	tty.Close()
	if err != nil {
		return startFailure(stdio.Stderr, err)
	}

	done := make(chan struct{})
	defer close(done)
	go func() {
		if _, err := io.Copy(master, stdio.Stdin); err == nil {
			// End of input on a terminal is the EOF character, not a close.
			master.Write([]byte{4})
		}
	}()
	go func() {
		for {
			select {
			case <-done:
				return
			case sz, ok := <-stdio.Resize:
				if !ok {
					return
				}
				setWinsize(master, sz)
			}
		}
	}()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(stdio.Stdout, master) // ends with EIO once every tty holder is gone
	}()
	ws := waitOrKill(ctx, pid, ch)
	drain(&wg, master)
	code, _ := exitStatus(ws)
	return code, nil
}

// setWinsize sets a pty's size. It goes through SyscallConn rather than Fd,
// which would put the master into blocking mode and make it unclosable
// under a pending read.
func setWinsize(master *os.File, sz guestctl.TermSize) {
	rc, err := master.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: sz.Rows, Col: sz.Cols})
	})
}

// startFailure reports a process that could not start like a shell does.
func startFailure(stderr io.Writer, err error) (int, error) {
	var se *startError
	if !errors.As(err, &se) {
		return 0, fmt.Errorf("exec: %w", err)
	}
	fmt.Fprintf(stderr, "deskvm: %v\n", se)
	return se.code, nil
}

// waitOrKill waits for the process, killing its process group if ctx ends
// first.
func waitOrKill(ctx context.Context, pid int, ch <-chan unix.WaitStatus) unix.WaitStatus {
	select {
	case ws := <-ch:
		return ws
	case <-ctx.Done():
		unix.Kill(-pid, unix.SIGKILL)
		return <-ch
	}
}

// drain waits for output copiers to finish, at most outputGrace; then it
// closes their sources, which processes left behind may hold open.
func drain(wg *sync.WaitGroup, sources ...*os.File) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTimer(outputGrace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		for _, f := range sources {
			f.Close()
		}
		<-done
	}
}
