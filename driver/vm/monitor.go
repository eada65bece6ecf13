package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// Monitor is the one QMP connection held for a VM. It wraps go-qemu's socket monitor, which
// does the QMP handshake and splits events from replies, with contexts and a steady reader of
// events (go-qemu blocks replies while an event goes unread).
type Monitor struct {
	mon *qmp.SocketMonitor

	mu       sync.Mutex
	shutdown *ShutdownEvent // the guest's or QEMU's SHUTDOWN event, once seen
	closed   bool
}

// ShutdownEvent is QEMU's SHUTDOWN event: Guest is true when the guest itself powered off
// (Reason "guest-shutdown") or panicked ("guest-panic").
type ShutdownEvent struct {
	Guest  bool   `json:"guest"`
	Reason string `json:"reason"`
}

// DialMonitor connects to a QMP socket and completes the handshake.
func DialMonitor(ctx context.Context, socket string) (*Monitor, error) {
	timeout := 5 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	sm, err := qmp.NewSocketMonitor("unix", socket, timeout)
	if err != nil {
		return nil, fmt.Errorf("dial qmp %s: %w", socket, err)
	}
	if err := sm.Connect(); err != nil {
		return nil, fmt.Errorf("qmp handshake %s: %w", socket, err)
	}
	events, _ := sm.Events(ctx)
	m := &Monitor{mon: sm}
	go func() {
		for ev := range events {
			if ev.Event != "SHUTDOWN" {
				continue
			}
			var se ShutdownEvent
			if b, err := json.Marshal(ev.Data); err == nil {
				_ = json.Unmarshal(b, &se)
			}
			m.mu.Lock()
			m.shutdown = &se
			m.mu.Unlock()
		}
	}()
	return m, nil
}

// Shutdown returns the SHUTDOWN event if QEMU has sent one on this connection.
func (m *Monitor) Shutdown() *ShutdownEvent {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.shutdown
}

// Execute runs a QMP command with arguments (nil for none) and decodes its "return" into out
// (nil to discard).
func (m *Monitor) Execute(ctx context.Context, command string, args any, out any) error {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	type result struct {
		raw []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		raw, err := m.mon.Run(b)
		ch <- result{raw, err}
	}()
	select {
	case <-ctx.Done():
		// The reply may still come; the connection stays usable for the next command only if
		// it does, so a timed-out monitor is closed and the caller must dial again.
		_ = m.Close()
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("qmp %s: %w", command, r.err)
		}
		if out == nil {
			return nil
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
		}
		if err := json.Unmarshal(r.raw, &resp); err != nil {
			return fmt.Errorf("qmp %s: decode reply: %w", command, err)
		}
		if err := json.Unmarshal(resp.Return, out); err != nil {
			return fmt.Errorf("qmp %s: decode reply: %w", command, err)
		}
		return nil
	}
}

// RunState is QEMU's run state from query-status, e.g. "running", "paused", "shutdown".
func (m *Monitor) RunState(ctx context.Context) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// Powerdown asks the guest to power off, as if its power button were pressed (ACPI).
func (m *Monitor) Powerdown(ctx context.Context) error {
	return m.Execute(ctx, "system_powerdown", nil, nil)
}

// Quit ends QEMU at once.
func (m *Monitor) Quit(ctx context.Context) error {
	return m.Execute(ctx, "quit", nil, nil)
}

// Close drops the QMP connection; the VM keeps running.
func (m *Monitor) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	return m.mon.Disconnect()
}
