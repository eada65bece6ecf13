package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestctl"
)

func TestMain(m *testing.M) {
	// Orphans of the processes under test come to us, as they would to PID 1,
	// so that the reaper's handling of them is exercised.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		panic(err)
	}
	os.Exit(m.Run())
}

// testAgent is a supervisor on the host, served over a unix socket the way
// the agent serves the control port, with stdio in files.
type testAgent struct {
	sup      *supervisor
	sock     string
	stdout   string
	stderr   string
	poweredC chan struct{}
}

func newTestAgent(t *testing.T) *testAgent {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	r := newReaper()
	go r.run(ctx)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	a := &testAgent{
		sup:      newSupervisor(log, r),
		sock:     filepath.Join(dir, "ctl.sock"),
		stdout:   filepath.Join(dir, "stdout"),
		stderr:   filepath.Join(dir, "stderr"),
		poweredC: make(chan struct{}),
	}
	var fds []int
	a.sup.stdio = func(context.Context) (int, int, error) {
		if len(fds) == 0 {
			for _, p := range []string{a.stdout, a.stderr} {
				fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o644)
				if err != nil {
					return 0, 0, err
				}
				fds = append(fds, fd)
			}
		}
		return fds[0], fds[1], nil
	}
	a.sup.powerOff = func() { close(a.poweredC) }

	ln, err := net.Listen("unix", a.sock)
	must.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			guestctl.Serve(ctx, conn, a.sup)
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		<-done
		a.sup.mu.Lock()
		if a.sup.status.State == guestctl.StateRunning {
			unix.Kill(-a.sup.status.Pid, unix.SIGKILL)
		}
		a.sup.mu.Unlock()
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	return a
}

func (a *testAgent) dial(t *testing.T) *guestctl.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := guestctl.Dial(ctx, a.sock)
	must.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func waitExited(t *testing.T, c *guestctl.Client) guestctl.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	st, err := c.Wait(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateExited, st.State)
	return st
}

func TestCommandExit(t *testing.T) {
	notExec := filepath.Join(t.TempDir(), "not-exec")
	must.NoError(t, os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644))
	cases := []struct {
		name   string
		spec   guestctl.Spec
		code   int
		signal int
		stdout string
		stderr string // substring
		errMsg string // substring of Status.Error
	}{
		{
			name:   "exit code and output",
			spec:   guestctl.Spec{Command: "/bin/sh", Args: []string{"-c", `echo "out $GREETING"; echo err >&2; exit 3`}, Env: []string{"GREETING=hi there"}},
			code:   3,
			stdout: "out hi there\n",
			stderr: "err\n",
		},
		{
			name:   "exact environment plus PATH",
			spec:   guestctl.Spec{Command: "env", Env: []string{"A=1"}},
			stdout: "A=1\nPATH=" + defaultPath + "\n",
		},
		{
			name:   "own PATH kept",
			spec:   guestctl.Spec{Command: "/bin/sh", Args: []string{"-c", `echo "$PATH"`}, Env: []string{"PATH=/bin:/usr/bin"}},
			stdout: "/bin:/usr/bin\n",
		},
		{
			name:   "working directory",
			spec:   guestctl.Spec{Command: "pwd", Dir: "/tmp"},
			stdout: "/tmp\n",
		},
		{
			name:   "killed by a signal",
			spec:   guestctl.Spec{Command: "/bin/sh", Args: []string{"-c", "kill -KILL $$"}},
			code:   128 + 9,
			signal: 9,
		},
		{
			name:   "not found on PATH",
			spec:   guestctl.Spec{Command: "no-such-command-xyz"},
			code:   127,
			stderr: "deskvm: no-such-command-xyz: command not found\n",
			errMsg: "command not found",
		},
		{
			name:   "no such file",
			spec:   guestctl.Spec{Command: "/no/such/file"},
			code:   127,
			errMsg: "/no/such/file: no such file or directory",
		},
		{
			name:   "not executable",
			spec:   guestctl.Spec{Command: notExec},
			code:   126,
			errMsg: "permission denied",
		},
		{
			name:   "missing working directory",
			spec:   guestctl.Spec{Command: "true", Dir: "/no/such/dir"},
			code:   126,
			errMsg: "working directory",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := newTestAgent(t)
			c := a.dial(t)
			tc.spec.TaskID = "task"
			must.NoError(t, c.Start(t.Context(), tc.spec))
			st := waitExited(t, c)
			must.Eq(t, tc.code, st.ExitCode, must.Sprintf("status %+v", st))
			must.Eq(t, tc.signal, st.Signal)
			must.StrContains(t, st.Error, tc.errMsg)
			must.False(t, st.ExitedAt.Before(st.StartedAt))
			if tc.stdout != "" {
				must.Eq(t, tc.stdout, readFile(t, a.stdout))
			}
			must.StrContains(t, readFile(t, a.stderr), tc.stderr)

			must.NoError(t, c.Ack(t.Context()))
			select {
			case <-a.poweredC:
			case <-time.After(10 * time.Second):
				t.Fatal("ack did not power off")
			}
		})
	}
}

func TestStartOnce(t *testing.T) {
	a := newTestAgent(t)
	c := a.dial(t)
	ctx := t.Context()
	failures := 1
	a.sup.setup = func(context.Context, guestctl.Spec) error {
		if failures > 0 {
			failures--
			return errors.New("mount 9p share local on /local: no such device")
		}
		return nil
	}
	spec := guestctl.Spec{TaskID: "one", Command: "sleep", Args: []string{"30"}}
	must.ErrorContains(t, c.Start(ctx, spec), "start task one: mount 9p share local")
	st, err := c.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateWaiting, st.State, must.Sprint("a failed setup leaves the agent waiting"))

	must.NoError(t, c.Start(ctx, spec), must.Sprint("start again after a failed setup"))
	must.NoError(t, c.Start(ctx, spec), must.Sprint("same task again"))
	spec.TaskID = "two"
	must.ErrorIs(t, c.Start(ctx, spec), guestctl.ErrAlreadyStarted)
	st, err = c.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateRunning, st.State)
}

// TestSignalReconnect sends SIGTERM to a script that traps it, drops the host
// session before the script exits, and reads the exit code on a new session.
func TestSignalReconnect(t *testing.T) {
	a := newTestAgent(t)
	c := a.dial(t)
	ctx := t.Context()
	must.NoError(t, c.Start(ctx, guestctl.Spec{TaskID: "trap", Command: "/bin/sh", Args: []string{"-c",
		`trap 'echo got-term; sleep 0.2; exit 3' TERM; echo ready; while :; do sleep 0.05; done`}}))
	eventually(t, 10*time.Second, "ready on stdout", func() bool { return strings.Contains(readFile(t, a.stdout), "ready") })

	must.NoError(t, c.Signal(ctx, syscall.SIGTERM))
	must.NoError(t, c.Close())
	eventually(t, 10*time.Second, "got-term on stdout", func() bool { return strings.Contains(readFile(t, a.stdout), "got-term") })

	c2 := a.dial(t)
	st := waitExited(t, c2)
	must.Eq(t, 3, st.ExitCode)
	must.ErrorIs(t, c2.Signal(ctx, syscall.SIGTERM), guestctl.ErrNotRunning)
}

func TestExec(t *testing.T) {
	a := newTestAgent(t)
	c := a.dial(t)
	ctx := t.Context()
	must.NoError(t, c.Start(ctx, guestctl.Spec{TaskID: "t", Command: "sleep", Args: []string{"60"},
		Env: []string{"TASKVAR=from-task"}, Dir: "/tmp"}))

	cases := []struct {
		name   string
		req    guestctl.ExecRequest
		stdin  string
		code   int
		stdout string
		stderr string
	}{
		{name: "echo", req: guestctl.ExecRequest{Command: []string{"echo", "hi"}}, stdout: "hi\n"},
		{name: "stdin eof", req: guestctl.ExecRequest{Command: []string{"cat"}}, stdin: "line1\nline2\n", stdout: "line1\nline2\n"},
		{name: "separate stderr and code", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "echo o; echo e >&2; exit 4"}}, code: 4, stdout: "o\n", stderr: "e\n"},
		{name: "task env and dir by default", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "echo $TASKVAR $(pwd)"}}, stdout: "from-task /tmp\n"},
		{name: "own env and dir", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "echo $X $TASKVAR $(pwd)"}, Env: []string{"X=mine"}, Dir: "/"}, stdout: "mine /\n"},
		{name: "not found", req: guestctl.ExecRequest{Command: []string{"no-such-command-xyz"}}, code: 127, stderr: "deskvm: no-such-command-xyz: command not found\n"},
		{name: "tty", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "test -t 0 && test -t 1 && echo tty-yes $TERM"}, TTY: true}, stdout: "tty-yes xterm\r\n"},
		{name: "tty stdin eof", req: guestctl.ExecRequest{Command: []string{"cat"}, TTY: true}, stdin: "typed\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code, err := c.Exec(ctx, tc.req, guestctl.ExecIO{Stdin: strings.NewReader(tc.stdin), Stdout: &stdout, Stderr: &stderr})
			must.NoError(t, err)
			must.Eq(t, tc.code, code, must.Sprintf("stdout %q stderr %q", stdout.String(), stderr.String()))
			if tc.req.TTY && tc.stdin != "" {
				// The terminal echoes the input and cat prints it again.
				must.StrContains(t, stdout.String(), "typed\r\ntyped\r\n")
				return
			}
			must.Eq(t, tc.stdout, stdout.String())
			must.Eq(t, tc.stderr, stderr.String())
		})
	}

	t.Run("tty resize", func(t *testing.T) {
		resize := make(chan guestctl.TermSize, 1)
		resize <- guestctl.TermSize{Rows: 40, Cols: 100}
		// stty reads the size once the resize has landed: wait for it by
		// retrying inside the guest command, not here.
		script := `for i in $(seq 100); do s=$(stty size); [ "$s" = "40 100" ] && break; sleep 0.05; done; echo "size $s"`
		var stdout bytes.Buffer
		code, err := c.Exec(ctx, guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", script}, TTY: true},
			guestctl.ExecIO{Stdout: &stdout, Resize: resize})
		must.NoError(t, err)
		must.Zero(t, code)
		must.StrContains(t, stdout.String(), "size 40 100")
	})

	t.Run("cancel kills the process group", func(t *testing.T) {
		pr, pw := io.Pipe()
		ectx, cancel := context.WithCancel(ctx)
		res := make(chan error, 1)
		go func() {
			_, err := c.Exec(ectx, guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "sleep 60 & echo $!; wait"}},
				guestctl.ExecIO{Stdout: pw})
			pw.Close()
			res <- err
		}()
		line, err := readLine(pr)
		must.NoError(t, err)
		pid, err := strconv.Atoi(line)
		must.NoError(t, err)
		cancel()
		must.ErrorIs(t, <-res, context.Canceled)
		eventually(t, 10*time.Second, "the exec's child to be gone", func() bool {
			_, err := os.Stat("/proc/" + line)
			return errors.Is(err, os.ErrNotExist)
		})
		must.Positive(t, pid)
	})
}

// TestReapsOrphans runs a command that leaves a child behind: when the child
// exits, the reaper must collect it (no zombie) while the command's status
// stays its own.
func TestReapsOrphans(t *testing.T) {
	a := newTestAgent(t)
	c := a.dial(t)
	must.NoError(t, c.Start(t.Context(), guestctl.Spec{TaskID: "o", Command: "/bin/sh",
		Args: []string{"-c", "sleep 0.3 & echo $!; exit 5"}}))
	st := waitExited(t, c)
	must.Eq(t, 5, st.ExitCode)
	pid := strings.TrimSpace(readFile(t, a.stdout))
	must.NotEq(t, "", pid)
	eventually(t, 10*time.Second, "the orphan "+pid+" to be reaped", func() bool {
		_, err := os.Stat("/proc/" + pid)
		return errors.Is(err, os.ErrNotExist)
	})
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return ""
	}
	must.NoError(t, err)
	return string(b)
}

func readLine(r io.Reader) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for {
		if _, err := r.Read(one); err != nil {
			return string(b), err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}
