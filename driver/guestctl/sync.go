package guestctl

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"
)

// Every host connection starts with syncMagic and a random nonce; the agent
// answers with the same bytes and only then do both sides start yamux.
//
// This is needed because the guest cannot see reliably where one host
// connection ends and the next begins. A virtio-serial port reads end of
// file only while the host is away: when the host drops the socket and
// connects again quickly, QEMU sends the guest "closed" and "open" in one
// batch and the guest never reads the end of file. Bytes of the old
// connection may also still sit in the port's buffer. The agent therefore
// scans every byte it reads for syncMagic; finding it ends the current
// session and starts a new one right after the marker. The host, likewise,
// skips whatever the guest wrote before the echo of its own nonce (frames of
// a session the guest had not yet torn down).
const syncMagic = "\x00\xffdeskvm-guestctl-sync\xff\x00"

// nonceLen is the length of the nonce after syncMagic.
const nonceLen = 16

// maxSyncSkip bounds how much stale output the host skips while looking for
// its echo.
const maxSyncSkip = 16 << 20

// errResync ends a session whose host has been replaced by a new connection.
var errResync = errors.New("host connection replaced")

// syncReader reads a long-lived stream that carries host sessions one after
// the other, and finds the markers that start them in every byte it reads,
// whichever session reads them. It is not safe for concurrent use; sessions
// read one after the other.
type syncReader struct {
	r       io.Reader
	matched int    // bytes of syncMagic matched so far, across reads
	gen     int    // markers seen
	pending []byte // bytes after the latest marker, not yet read
}

// read reads for the session of generation gen. Once a newer marker has been
// seen it returns errResync; the bytes after that marker are kept for the
// next session.
func (s *syncReader) read(gen int, p []byte) (int, error) {
	if s.gen != gen {
		return 0, errResync
	}
	var n int
	if len(s.pending) > 0 {
		n = copy(p, s.pending)
		s.pending = s.pending[n:]
	} else {
		var err error
		n, err = s.r.Read(p)
		if n == 0 {
			if err == nil {
				err = io.ErrNoProgress
			}
			return 0, err
		}
	}
	for i := 0; i < n; i++ {
		switch {
		case p[i] == syncMagic[s.matched]:
			s.matched++
		case p[i] == syncMagic[0]:
			s.matched = 1
		default:
			s.matched = 0
		}
		if s.matched < len(syncMagic) {
			continue
		}
		s.matched = 0
		s.gen++
		s.pending = append(slices.Clone(p[i+1:n]), s.pending...)
		// Deliver what came before the marker; the part of the marker that
		// an earlier read delivered is garbage to a session that is ending.
		if start := i + 1 - len(syncMagic); start > 0 {
			return start, nil
		}
		return 0, errResync
	}
	return n, nil
}

// await discards bytes until a marker newer than gen and returns the new
// generation. On end of file it calls awaitHost (nil: end of file is final
// and returned).
func (s *syncReader) await(ctx context.Context, gen int, awaitHost func(context.Context) error) (int, error) {
	buf := make([]byte, 4096)
	for {
		if err := ctx.Err(); err != nil {
			return gen, err
		}
		_, err := s.read(gen, buf)
		switch {
		case err == nil:
		case errors.Is(err, errResync):
			return s.gen, nil
		case errors.Is(err, io.EOF) && awaitHost != nil:
			if err := awaitHost(ctx); err != nil {
				return gen, err
			}
		default:
			if ctx.Err() != nil {
				return gen, ctx.Err()
			}
			return gen, err
		}
	}
}

// sessionConn is one host session on the stream: it reads its own
// generation and writes to the stream; Close interrupts it without closing
// the stream.
type sessionConn struct {
	sr        *syncReader
	gen       int
	w         io.Writer
	interrupt func()
}

func (c *sessionConn) Read(p []byte) (int, error)  { return c.sr.read(c.gen, p) }
func (c *sessionConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *sessionConn) Close() error {
	c.interrupt()
	return nil
}

// newNonce returns a random nonce.
func newNonce() []byte {
	b := make([]byte, nonceLen)
	rand.Read(b)
	return b
}

// hostSync announces a new host connection on conn and skips the agent's
// output up to the echo. It returns a reader that continues right after the
// echo.
func hostSync(conn io.ReadWriter, timeout time.Duration, setDeadline func(time.Time) error) (io.Reader, error) {
	nonce := newNonce()
	hello := append([]byte(syncMagic), nonce...)
	setDeadline(time.Now().Add(timeout))
	defer setDeadline(time.Time{})
	if _, err := conn.Write(hello); err != nil {
		return nil, fmt.Errorf("send sync marker: %w", err)
	}
	// Skip until the echo; carry holds the bytes that could begin it.
	var carry []byte
	buf := make([]byte, 4096)
	skipped := 0
	for {
		n, err := conn.Read(buf)
		data := append(carry, buf[:n]...)
		if i := bytes.Index(data, hello); i >= 0 {
			rest := slices.Clone(data[i+len(hello):])
			return io.MultiReader(bytes.NewReader(rest), conn), nil
		}
		carry = slices.Clone(data[max(0, len(data)-(len(hello)-1)):])
		skipped += n
		if skipped > maxSyncSkip {
			return nil, fmt.Errorf("no sync echo within %d bytes", maxSyncSkip)
		}
		if err != nil {
			var to interface{ Timeout() bool }
			if errors.As(err, &to) && to.Timeout() {
				return nil, fmt.Errorf("%w within %s", errHandshakeTimeout, timeout)
			}
			return nil, fmt.Errorf("wait for sync echo: %w", err)
		}
	}
}
