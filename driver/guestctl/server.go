package guestctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

// Handler is the agent side of the protocol. Serve calls it concurrently,
// once per request; ctx ends when the request's stream or the session ends.
type Handler interface {
	Info(ctx context.Context) (Info, error)
	// Start starts the Spec; the same TaskID again is a no-op and another
	// TaskID is ErrAlreadyStarted.
	Start(ctx context.Context, s Spec) error
	Status(ctx context.Context) (Status, error)
	// Wait blocks until the command has exited or ctx ends.
	Wait(ctx context.Context) (Status, error)
	// Signal signals the command's process group, or returns ErrNotRunning.
	Signal(ctx context.Context, sig syscall.Signal) error
	// Ack is called when the host has recorded the exit status: Serve
	// checks that the command has exited, replies, and calls Ack once the
	// host has closed the stream (or after ten seconds). The agent powers
	// off in Ack.
	Ack(ctx context.Context) error
	// Exec runs a process and returns its exit code once it has exited and
	// its output is drained. ctx ending must kill it.
	Exec(ctx context.Context, r ExecRequest, stdio ExecIO) (int, error)
}

// requestTimeout bounds how long the agent waits for the request frame of a
// new stream.
const requestTimeout = 30 * time.Second

// ackTimeout bounds how long the agent waits for the host to close its Ack
// stream before it powers off anyway.
const ackTimeout = 10 * time.Second

// Serve serves one host connection: it waits for the host's sync marker,
// answers it and serves the session until the host goes away (reported as
// nil), ctx ends or the session fails. It closes conn and returns only when
// every request handler has returned. The agent uses ServePort instead; Serve
// suits a transport with one connection per host, as in tests.
func Serve(ctx context.Context, conn io.ReadWriteCloser, h Handler) error {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	sr := &syncReader{r: conn}
	gen, err := sr.await(ctx, 0, nil)
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return fmt.Errorf("wait for host: %w", err)
	}
	return serveSession(ctx, &sessionConn{sr: sr, gen: gen, w: conn, interrupt: func() { conn.Close() }}, h)
}

// Port is the guest's end of the control channel, open for the agent's
// life. Read returns io.EOF while the host is away, as a virtio-serial port
// does. An *os.File of a character device is a Port.
type Port interface {
	io.ReadWriter
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// PortConfig tunes ServePort.
type PortConfig struct {
	// AwaitHost is called when the port reads end of file and returns when
	// the host may be back (or ctx ended). Nil waits 50 ms.
	AwaitHost func(ctx context.Context) error
	// Session, if set, hears of each host session: once when it starts and
	// once when it ends, with the reason (nil: the host went away).
	Session func(started bool, err error)
}

// ServePort serves host sessions on port one after the other until ctx
// ends. Each host connection is found by its sync marker, so a host that
// reconnects faster than the guest can notice still gets a fresh session,
// and the bytes of the old one are discarded.
func ServePort(ctx context.Context, port Port, h Handler, cfg PortConfig) error {
	if cfg.AwaitHost == nil {
		cfg.AwaitHost = func(ctx context.Context) error {
			t := time.NewTimer(50 * time.Millisecond)
			defer t.Stop()
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-t.C:
				return nil
			}
		}
	}
	if cfg.Session == nil {
		cfg.Session = func(bool, error) {}
	}
	past := time.Unix(1, 0)
	interrupt := func() {
		port.SetReadDeadline(past)
		port.SetWriteDeadline(past)
	}
	stop := context.AfterFunc(ctx, interrupt)
	defer stop()
	sr := &syncReader{r: port}
	gen := 0
	for {
		// Undo the interruption that ended the previous session, unless it
		// was ctx's.
		port.SetReadDeadline(time.Time{})
		port.SetWriteDeadline(time.Time{})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var err error
		gen, err = sr.await(ctx, gen, cfg.AwaitHost)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("wait for host: %w", err)
		}
		cfg.Session(true, nil)
		err = serveSession(ctx, &sessionConn{sr: sr, gen: gen, w: port, interrupt: interrupt}, h)
		cfg.Session(false, err)
	}
}

// serveSession answers the host's sync marker on c and serves its yamux
// session. The end of the host (EOF) or its replacement by a new connection
// return nil.
func serveSession(ctx context.Context, c *sessionConn, h Handler) error {
	nonce := make([]byte, nonceLen)
	if _, err := io.ReadFull(c, nonce); err != nil {
		return sessionEnd(ctx, fmt.Errorf("read sync nonce: %w", err))
	}
	if _, err := c.Write(append([]byte(syncMagic), nonce...)); err != nil {
		return sessionEnd(ctx, fmt.Errorf("echo sync marker: %w", err))
	}
	sess, err := yamux.Server(c, yamuxConfig())
	if err != nil {
		return fmt.Errorf("start session: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()

	var wg sync.WaitGroup
	defer func() {
		sess.Close()
		cancel()
		wg.Wait()
	}()
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			return sessionEnd(ctx, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveStream(ctx, st, h)
		}()
	}
}

// sessionEnd maps the error that ended a session: the host going away or
// being replaced is the normal end.
func sessionEnd(ctx context.Context, err error) error {
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, errResync):
		return nil
	default:
		return err
	}
}

// serveStream answers one request.
func serveStream(ctx context.Context, st *yamux.Stream, h Handler) {
	defer st.Close()
	var req request
	st.SetReadDeadline(time.Now().Add(requestTimeout))
	if err := readJSON(st, &req); err != nil {
		return
	}
	st.SetReadDeadline(time.Time{})
	fw := &frameWriter{w: st}
	if req.Version < 1 || req.Version > ProtocolVersion {
		fw.writeJSON(errorResponse(fmt.Errorf("%w: agent speaks version %d, host sent %d", ErrIncompatible, ProtocolVersion, req.Version)))
		return
	}
	if req.Op == opExec {
		serveExec(ctx, st, fw, req, h)
		return
	}

	// The host closes its side of a plain request only when it has read the
	// reply or gives up; either way the work on its behalf can stop.
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hostClosed := make(chan struct{})
	go func() {
		defer close(hostClosed)
		defer cancel()
		io.Copy(io.Discard, st)
	}()

	resp := response{Version: ProtocolVersion}
	var err error
	switch req.Op {
	case opHello:
	case opInfo:
		var info Info
		info, err = h.Info(rctx)
		resp.Info = &info
	case opStart:
		if req.Spec == nil {
			err = errors.New("start without spec")
			break
		}
		err = h.Start(rctx, *req.Spec)
	case opStatus:
		var s Status
		s, err = h.Status(rctx)
		resp.Status = &s
	case opWait:
		var s Status
		s, err = h.Wait(rctx)
		resp.Status = &s
	case opSignal:
		err = h.Signal(rctx, syscall.Signal(req.Signal))
	case opAck:
		var s Status
		s, err = h.Status(rctx)
		if err == nil && s.State != StateExited {
			err = fmt.Errorf("ack in state %s: %w", s.State, ErrNotExited)
		}
	default:
		err = fmt.Errorf("unknown operation %q", req.Op)
	}
	if err != nil {
		resp = errorResponse(err)
	}
	if fw.writeJSON(resp) != nil || err != nil || req.Op != opAck {
		return
	}
	// The host acks only what it has recorded, so the agent may power off
	// whatever happens now; waiting for the host to close the stream just
	// lets the reply reach it first, so that its Ack returns nil rather than
	// a broken connection.
	t := time.NewTimer(ackTimeout)
	defer t.Stop()
	select {
	case <-hostClosed:
	case <-t.C:
	}
	h.Ack(ctx)
}

// serveExec runs an exec request: stdin and resize frames from the host feed
// the process, its output goes back as frames, and the last frame is the
// response with the exit code. The host closing the stream early cancels the
// exec.
func serveExec(ctx context.Context, st *yamux.Stream, fw *frameWriter, req request, h Handler) {
	if req.Exec == nil || len(req.Exec.Command) == 0 {
		fw.writeJSON(errorResponse(errors.New("exec without command")))
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	stdin := newQueue()
	resize := make(chan TermSize, 4)
	go func() {
		// Reading frames ends on the host's close or a broken stream; if the
		// exec still runs by then, the host has given up on it. This loop
		// never blocks on the process, so it always sees that.
		defer cancel()
		for {
			typ, payload, err := readFrame(st)
			if err != nil {
				stdin.close(errors.New("exec cancelled by host"))
				return
			}
			switch typ {
			case frameStdin:
				stdin.push(payload)
			case frameStdinEOF:
				stdin.close(io.EOF)
			case frameResize:
				var sz TermSize
				if decodeResize(payload, &sz) == nil {
					select {
					case resize <- sz:
					default: // the process is behind on resizes; drop one
					}
				}
			}
		}
	}()
	// Once cancelled, writes to the host must fail rather than block on a
	// window that nobody will open again.
	stop := context.AfterFunc(ctx, func() { st.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()

	code, err := h.Exec(ctx, *req.Exec, ExecIO{
		Stdin:  stdin,
		Stdout: dataWriter{fw: fw, typ: frameStdout},
		Stderr: dataWriter{fw: fw, typ: frameStderr},
		Resize: resize,
	})
	stdin.close(io.EOF)
	resp := response{Version: ProtocolVersion, ExitCode: code}
	if err != nil {
		resp = errorResponse(err)
	}
	fw.writeJSON(resp)
}

// queue is the stdin of an exec: an unbounded buffer, so that reading frames
// never waits for the process.
type queue struct {
	mu   sync.Mutex
	cond *sync.Cond
	bufs [][]byte
	err  error
}

func newQueue() *queue {
	q := &queue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *queue) push(b []byte) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.err == nil && len(b) > 0 {
		q.bufs = append(q.bufs, b)
		q.cond.Signal()
	}
}

// close ends the queue: readers get what is buffered, then err.
func (q *queue) close(err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.err == nil {
		q.err = err
		q.cond.Broadcast()
	}
}

func (q *queue) Read(p []byte) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.bufs) == 0 && q.err == nil {
		q.cond.Wait()
	}
	if len(q.bufs) == 0 {
		return 0, q.err
	}
	n := copy(p, q.bufs[0])
	if n == len(q.bufs[0]) {
		q.bufs = q.bufs[1:]
	} else {
		q.bufs[0] = q.bufs[0][n:]
	}
	return n, nil
}
