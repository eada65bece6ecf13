package guestctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

// Dial timing. A connect to a socket that does not exist yet fails at once
// and is retried every dialRetry. A connect that succeeds can still wait for
// the agent: QEMU accepts the socket before the guest has opened its port and
// holds the handshake until it does. A handshake that gets no answer within
// the attempt timeout is abandoned (the guest may have read it in a session
// that it then tore down) and retried with a longer timeout.
var (
	dialRetry             = 100 * time.Millisecond
	firstHandshakeTimeout = 10 * time.Second
	maxHandshakeTimeout   = 30 * time.Second
)

// Client is the host side of one session with a guest agent. Its methods
// are safe for concurrent use; each runs on its own stream. When the session
// breaks (QEMU exited, the socket closed) every method fails and the caller
// dials again.
type Client struct {
	sess *yamux.Session
}

// Dial connects to the agent behind the QEMU chardev socket at socketPath.
// It keeps retrying, while the socket does not exist yet, while the guest is
// still booting and after a previous client went away, until the agent
// answers the handshake or ctx ends. Only an agent speaking an unknown
// protocol version (ErrIncompatible) ends it early.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	timeout := firstHandshakeTimeout
	var lastErr error
	for {
		c, err := dialOnce(ctx, socketPath, timeout)
		if err == nil {
			return c, nil
		}
		if errors.Is(err, ErrIncompatible) {
			return nil, fmt.Errorf("dial guest agent %s: %w", socketPath, err)
		}
		if errors.Is(err, errHandshakeTimeout) {
			timeout = min(2*timeout, maxHandshakeTimeout)
		}
		lastErr = err
		if ctx.Err() != nil {
			return nil, fmt.Errorf("dial guest agent %s: %w (last error: %v)", socketPath, ctx.Err(), lastErr)
		}
		t := time.NewTimer(dialRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("dial guest agent %s: %w (last error: %v)", socketPath, ctx.Err(), lastErr)
		case <-t.C:
		}
	}
}

var errHandshakeTimeout = errors.New("no handshake answer")

func dialOnce(ctx context.Context, socketPath string, timeout time.Duration) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	r, err := hostSync(conn, timeout, conn.SetDeadline)
	if !stop() || ctx.Err() != nil {
		conn.Close()
		return nil, ctx.Err()
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	c, err := clientOn(struct {
		io.Reader
		io.WriteCloser
	}{r, conn})
	if err != nil {
		return nil, err
	}
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := c.roundTrip(hctx, request{Op: opHello}); err != nil {
		c.Close()
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("%w within %s", errHandshakeTimeout, timeout)
		}
		return nil, err
	}
	return c, nil
}

// clientOn starts a client session on conn, after the sync.
func clientOn(conn io.ReadWriteCloser) (*Client, error) {
	sess, err := yamux.Client(conn, yamuxConfig())
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("start session: %w", err)
	}
	return &Client{sess: sess}, nil
}

// Close ends the session. The agent keeps running and keeps the command's
// status for the next client.
func (c *Client) Close() error {
	return c.sess.Close()
}

// Info describes the guest.
func (c *Client) Info(ctx context.Context) (Info, error) {
	resp, err := c.call(ctx, request{Op: opInfo})
	if err != nil {
		return Info{}, err
	}
	if resp.Info == nil {
		return Info{}, errors.New("guest agent info: empty answer")
	}
	return *resp.Info, nil
}

// Start mounts the Spec's shares, configures the guest and starts the
// command. It is idempotent: the same TaskID again is a no-op, another
// TaskID is ErrAlreadyStarted. A command that cannot start is not an error
// here: the status then says exited with 127 or 126.
func (c *Client) Start(ctx context.Context, s Spec) error {
	_, err := c.call(ctx, request{Op: opStart, Spec: &s})
	return err
}

// Status returns the command's status now.
func (c *Client) Status(ctx context.Context) (Status, error) {
	resp, err := c.call(ctx, request{Op: opStatus})
	if err != nil {
		return Status{}, err
	}
	if resp.Status == nil {
		return Status{}, errors.New("guest agent status: empty answer")
	}
	return *resp.Status, nil
}

// Wait blocks until the command has exited, ctx ends or the session breaks.
func (c *Client) Wait(ctx context.Context) (Status, error) {
	resp, err := c.call(ctx, request{Op: opWait})
	if err != nil {
		return Status{}, err
	}
	if resp.Status == nil {
		return Status{}, errors.New("guest agent wait: empty answer")
	}
	return *resp.Status, nil
}

// Signal sends sig to the command's process group. It returns ErrNotRunning
// when the command has not started or has exited.
func (c *Client) Signal(ctx context.Context, sig syscall.Signal) error {
	_, err := c.call(ctx, request{Op: opSignal, Signal: int(sig)})
	return err
}

// Ack tells the agent that the host has recorded the exit status; the agent
// then syncs and powers the VM off. It returns ErrNotExited while the command
// still runs.
func (c *Client) Ack(ctx context.Context) error {
	_, err := c.call(ctx, request{Op: opAck})
	return err
}

// call is roundTrip with the operation named in errors.
func (c *Client) call(ctx context.Context, req request) (response, error) {
	resp, err := c.roundTrip(ctx, req)
	if err != nil {
		return resp, fmt.Errorf("guest agent %s: %w", req.Op, err)
	}
	return resp, nil
}

// roundTrip sends one request on a new stream and reads the response.
func (c *Client) roundTrip(ctx context.Context, req request) (response, error) {
	st, err := c.sess.OpenStream()
	if err != nil {
		return response{}, fmt.Errorf("open stream: %w", err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	req.Version = ProtocolVersion
	fw := &frameWriter{w: st}
	if err := fw.writeJSON(req); err != nil {
		return response{}, streamErr(ctx, err)
	}
	var resp response
	if err := readJSON(st, &resp); err != nil {
		return response{}, streamErr(ctx, err)
	}
	if resp.Version > ProtocolVersion {
		return response{}, fmt.Errorf("%w: agent answered with version %d, host speaks %d", ErrIncompatible, resp.Version, ProtocolVersion)
	}
	return resp, resp.err()
}

// streamErr prefers the context's error to the timeout it caused.
func streamErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("session closed: %w", err)
	}
	return err
}

// Exec runs r in the guest with stdio attached and returns its exit code.
// Stdin reaching EOF closes the process's stdin (with TTY it sends the
// terminal's end-of-file character). ctx ending kills the process. A command
// that cannot start gives 127 or 126 with the reason on Stderr. Exec does not
// wait for a Stdin read that is still blocked when the process has exited.
func (c *Client) Exec(ctx context.Context, r ExecRequest, stdio ExecIO) (int, error) {
	if len(r.Command) == 0 {
		return 0, errors.New("guest agent exec: empty command")
	}
	st, err := c.sess.OpenStream()
	if err != nil {
		return 0, fmt.Errorf("guest agent exec: open stream: %w", err)
	}
	defer st.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	fw := &frameWriter{w: st}
	if err := fw.writeJSON(request{Version: ProtocolVersion, Op: opExec, Exec: &r}); err != nil {
		return 0, fmt.Errorf("guest agent exec: %w", streamErr(ctx, err))
	}
	go pumpStdin(ctx, fw, stdio.Stdin)
	if stdio.Resize != nil {
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case sz, ok := <-stdio.Resize:
					if !ok {
						return
					}
					if fw.write(frameResize, encodeResize(sz)) != nil {
						return
					}
				}
			}
		}()
	}

	for {
		typ, payload, err := readFrame(st)
		if err != nil {
			return 0, fmt.Errorf("guest agent exec: %w", streamErr(ctx, err))
		}
		var w io.Writer
		switch typ {
		case frameStdout:
			w = stdio.Stdout
		case frameStderr:
			w = stdio.Stderr
		case frameJSON:
			var resp response
			if err := jsonDecode(payload, &resp); err != nil {
				return 0, fmt.Errorf("guest agent exec: %w", err)
			}
			if err := resp.err(); err != nil {
				return 0, fmt.Errorf("guest agent exec: %w", err)
			}
			return resp.ExitCode, nil
		default:
			return 0, fmt.Errorf("guest agent exec: unexpected frame type %q", typ)
		}
		if w != nil {
			if _, err := w.Write(payload); err != nil {
				return 0, fmt.Errorf("guest agent exec: write output: %w", err)
			}
		}
	}
}

// pumpStdin forwards stdin as frames and then sends end-of-file. A nil stdin
// is empty.
func pumpStdin(ctx context.Context, fw *frameWriter, stdin io.Reader) {
	if stdin != nil {
		buf := make([]byte, dataChunk)
		for ctx.Err() == nil {
			n, err := stdin.Read(buf)
			if n > 0 {
				if fw.write(frameStdin, buf[:n]) != nil {
					return
				}
			}
			if err != nil {
				break
			}
		}
	}
	if ctx.Err() == nil {
		fw.write(frameStdinEOF, nil)
	}
}
