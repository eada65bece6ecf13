package guestctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
	"github.com/shoenig/test/must"
)

// fakeAgent is a Handler that runs nothing: tests drive its command's exit.
type fakeAgent struct {
	mu      sync.Mutex
	spec    *Spec
	status  Status
	exited  chan struct{}
	signals []syscall.Signal
	acked   chan struct{}
	ackOnce sync.Once
	// waitCalls hears of every Wait.
	waitCalls chan struct{}
	// execCancelled is closed when an exec's context ends before it returns.
	execCancelled chan struct{}
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{
		status:        Status{State: StateWaiting},
		exited:        make(chan struct{}),
		acked:         make(chan struct{}),
		execCancelled: make(chan struct{}, 1),
		waitCalls:     make(chan struct{}, 16),
	}
}

func (a *fakeAgent) Info(context.Context) (Info, error) {
	return Info{AgentVersion: "fake", Kernel: "6.1.0-test", MemTotalMiB: 256, MemAvailableMiB: 200}, nil
}

func (a *fakeAgent) Start(_ context.Context, s Spec) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.spec != nil {
		if a.spec.TaskID == s.TaskID {
			return nil
		}
		return fmt.Errorf("start %s: %w", s.TaskID, ErrAlreadyStarted)
	}
	a.spec = &s
	a.status = Status{State: StateRunning, Pid: 42, StartedAt: time.Now()}
	return nil
}

func (a *fakeAgent) exit(code int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.status.State = StateExited
	a.status.ExitCode = code
	a.status.ExitedAt = time.Now()
	close(a.exited)
}

func (a *fakeAgent) Status(context.Context) (Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status, nil
}

func (a *fakeAgent) Wait(ctx context.Context) (Status, error) {
	select {
	case a.waitCalls <- struct{}{}:
	default:
	}
	select {
	case <-a.exited:
		return a.Status(ctx)
	case <-ctx.Done():
		return Status{}, ctx.Err()
	}
}

func (a *fakeAgent) Signal(_ context.Context, sig syscall.Signal) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.status.State != StateRunning {
		return fmt.Errorf("signal: %w", ErrNotRunning)
	}
	a.signals = append(a.signals, sig)
	return nil
}

func (a *fakeAgent) Ack(context.Context) error {
	a.ackOnce.Do(func() { close(a.acked) })
	return nil
}

// Exec understands a few commands: "upper" echoes stdin upper-cased to
// stdout and "done" to stderr, "size" prints the first resize, "block"
// waits for cancellation, "fail" is a handler error.
func (a *fakeAgent) Exec(ctx context.Context, r ExecRequest, stdio ExecIO) (int, error) {
	switch r.Command[0] {
	case "upper":
		b, err := io.ReadAll(stdio.Stdin)
		if err != nil {
			return 0, err
		}
		fmt.Fprint(stdio.Stdout, strings.ToUpper(string(b)))
		fmt.Fprint(stdio.Stderr, "done")
		return 3, nil
	case "size":
		select {
		case sz := <-stdio.Resize:
			fmt.Fprintf(stdio.Stdout, "%dx%d tty=%v", sz.Rows, sz.Cols, r.TTY)
			return 0, nil
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	case "block":
		<-ctx.Done()
		a.execCancelled <- struct{}{}
		return 137, nil
	case "big":
		chunk := bytes.Repeat([]byte("x"), 1000)
		for range 1000 {
			if _, err := stdio.Stdout.Write(chunk); err != nil {
				return 0, err
			}
		}
		return 0, nil
	}
	return 0, errors.New("fail: no such fake command")
}

// serveSocket serves h on a unix socket the way QEMU's chardev does: one
// host connection at a time, each its own session. It returns the socket
// path.
func serveSocket(t *testing.T, h Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", path)
	must.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			Serve(ctx, conn, h)
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		<-done
	})
	return path
}

func dial(t *testing.T, path string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	must.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestLifecycle(t *testing.T) {
	ctx := t.Context()
	a := newFakeAgent()
	c := dial(t, serveSocket(t, a))

	info, err := c.Info(ctx)
	must.NoError(t, err)
	must.Eq(t, Info{AgentVersion: "fake", Kernel: "6.1.0-test", MemTotalMiB: 256, MemAvailableMiB: 200}, info)

	st, err := c.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, StateWaiting, st.State)
	must.ErrorIs(t, c.Signal(ctx, syscall.SIGTERM), ErrNotRunning, must.Sprint("signal before start"))

	spec := Spec{
		TaskID: "t1", Command: "/bin/sh", Args: []string{"-c", "x"}, Env: []string{"A=1", "B= spaced "},
		Dir: "/work", Hostname: "h", Mounts: []Mount{{Tag: "local", Path: "/local", ReadOnly: true}},
		Network: &Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: "10.0.2.3"},
	}
	must.NoError(t, c.Start(ctx, spec))
	must.Eq(t, spec, *a.spec, must.Sprint("the spec survives the wire"))
	must.NoError(t, c.Start(ctx, spec), must.Sprint("same task id is a no-op"))
	other := spec
	other.TaskID = "t2"
	err = c.Start(ctx, other)
	must.ErrorIs(t, err, ErrAlreadyStarted)
	must.StrContains(t, err.Error(), "guest agent start: start t2")

	must.NoError(t, c.Signal(ctx, syscall.SIGUSR1))
	must.Eq(t, []syscall.Signal{syscall.SIGUSR1}, a.signals)
	must.ErrorIs(t, c.Ack(ctx), ErrNotExited, must.Sprint("ack while running"))

	// Wait blocks until the command exits.
	waited := make(chan Status, 1)
	go func() {
		st, _ := c.Wait(ctx)
		waited <- st
	}()
	select {
	case st := <-waited:
		t.Fatalf("wait returned %+v while the command runs", st)
	default:
	}
	a.exit(7)
	select {
	case st := <-waited:
		must.Eq(t, StateExited, st.State)
		must.Eq(t, 7, st.ExitCode)
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not return after the exit")
	}

	must.NoError(t, c.Ack(ctx))
	select {
	case <-a.acked:
	case <-time.After(10 * time.Second):
		t.Fatal("the agent was not told of the ack")
	}
}

func TestWaitCancel(t *testing.T) {
	a := newFakeAgent()
	c := dial(t, serveSocket(t, a))
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := c.Wait(ctx)
	must.ErrorIs(t, err, context.DeadlineExceeded)
	// The session stays usable.
	_, err = c.Status(t.Context())
	must.NoError(t, err)
}

func TestExec(t *testing.T) {
	a := newFakeAgent()
	c := dial(t, serveSocket(t, a))
	cases := []struct {
		name   string
		req    ExecRequest
		stdin  io.Reader
		resize []TermSize
		code   int
		stdout string
		stderr string
		err    string
	}{
		{name: "stdin to eof", req: ExecRequest{Command: []string{"upper"}}, stdin: strings.NewReader("hello"), code: 3, stdout: "HELLO", stderr: "done"},
		{name: "nil stdin is empty", req: ExecRequest{Command: []string{"upper"}}, code: 3, stderr: "done"},
		{name: "resize with tty", req: ExecRequest{Command: []string{"size"}, TTY: true}, resize: []TermSize{{Rows: 50, Cols: 132}}, stdout: "50x132 tty=true"},
		{name: "large output", req: ExecRequest{Command: []string{"big"}}, stdout: strings.Repeat("x", 1000*1000)},
		{name: "handler error", req: ExecRequest{Command: []string{"fail"}}, err: "fail: no such fake command"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			var resize chan TermSize
			if tc.resize != nil {
				resize = make(chan TermSize, len(tc.resize))
				for _, sz := range tc.resize {
					resize <- sz
				}
			}
			code, err := c.Exec(t.Context(), tc.req, ExecIO{Stdin: tc.stdin, Stdout: &stdout, Stderr: &stderr, Resize: resize})
			if tc.err != "" {
				must.ErrorContains(t, err, tc.err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.code, code)
			must.Eq(t, tc.stdout, stdout.String())
			must.Eq(t, tc.stderr, stderr.String())
		})
	}
}

func TestExecCancel(t *testing.T) {
	a := newFakeAgent()
	c := dial(t, serveSocket(t, a))
	ctx, cancel := context.WithCancel(t.Context())
	res := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, ExecRequest{Command: []string{"block"}}, ExecIO{})
		res <- err
	}()
	// Stdin is nil, so its EOF reaches the agent, which must not take that
	// for a cancellation.
	select {
	case <-a.execCancelled:
		t.Fatal("exec cancelled before the host cancelled it")
	case <-time.After(200 * time.Millisecond):
	}
	cancel()
	select {
	case <-a.execCancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("cancelling the host's context did not cancel the exec in the agent")
	}
	must.ErrorIs(t, <-res, context.Canceled)
}

// TestReconnect drops the host side mid-run and dials again: the agent keeps
// the command and its exit status for the next client.
func TestReconnect(t *testing.T) {
	ctx := t.Context()
	a := newFakeAgent()
	path := serveSocket(t, a)
	c := dial(t, path)
	must.NoError(t, c.Start(ctx, Spec{TaskID: "t", Command: "x"}))

	// A Wait in flight when the host goes away fails rather than hangs.
	waitErr := make(chan error, 1)
	go func() {
		_, err := c.Wait(ctx)
		waitErr <- err
	}()
	must.NoError(t, c.Close())
	select {
	case err := <-waitErr:
		must.Error(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not fail when the session closed")
	}
	_, err := c.Status(ctx)
	must.Error(t, err, must.Sprint("a closed client fails"))

	a.exit(9) // while no host is connected
	c2 := dial(t, path)
	st, err := c2.Wait(ctx)
	must.NoError(t, err)
	must.Eq(t, StateExited, st.State)
	must.Eq(t, 9, st.ExitCode)
}

// TestDialWaitsForSocket dials before the socket exists, as the driver does
// right after starting QEMU.
func TestDialWaitsForSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	type result struct {
		c   *Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := Dial(ctx, path)
		res <- result{c, err}
	}()
	select {
	case r := <-res:
		t.Fatalf("dial returned before the socket existed: %v", r.err)
	case <-time.After(300 * time.Millisecond):
	}
	ln, err := net.Listen("unix", path)
	must.NoError(t, err)
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err == nil {
			Serve(ctx, conn, newFakeAgent())
		}
	}()
	r := <-res
	must.NoError(t, r.err)
	r.c.Close()
}

// TestDialSilentAgent covers a socket whose agent never answers: Dial keeps
// trying until its context ends and then says so.
func TestDialSilentAgent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", path)
	must.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close() // hold it, answer nothing
		}
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, err = Dial(ctx, path)
	must.ErrorIs(t, err, context.DeadlineExceeded)
	must.StrContains(t, err.Error(), path)
}

// TestDialStaleHandshake has the first connection's handshake swallowed (as
// when the guest reads it in a session it then tears down); Dial must give
// up on it and succeed on a new connection.
func TestDialStaleHandshake(t *testing.T) {
	saved := firstHandshakeTimeout
	firstHandshakeTimeout = 200 * time.Millisecond
	t.Cleanup(func() { firstHandshakeTimeout = saved })

	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", path)
	must.NoError(t, err)
	defer ln.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	go func() {
		first, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, first) // swallow until the host gives up
		first.Close()
		conn, err := ln.Accept()
		if err == nil {
			Serve(ctx, conn, newFakeAgent())
		}
	}()
	c, err := Dial(ctx, path)
	must.NoError(t, err)
	c.Close()
}

// agentSync answers the host's sync marker the way the agent does.
func agentSync(conn io.ReadWriter) error {
	hello := make([]byte, len(syncMagic)+nonceLen)
	if _, err := io.ReadFull(conn, hello); err != nil {
		return err
	}
	_, err := conn.Write(hello)
	return err
}

// TestVersion checks that each side refuses a protocol version it does not
// know.
func TestVersion(t *testing.T) {
	t.Run("agent refuses a newer host", func(t *testing.T) {
		hostEnd, agentEnd := net.Pipe()
		go Serve(t.Context(), agentEnd, newFakeAgent())
		r, err := hostSync(hostEnd, 5*time.Second, hostEnd.SetDeadline)
		must.NoError(t, err)
		c, err := clientOn(struct {
			io.Reader
			io.WriteCloser
		}{r, hostEnd})
		must.NoError(t, err)
		defer c.Close()
		st, err := c.sess.OpenStream()
		must.NoError(t, err)
		fw := &frameWriter{w: st}
		must.NoError(t, fw.writeJSON(request{Version: ProtocolVersion + 1, Op: opStatus}))
		var resp response
		must.NoError(t, readJSON(st, &resp))
		must.ErrorIs(t, resp.err(), ErrIncompatible)
	})
	t.Run("host refuses a newer agent", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "ctl.sock")
		ln, err := net.Listen("unix", path)
		must.NoError(t, err)
		defer ln.Close()
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
			if agentSync(conn) != nil {
				return
			}
			sess, err := yamux.Server(conn, yamuxConfig())
			if err != nil {
				return
			}
			st, err := sess.AcceptStream()
			if err != nil {
				return
			}
			var req request
			readJSON(st, &req)
			(&frameWriter{w: st}).writeJSON(response{Version: ProtocolVersion + 1})
			io.Copy(io.Discard, st)
		}()
		_, err = Dial(t.Context(), path)
		must.ErrorIs(t, err, ErrIncompatible)
	})
}

func TestFrames(t *testing.T) {
	t.Run("round trip", func(t *testing.T) {
		var buf bytes.Buffer
		fw := &frameWriter{w: &buf}
		must.NoError(t, fw.write(frameStdout, []byte("abc")))
		must.NoError(t, fw.write(frameStdinEOF, nil))
		typ, p, err := readFrame(&buf)
		must.NoError(t, err)
		must.Eq(t, frameStdout, typ)
		must.Eq(t, "abc", string(p))
		typ, p, err = readFrame(&buf)
		must.NoError(t, err)
		must.Eq(t, frameStdinEOF, typ)
		must.SliceEmpty(t, p)
		_, _, err = readFrame(&buf)
		must.ErrorIs(t, err, io.EOF)
	})
	t.Run("oversized frame", func(t *testing.T) {
		_, _, err := readFrame(bytes.NewReader([]byte{frameStdout, 0xff, 0xff, 0xff, 0xff}))
		must.ErrorContains(t, err, "exceeds")
	})
	t.Run("truncated payload", func(t *testing.T) {
		_, _, err := readFrame(bytes.NewReader([]byte{frameStdout, 0, 0, 0, 9, 'a'}))
		must.ErrorIs(t, err, io.ErrUnexpectedEOF)
	})
	t.Run("resize", func(t *testing.T) {
		var sz TermSize
		must.NoError(t, decodeResize(encodeResize(TermSize{Rows: 1, Cols: 65535}), &sz))
		must.Eq(t, TermSize{Rows: 1, Cols: 65535}, sz)
		must.Error(t, decodeResize([]byte{1}, &sz))
	})
	t.Run("sentinels survive the wire", func(t *testing.T) {
		for _, s := range []error{ErrNotRunning, ErrNotExited, ErrAlreadyStarted, ErrIncompatible} {
			err := errorResponse(fmt.Errorf("context: %w", s)).err()
			must.ErrorIs(t, err, s)
			must.Eq(t, "context: "+s.Error(), err.Error())
		}
		must.Eq(t, "plain", errorResponse(errors.New("plain")).err().Error())
	})
}
