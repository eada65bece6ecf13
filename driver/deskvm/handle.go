package deskvm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// Task modes.
const (
	modeCommand = "command"
	modeImage   = "image"
)

const (
	// powerOffGrace is how long a guest may take to power off once its command has ended and
	// the exit status is safe, before the VM is killed.
	powerOffGrace = 30 * time.Second
	// killGrace is how long the guest gets to report after SIGKILL, before the VM is killed.
	killGrace = 5 * time.Second
	// redialBackoff paces reconnecting to a guest agent whose connection dropped.
	redialBackoff = 200 * time.Millisecond
)

// taskHandle is one task's VM as the driver sees it.
type taskHandle struct {
	// Set at start or recover and never changed.
	taskConfig *drivers.TaskConfig
	ckey       *checkpointKey // signs the VM's checkpoints
	// checkpointMu lets one checkpoint at a time at the VM: the yield loop's and StopTask's.
	checkpointMu sync.Mutex
	mode         string
	spec         vm.Spec
	startedAt    time.Time
	logger       hclog.Logger
	events       func(msg string, annotations map[string]string)
	doneCh       chan struct{} // closed once exitResult is set
	killed       atomic.Bool   // the driver itself killed the VM (stop after its timeout, destroy)
	// preempted is the task's result when yield ended the VM (checkpoint, restart); set
	// before the VM exits so that the run loop reports it instead of a crash.
	preempted atomic.Pointer[drivers.ExitResult]

	mu sync.RWMutex
	// machine is the task's VM; nil while the task waits on disk (waiting), set once when
	// its VM is restored.
	machine     Machine
	waiting     *diskWait // non-nil while the task waits on disk with no VM
	guest       Guest     // nil until connected, and while reconnecting
	state       drivers.TaskState
	completedAt time.Time
	exitResult  *drivers.ExitResult
	stats       *statsTracker
	yield       yieldStatus
}

func (h *taskHandle) status() *drivers.TaskStatus {
	h.mu.RLock()
	defer h.mu.RUnlock()
	pid := 0
	if h.machine != nil {
		pid = h.machine.PID()
	}
	attrs := map[string]string{
		"pid":             fmt.Sprint(pid),
		"mode":            h.mode,
		"vm":              h.spec.Name,
		"layer":           h.yield.Layer.String(),
		"cpu_cap_percent": fmt.Sprint(h.yield.CPUCapPercent),
		"balloon_mib":     fmt.Sprint(h.yield.BalloonMiB),
		"owner":           h.yield.Owner.String(),
	}
	if h.waiting != nil {
		attrs["layer"] = layerWaiting
		attrs["checkpoint"] = h.waiting.checkpoint
	}
	return &drivers.TaskStatus{
		ID:               h.taskConfig.ID,
		Name:             h.taskConfig.Name,
		State:            h.state,
		StartedAt:        h.startedAt,
		CompletedAt:      h.completedAt,
		ExitResult:       h.exitResult.Copy(),
		DriverAttributes: attrs,
	}
}

// currentMachine returns the task's VM; nil while the task waits on disk.
func (h *taskHandle) currentMachine() Machine {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.machine
}

func (h *taskHandle) preempt(res *drivers.ExitResult) { h.preempted.Store(res) }

// setYield records the decision the yield loop applied.
func (h *taskHandle) setYield(dec yield.Decision) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.yield = yieldStatus{Layer: dec.Layer, CPUCapPercent: dec.CPUCapPercent, BalloonMiB: dec.BalloonMiB, Owner: dec.Owner.State}
}

func (h *taskHandle) setOwner(st owner.State) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.yield.Owner = st
}

func (h *taskHandle) yieldState() yieldStatus {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.yield
}

func (h *taskHandle) isRunning() bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.state == drivers.TaskStateRunning
}

func (h *taskHandle) currentGuest() Guest {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.guest
}

func (h *taskHandle) setGuest(g Guest) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.guest = g
}

// run follows the task's VM until it ends and records how. It returns early, leaving the
// VM running, when ctx ends: the driver is shutting down and a later RecoverTask takes over.
// It starts once the task has a VM.
func (h *taskHandle) run(ctx context.Context) {
	m := h.currentMachine()
	var res *drivers.ExitResult
	switch h.mode {
	case modeCommand:
		res = h.runCommand(ctx, m)
	case modeImage:
		res = h.runImage(ctx, m)
	}
	if res == nil {
		return
	}
	if res.Err != nil {
		h.events(res.Err.Error(), nil)
	}
	if g := h.currentGuest(); g != nil {
		_ = g.Close()
	}
	_ = m.Close()
	if err := m.Cleanup(); err != nil {
		h.logger.Warn("remove vm sockets", "vm", h.spec.Name, "error", err)
	}
	h.finish(res)
}

// finish records the task's end; it is called once, by run or, for a task that ends while
// it waits on disk, by the wait.
func (h *taskHandle) finish(res *drivers.ExitResult) {
	h.mu.Lock()
	h.state = drivers.TaskStateExited
	h.completedAt = time.Now()
	h.exitResult = res
	h.waiting = nil
	h.mu.Unlock()
	close(h.doneCh)
}

func (h *taskHandle) runCommand(ctx context.Context, m Machine) *drivers.ExitResult {
	if rec, ok := loadExitRecord(h.spec); ok {
		// A previous driver saw the command end; the guest may still be powering off.
		h.awaitPowerOff(ctx, m)
		return rec.result()
	}
	statusCh := make(chan guestctl.Status, 1)
	go h.watchGuest(ctx, m, statusCh)

	select {
	case st := <-statusCh:
		return h.commandEnded(ctx, m, st)
	case <-m.Done():
		if res := h.preempted.Load(); res != nil {
			return res
		}
		select {
		case st := <-statusCh:
			return h.commandEnded(ctx, m, st)
		default:
		}
		if rec, ok := loadExitRecord(h.spec); ok {
			return rec.result()
		}
		if h.killed.Load() {
			return killedResult()
		}
		cause := m.Failure()
		if cause == "" {
			cause = "the guest powered off without reporting an exit status"
		}
		return &drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("vm %s ended before its command did: %s", h.spec.Name, cause)}
	case <-ctx.Done():
		return nil
	}
}

// watchGuest keeps a connection to the guest agent and sends the command's final status. It
// reconnects whenever the connection drops, until the VM exits or ctx ends.
func (h *taskHandle) watchGuest(ctx context.Context, m Machine, statusCh chan<- guestctl.Status) {
	ctx, cancel := untilExit(ctx, m)
	defer cancel()
	for {
		g := h.currentGuest()
		if g == nil {
			var err error
			g, err = m.Guest(ctx)
			if err != nil {
				return // ctx ended: the VM exited or the driver is shutting down
			}
			h.setGuest(g)
		}
		st, err := g.Wait(ctx)
		if err == nil {
			statusCh <- st
			return
		}
		if ctx.Err() != nil {
			return
		}
		h.logger.Debug("guest connection dropped, reconnecting", "vm", h.spec.Name, "error", err)
		h.setGuest(nil)
		_ = g.Close()
		select {
		case <-ctx.Done():
			return
		case <-time.After(redialBackoff):
		}
	}
}

// commandEnded saves the command's exit status, lets the guest power off, and returns the
// task's result.
func (h *taskHandle) commandEnded(ctx context.Context, m Machine, st guestctl.Status) *drivers.ExitResult {
	rec := exitRecord{ExitCode: st.ExitCode, Signal: st.Signal, Error: st.Error}
	if err := saveExitRecord(h.spec, rec); err != nil {
		h.logger.Error("exit status not saved; a driver restart now would lose it", "vm", h.spec.Name, "error", err)
	}
	if g := h.currentGuest(); g != nil {
		ackCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := g.Ack(ackCtx); err != nil {
			h.logger.Warn("guest did not take the exit acknowledgement; the vm will be killed", "vm", h.spec.Name, "error", err)
			_ = m.Kill()
		}
		cancel()
	}
	h.awaitPowerOff(ctx, m)
	return rec.result()
}

// awaitPowerOff waits for the VM to exit by itself, killing it after powerOffGrace.
func (h *taskHandle) awaitPowerOff(ctx context.Context, m Machine) {
	select {
	case <-m.Done():
		return
	case <-ctx.Done():
		return
	case <-time.After(powerOffGrace):
	}
	h.logger.Warn("guest did not power off; killing the vm", "vm", h.spec.Name)
	_ = m.Kill()
	select {
	case <-m.Done():
	case <-ctx.Done():
	}
}

func (r exitRecord) result() *drivers.ExitResult {
	res := &drivers.ExitResult{ExitCode: r.ExitCode, Signal: r.Signal}
	if r.Error != "" {
		res.Err = errors.New(r.Error)
	}
	return res
}

func (h *taskHandle) runImage(ctx context.Context, m Machine) *drivers.ExitResult {
	select {
	case <-m.Done():
	case <-ctx.Done():
		return nil
	}
	if res := h.preempted.Load(); res != nil {
		return res
	}
	if m.GuestPoweredOff() {
		return &drivers.ExitResult{ExitCode: 0}
	}
	if h.killed.Load() {
		return killedResult()
	}
	cause := m.Failure()
	if cause == "" {
		cause = "the vm exited without the guest powering off"
	}
	return &drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("vm %s failed: %s", h.spec.Name, cause)}
}

// stop ends the task gracefully: the signal to the guest command (command mode) or an ACPI
// power-down (image mode), then a kill after timeout.
func (h *taskHandle) stop(timeout time.Duration, signal string) error {
	if !h.isRunning() {
		return nil
	}
	sig := syscall.SIGTERM
	var sigErr error
	if signal != "" {
		sig, sigErr = parseSignal(signal)
	}
	if h.endWait(stoppedResult(sig)) {
		return h.awaitWaitEnd()
	}
	m := h.currentMachine()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+killGrace+10*time.Second)
	defer cancel()
	switch h.mode {
	case modeCommand:
		if sigErr != nil {
			return sigErr
		}
		if err := h.signal(ctx, sig); err != nil {
			h.logger.Warn("signal guest command", "vm", h.spec.Name, "signal", sig.String(), "error", err)
		}
		if h.waitDone(timeout) {
			return nil
		}
		if err := h.signal(ctx, syscall.SIGKILL); err != nil {
			h.logger.Warn("kill guest command", "vm", h.spec.Name, "error", err)
		}
		if h.waitDone(killGrace) {
			return nil
		}
	case modeImage:
		pdCtx, pdCancel := context.WithTimeout(ctx, 5*time.Second)
		err := m.Powerdown(pdCtx)
		pdCancel()
		if err != nil {
			h.logger.Warn("acpi power-down", "vm", h.spec.Name, "error", err)
		}
		if h.waitDone(timeout) {
			return nil
		}
	}
	if err := h.kill(); err != nil {
		return err
	}
	if !h.waitDone(10 * time.Second) {
		return fmt.Errorf("vm %s did not exit after kill", h.spec.Name)
	}
	return nil
}

// kill ends the VM at once, and marks the end as the driver's doing, not a failure. A task
// waiting on disk ends its wait instead, keeping its checkpoint.
func (h *taskHandle) kill() error {
	if h.endWait(killedResult()) {
		return nil
	}
	h.killed.Store(true)
	return h.currentMachine().Kill()
}

// killedResult is the result of a task whose VM the driver killed, as for a process killed
// with SIGKILL.
func killedResult() *drivers.ExitResult {
	return &drivers.ExitResult{ExitCode: 128 + int(syscall.SIGKILL), Signal: int(syscall.SIGKILL)}
}

func (h *taskHandle) waitDone(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-h.doneCh:
		return true
	case <-t.C:
		return false
	}
}

// signal sends sig to the guest command (command mode only).
func (h *taskHandle) signal(ctx context.Context, sig syscall.Signal) error {
	if h.mode != modeCommand {
		return fmt.Errorf("signals reach only command-mode tasks; vm %s boots an image", h.spec.Name)
	}
	if h.isWaiting() {
		return errWaitingOnDisk
	}
	g := h.currentGuest()
	if g == nil {
		return fmt.Errorf("vm %s: guest agent not connected", h.spec.Name)
	}
	return g.Signal(ctx, sig)
}
