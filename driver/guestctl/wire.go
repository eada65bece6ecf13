package guestctl

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// ProtocolVersion is the version of the wire protocol this package speaks.
// Both sides put it in every message. New optional JSON fields do not bump
// it (unknown fields are ignored); a change that an old peer would misread
// does, and a peer refuses a version it does not know.
const ProtocolVersion = 1

// A frame is one byte of type, a big-endian uint32 payload length and the
// payload. Every stream starts with a frameJSON request from the host,
// answered by one frameJSON response. An exec stream carries stdio frames
// between the two: frameStdin, frameStdinEOF and frameResize from the host,
// frameStdout and frameStderr from the agent, and ends with the response.
const (
	frameJSON     byte = 'j'
	frameStdin    byte = 'i'
	frameStdinEOF byte = 'c'
	frameResize   byte = 'r'
	frameStdout   byte = 'o'
	frameStderr   byte = 'e'
)

// maxFrame bounds a frame's payload so a confused peer cannot make the other
// allocate without limit.
const maxFrame = 1 << 20

// dataChunk is the largest stdio payload sent in one frame.
const dataChunk = 32 << 10

// Operation names.
const (
	opHello  = "hello"
	opInfo   = "info"
	opStart  = "start"
	opStatus = "status"
	opWait   = "wait"
	opSignal = "signal"
	opAck    = "ack"
	opExec   = "exec"
)

// Error codes carried in response.Code so that sentinel errors survive the
// wire.
const (
	codeNotRunning     = "not_running"
	codeNotExited      = "not_exited"
	codeAlreadyStarted = "already_started"
	codeIncompatible   = "incompatible"
)

// request is the first frame of every stream.
type request struct {
	Version int          `json:"v"`
	Op      string       `json:"op"`
	Spec    *Spec        `json:"spec,omitempty"`
	Signal  int          `json:"signal,omitempty"`
	Exec    *ExecRequest `json:"exec,omitempty"`
}

// response is the agent's answer; for exec it is the last frame.
type response struct {
	Version  int     `json:"v"`
	Error    string  `json:"error,omitempty"`
	Code     string  `json:"code,omitempty"`
	Info     *Info   `json:"info,omitempty"`
	Status   *Status `json:"status,omitempty"`
	ExitCode int     `json:"exit_code,omitempty"`
}

// err turns an error response back into an error, restoring sentinels.
func (r response) err() error {
	if r.Error == "" {
		return nil
	}
	var sentinel error
	switch r.Code {
	case codeNotRunning:
		sentinel = ErrNotRunning
	case codeNotExited:
		sentinel = ErrNotExited
	case codeAlreadyStarted:
		sentinel = ErrAlreadyStarted
	case codeIncompatible:
		sentinel = ErrIncompatible
	}
	if sentinel == nil {
		return errors.New(r.Error)
	}
	return &remoteError{msg: r.Error, sentinel: sentinel}
}

// remoteError is an agent error that matches a sentinel with errors.Is.
type remoteError struct {
	msg      string
	sentinel error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

// errorResponse builds the response for a handler error.
func errorResponse(err error) response {
	r := response{Version: ProtocolVersion, Error: err.Error()}
	switch {
	case errors.Is(err, ErrNotRunning):
		r.Code = codeNotRunning
	case errors.Is(err, ErrNotExited):
		r.Code = codeNotExited
	case errors.Is(err, ErrAlreadyStarted):
		r.Code = codeAlreadyStarted
	case errors.Is(err, ErrIncompatible):
		r.Code = codeIncompatible
	}
	return r
}

// frameWriter writes frames; it is safe for concurrent use.
type frameWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (fw *frameWriter) write(typ byte, payload []byte) error {
	if len(payload) > maxFrame {
		return fmt.Errorf("frame of %d bytes exceeds %d", len(payload), maxFrame)
	}
	buf := make([]byte, 5+len(payload))
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:5], uint32(len(payload)))
	copy(buf[5:], payload)
	fw.mu.Lock()
	defer fw.mu.Unlock()
	_, err := fw.w.Write(buf)
	return err
}

func (fw *frameWriter) writeJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode message: %w", err)
	}
	return fw.write(frameJSON, b)
}

// dataWriter turns Write calls into frames of one type.
type dataWriter struct {
	fw  *frameWriter
	typ byte
}

func (d dataWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		c := min(len(p), dataChunk)
		if err := d.fw.write(d.typ, p[:c]); err != nil {
			return n, err
		}
		n += c
		p = p[c:]
	}
	return n, nil
}

// readFrame reads one frame.
func readFrame(r io.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("frame of %d bytes exceeds %d", n, maxFrame)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, fmt.Errorf("read frame payload: %w", unexpectedEOF(err))
	}
	return hdr[0], payload, nil
}

// readJSON reads one frame that must be a JSON frame and decodes it into v.
func readJSON(r io.Reader, v any) error {
	typ, payload, err := readFrame(r)
	if err != nil {
		return err
	}
	if typ != frameJSON {
		return fmt.Errorf("expected a message frame, got frame type %q", typ)
	}
	return jsonDecode(payload, v)
}

func jsonDecode(b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode message: %w", err)
	}
	return nil
}

func unexpectedEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// yamuxConfig is the session configuration of both sides. Keepalives are
// off: the transport is a local socket (host) or a virtio port (guest) whose
// peer going away shows as EOF, and a paused VM must not look like a dead
// one.
func yamuxConfig() *yamux.Config {
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false
	cfg.LogOutput = io.Discard
	cfg.ConnectionWriteTimeout = 30 * time.Second
	cfg.StreamCloseTimeout = time.Minute
	return cfg
}

// encodeResize encodes a terminal size as rows and columns, big-endian.
func encodeResize(sz TermSize) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint16(b[0:2], sz.Rows)
	binary.BigEndian.PutUint16(b[2:4], sz.Cols)
	return b
}

func decodeResize(b []byte, sz *TermSize) error {
	if len(b) != 4 {
		return fmt.Errorf("resize frame of %d bytes, want 4", len(b))
	}
	sz.Rows = binary.BigEndian.Uint16(b[0:2])
	sz.Cols = binary.BigEndian.Uint16(b[2:4])
	return nil
}
