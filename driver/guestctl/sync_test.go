package guestctl

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/shoenig/test/must"
)

// chunks is a reader that returns its chunks one per Read, as a port
// delivers its buffers.
type chunks struct{ c [][]byte }

func (r *chunks) Read(p []byte) (int, error) {
	if len(r.c) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.c[0])
	if n == len(r.c[0]) {
		r.c = r.c[1:]
	} else {
		r.c[0] = r.c[0][n:]
	}
	return n, nil
}

// sessions reads everything from a syncReader, following markers, and
// returns what each generation read.
func sessions(t *testing.T, sr *syncReader) map[int]string {
	t.Helper()
	got := map[int]string{}
	gen := 0
	buf := make([]byte, 7) // small, so reads split everything
	for range 10000 {
		n, err := sr.read(gen, buf)
		got[gen] += string(buf[:n])
		switch {
		case errors.Is(err, errResync):
			gen = sr.gen
		case errors.Is(err, io.EOF):
			return got
		case err != nil:
			t.Fatalf("read: %v", err)
		}
	}
	t.Fatal("reader did not end")
	return nil
}

func TestSyncReader(t *testing.T) {
	m := syncMagic
	cases := []struct {
		name   string
		chunks []string
		want   map[int]string
	}{
		{name: "no marker", chunks: []string{"stale bytes"}, want: map[int]string{0: "stale bytes"}},
		{name: "marker in one chunk", chunks: []string{"old" + m + "new"}, want: map[int]string{0: "old", 1: "new"}},
		{name: "marker split across chunks", chunks: []string{"old" + m[:5], m[5:17], m[17:] + "new"}, want: map[int]string{0: "old", 1: "new"}},
		{name: "two markers", chunks: []string{"a" + m + "b" + m + "c"}, want: map[int]string{0: "a", 1: "b", 2: "c"}},
		{name: "marker after its first byte repeated", chunks: []string{"\x00" + m + "x"}, want: map[int]string{0: "\x00", 1: "x"}},
		{name: "near miss", chunks: []string{m[:10] + "!" + m[11:]}, want: map[int]string{0: m[:10] + "!" + m[11:]}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var c [][]byte
			for _, s := range tc.chunks {
				c = append(c, []byte(s))
			}
			got := sessions(t, &syncReader{r: &chunks{c: c}})
			for gen := range got {
				// A session that ends may have read the start of the marker
				// that ends it, in an earlier read: garbage to it, and only
				// ever a prefix of the marker.
				for k := len(syncMagic) - 1; k > 0; k-- {
					if _, ok := got[gen+1]; ok && strings.HasSuffix(got[gen], syncMagic[:k]) {
						got[gen] = strings.TrimSuffix(got[gen], syncMagic[:k])
						break
					}
				}
				if got[gen] == "" {
					delete(got, gen)
				}
			}
			must.Eq(t, tc.want, got)
		})
	}
}

func TestHostSync(t *testing.T) {
	t.Run("skips stale output", func(t *testing.T) {
		hostEnd, agentEnd := net.Pipe()
		defer hostEnd.Close()
		go func() {
			hello := make([]byte, len(syncMagic)+nonceLen)
			io.ReadFull(agentEnd, hello)
			// frames of a session the agent has not torn down yet, then the echo
			agentEnd.Write([]byte("stale yamux frames" + syncMagic + "wrong nonce!!!!!"))
			agentEnd.Write(hello)
			agentEnd.Write([]byte("session bytes"))
			agentEnd.Close()
		}()
		r, err := hostSync(hostEnd, 5*time.Second, hostEnd.SetDeadline)
		must.NoError(t, err)
		rest, _ := io.ReadAll(r)
		must.Eq(t, "session bytes", string(rest))
	})
	t.Run("times out", func(t *testing.T) {
		hostEnd, agentEnd := net.Pipe()
		defer hostEnd.Close()
		go io.Copy(io.Discard, agentEnd)
		_, err := hostSync(hostEnd, 50*time.Millisecond, hostEnd.SetDeadline)
		must.ErrorIs(t, err, errHandshakeTimeout)
	})
	t.Run("one byte at a time", func(t *testing.T) {
		hostEnd, agentEnd := net.Pipe()
		defer hostEnd.Close()
		go func() {
			agentSync(agentEnd)
			agentEnd.Write([]byte("after"))
			agentEnd.Close()
		}()
		conn := struct {
			io.Reader
			io.Writer
		}{iotest.OneByteReader(hostEnd), hostEnd}
		r, err := hostSync(conn, 5*time.Second, hostEnd.SetDeadline)
		must.NoError(t, err)
		rest, _ := io.ReadAll(r)
		must.Eq(t, "after", string(rest))
	})
}

// fakeChardev is QEMU's socket chardev in front of a virtio-serial port, in
// its worst case: it accepts one host connection at a time and never lets the
// guest see the host go away (no end of file), as when a host reconnects
// faster than the guest notices.
type fakeChardev struct {
	path string
	mu   sync.Mutex
	cur  net.Conn
}

func newFakeChardev(t *testing.T, guest net.Conn) *fakeChardev {
	t.Helper()
	f := &fakeChardev{path: filepath.Join(t.TempDir(), "ctl.sock")}
	ln, err := net.Listen("unix", f.path)
	must.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() { // host -> guest, one connection after the other
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.cur = conn
			f.mu.Unlock()
			io.Copy(guest, conn)
			conn.Close()
			f.mu.Lock()
			f.cur = nil
			f.mu.Unlock()
		}
	}()
	go func() { // guest -> the current host, if any
		buf := make([]byte, 32<<10)
		for {
			n, err := guest.Read(buf)
			if err != nil {
				return
			}
			f.mu.Lock()
			if f.cur != nil {
				f.cur.Write(buf[:n])
			}
			f.mu.Unlock()
		}
	}()
	return f
}

// TestServePortReconnectWithoutEOF drops a host with a Wait in flight and
// connects a new one without the agent ever reading end of file: the new
// host must get a working session and the exit status.
func TestServePortReconnectWithoutEOF(t *testing.T) {
	ctx := t.Context()
	port, chardevEnd := net.Pipe()
	chardev := newFakeChardev(t, chardevEnd)
	a := newFakeAgent()

	var mu sync.Mutex
	var events []string
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- ServePort(sctx, port, a, PortConfig{Session: func(started bool, err error) {
			mu.Lock()
			defer mu.Unlock()
			if started {
				events = append(events, "start")
			} else {
				events = append(events, "end")
			}
		}})
	}()

	c1 := dial(t, chardev.path)
	must.NoError(t, c1.Start(ctx, Spec{TaskID: "t", Command: "x"}))
	waitErr := make(chan error, 1)
	go func() {
		_, err := c1.Wait(ctx)
		waitErr <- err
	}()
	// Let the Wait's stream reach the agent before the host goes away.
	select {
	case <-a.waitCalls:
	case <-time.After(5 * time.Second):
		t.Fatal("the wait did not reach the agent")
	}
	c1.Close()
	must.Error(t, <-waitErr)

	for i := range 3 { // several reconnects in a row
		c := dial(t, chardev.path)
		st, err := c.Status(ctx)
		must.NoError(t, err, must.Sprintf("status on reconnect %d", i))
		must.Eq(t, StateRunning, st.State)
		c.Close()
	}
	a.exit(4)
	c := dial(t, chardev.path)
	st, err := c.Wait(ctx)
	must.NoError(t, err)
	must.Eq(t, 4, st.ExitCode)

	cancel()
	must.ErrorIs(t, <-served, context.Canceled)
	mu.Lock()
	defer mu.Unlock()
	must.Eq(t, 5, strings.Count(strings.Join(events, " "), "start"), must.Sprintf("events %v", events))
}

// TestServePortEOF feeds ServePort a port that reads end of file between
// hosts, as a virtio-serial port does while its host is away.
func TestServePortEOF(t *testing.T) {
	ctx := t.Context()
	portIn, _ := io.Pipe() // host -> guest, silent
	var out bytes.Buffer
	p := &eofPort{r: portIn, w: &out, eofs: make(chan struct{}, 16)}
	a := newFakeAgent()
	awaited := make(chan struct{}, 16)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() {
		served <- ServePort(sctx, p, a, PortConfig{AwaitHost: func(ctx context.Context) error {
			awaited <- struct{}{}
			<-ctx.Done()
			return ctx.Err()
		}})
	}()
	p.eofs <- struct{}{}
	select {
	case <-awaited:
	case <-time.After(5 * time.Second):
		t.Fatal("end of file did not make ServePort await the host")
	}
	cancel()
	must.ErrorIs(t, <-served, context.Canceled)
}

// eofPort reads end of file once per value on eofs, else from r.
type eofPort struct {
	r    io.Reader
	w    io.Writer
	eofs chan struct{}
}

func (p *eofPort) Read(b []byte) (int, error) {
	select {
	case <-p.eofs:
		return 0, io.EOF
	default:
	}
	return p.r.Read(b)
}
func (p *eofPort) Write(b []byte) (int, error)      { return p.w.Write(b) }
func (p *eofPort) SetReadDeadline(time.Time) error  { return nil }
func (p *eofPort) SetWriteDeadline(time.Time) error { return nil }
