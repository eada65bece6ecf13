package deskvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// A checkpointed task started while the owner is active waits on disk: the driver gives
// Nomad a running task at once but starts no QEMU, so the owner keeps the guest's memory.
// The task's Decider, started in the checkpoint layer under the task's yield policy, says
// when the VM may come back, exactly as it would for a VM the yield loop checkpointed: once
// the owner has not been active for resume_after, with MemAvailable to take the guest back
// and memory_high_water to spare. There is no other bound: the task waits as long as the
// owner is at the desktop.

// layerWaiting is the layer InspectTask shows for a task waiting on disk.
const layerWaiting = "waiting"

// waitEndTimeout bounds how long stopping a waiting task waits for its wait to end; a VM
// being restored at that moment is killed first.
const waitEndTimeout = 30 * time.Second

// errWaitingOnDisk answers signals and exec for a task that has no VM yet.
var errWaitingOnDisk = errors.New("the task is waiting on disk for the owner to leave")

// diskWait is a checkpointed task waiting on disk, with no VM, for the owner to leave.
type diskWait struct {
	checkpoint string // the checkpoint's directory name under local/.deskvm
	sizeMiB    int64
	preemption string        // the task's preemption mode, empty for the node's
	guest      guestctl.Spec // what a fresh VM runs (command mode) if the checkpoint cannot be restored
	stop       chan struct{} // closed when the task is stopped while it waits
	// result is the task's result once it is stopped while it waits; guarded by the
	// handle's mu, set with stop closed.
	result *drivers.ExitResult
}

func newDiskWait(dir, preemption string, guest guestctl.Spec) *diskWait {
	return &diskWait{
		checkpoint: filepath.Base(dir),
		sizeMiB:    dirSize(dir) >> 20,
		preemption: preemption,
		guest:      guest,
		stop:       make(chan struct{}),
	}
}

// describe names the checkpoint and its size, for task events.
func (w *diskWait) describe() string {
	return fmt.Sprintf("checkpoint %s, %d MiB", w.checkpoint, w.sizeMiB)
}

// dirSize is the size of the regular files in dir.
func dirSize(dir string) int64 {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
	}
	return n
}

// isWaiting reports whether the task waits on disk with no VM.
func (h *taskHandle) isWaiting() bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.waiting != nil
}

// endWait ends the wait of a task that has no VM, with res as its result, and reports true;
// it reports false once the task has a VM, which must then be stopped instead.
func (h *taskHandle) endWait(res *drivers.ExitResult) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.machine != nil {
		return false
	}
	if w := h.waiting; w != nil && w.result == nil {
		w.result = res
		close(w.stop)
	}
	return true
}

// stoppedWaiting ends a task that was stopped while it waited on disk, with the result
// endWait set.
func (h *taskHandle) stoppedWaiting(w *diskWait) {
	h.mu.RLock()
	res := w.result
	h.mu.RUnlock()
	h.events("stopped while waiting on disk; "+w.checkpoint+" stays in local/"+checkpointRoot+" for the next start", map[string]string{"checkpoint": w.checkpoint})
	h.finish(res)
}

// failWait ends a waiting task whose VM could not be brought up, with res, which carries
// the cause.
func (h *taskHandle) failWait(res *drivers.ExitResult) {
	h.events(res.Err.Error(), nil)
	h.finish(res)
}

// awaitWaitEnd waits for a stopped wait to end.
func (h *taskHandle) awaitWaitEnd() error {
	if !h.waitDone(waitEndTimeout) {
		return fmt.Errorf("task %s did not end its wait on disk within %s", h.taskConfig.ID, waitEndTimeout)
	}
	return nil
}

// stoppedResult is the result of a task stopped with sig while it waited on disk: as for a
// process the signal ended.
func stoppedResult(sig syscall.Signal) *drivers.ExitResult {
	return &drivers.ExitResult{ExitCode: 128 + int(sig), Signal: int(sig)}
}

// commit gives the waiting task its VM (and, for a fresh command-mode VM, the guest
// connection). It reports false when the task was stopped meanwhile.
func (h *taskHandle) commit(m Machine, g Guest) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.waiting == nil || h.waiting.result != nil {
		return false
	}
	h.machine, h.guest, h.waiting = m, g, nil
	return true
}

// startWaiting starts a checkpointed task on disk, with no VM, while the owner is active.
func (d *Driver) startWaiting(cfg *drivers.TaskConfig, mode string, spec vm.Spec, preemption string, gs guestctl.Spec, dir string) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	removeVMRecord(spec) // an earlier run's
	w := newDiskWait(dir, preemption, gs)
	h := d.newHandle(cfg, mode, spec, nil, time.Now())
	handle := drivers.NewTaskHandle(taskHandleVersion)
	handle.Config = cfg
	st := taskState{TaskConfig: cfg, Mode: mode, Spec: spec, StartedAt: h.startedAt.UnixNano(),
		Yield: true, Preemption: preemption, WaitingOn: w.checkpoint}
	if err := handle.SetDriverState(&st); err != nil {
		return nil, nil, fmt.Errorf("encode driver state: %w", err)
	}
	d.beginWait(h, w, "waiting on disk while the owner is active: ")
	d.logger.Info("task waits on disk", "task_id", cfg.ID, "vm", spec.Name, "checkpoint", w.checkpoint)
	return handle, nil, nil
}

// beginWait keeps h on disk, waiting on w, reported by an event that starts with event; it
// follows the owner until the VM may come back, at once when yield is off on the node.
func (d *Driver) beginWait(h *taskHandle, w *diskWait, event string) {
	h.waiting = w
	var dec *yield.Decider
	if pc := d.pluginConfig(); pc != nil && pc.Yield.Enabled && d.sensor() != nil {
		d.mu.RLock()
		policy := d.policy
		d.mu.RUnlock()
		p, err := policy.ForTask(w.preemption)
		if err != nil {
			// The node no longer offers the task's mode; the checkpoint layer resumes alike
			// in every mode.
			p = policy
		}
		// The same Decider as a checkpointed VM's, in the checkpoint layer: it resumes
		// once the owner has not been active for resume_after and the guest's memory fits.
		dec = yield.NewDecider(p, yield.VMInfo{MemoryMiB: h.spec.MemoryMiB, Layer: yield.LayerCheckpoint})
		h.setYield(dec.Decision())
	}
	d.tasks.Set(h.taskConfig.ID, h)
	h.events(event+w.describe(), map[string]string{"checkpoint": w.checkpoint})
	go d.awaitOwner(h, w, dec)
}

// recoverWaiting finds a task again that StartTask left waiting on disk: its VM, if one
// came up before the driver went away, or else its checkpoint, to wait on again.
func (d *Driver) recoverWaiting(handle *drivers.TaskHandle, st taskState) error {
	id := handle.Config.ID
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	started := time.Unix(0, st.StartedAt)
	if rec, ok := loadVMRecord(st.Spec); ok {
		m, err := d.hv.Attach(ctx, rec.Spec, rec.PID)
		if err != nil {
			return fmt.Errorf("recover task %s: %w", id, err)
		}
		if rec.Checkpoint != "" {
			// The VM holds the checkpoint's state now; a driver gone before it removed the
			// checkpoint leaves it to be removed here.
			keep := ""
			if st.Mode == modeImage {
				keep = filepath.Join(checkpointBase(st.TaskConfig), rec.Checkpoint)
			}
			removeCheckpoints(st.TaskConfig, keep)
		}
		h := d.newHandle(st.TaskConfig, st.Mode, st.Spec, m, started)
		d.tasks.Set(id, h)
		go h.run(d.ctx)
		if st.Yield {
			d.startYield(h, st.Preemption, vmInfo(ctx, m, st.Spec.MemoryMiB), true)
		}
		d.logger.Info("recovered task", "task_id", id, "vm", rec.Spec.Name, "pid", rec.PID)
		return nil
	}

	// No VM came up, or one was being restored when the driver went away and never
	// committed: that one is ended, and the checkpoint it came from waits again.
	d.reapUncommitted(ctx, st.Spec)
	dir := d.trustedCheckpoint(st.TaskConfig)
	if dir == "" {
		return fmt.Errorf("recover task %s: checkpoint %s it waited on is gone", id, st.WaitingOn)
	}
	var tc TaskConfig
	if err := handle.Config.DecodeDriverConfig(&tc); err != nil {
		return fmt.Errorf("recover task %s: decode deskvm task config: %w", id, err)
	}
	d.mu.RLock()
	policy := d.policy
	d.mu.RUnlock()
	p, err := policy.ForTask(st.Preemption)
	detach := err == nil && p.Preemption == yield.ModeCheckpoint
	w := newDiskWait(dir, st.Preemption, guestSpec(st.TaskConfig, &tc, st.Spec, detach))
	d.beginWait(d.newHandle(st.TaskConfig, st.Mode, st.Spec, nil, started), w, "recovered: waiting on disk while the owner is active: ")
	d.logger.Info("recovered task waiting on disk", "task_id", id, "vm", st.Spec.Name, "checkpoint", w.checkpoint)
	return nil
}

// reapUncommitted ends a QEMU of spec's VM that runs without a VM record: one that the
// driver was restoring when it went away. Its pid is in the pid file QEMU's start writes.
func (d *Driver) reapUncommitted(ctx context.Context, spec vm.Spec) {
	b, err := os.ReadFile(spec.PIDFile())
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return
	}
	m, err := d.hv.Attach(ctx, spec, pid)
	if err != nil {
		return // gone, or another process: nothing of this VM runs
	}
	d.logger.Warn("killing a vm whose restore never completed", "vm", spec.Name, "pid", pid)
	discard(ctx, m)
}

// discard kills a VM that no task holds and removes its sockets.
func discard(ctx context.Context, m Machine) {
	_ = m.Kill()
	select {
	case <-m.Done():
	case <-ctx.Done():
	}
	_ = m.Close()
	_ = m.Cleanup()
}

// awaitOwner keeps the task on disk until dec resumes it, then brings the VM up; a nil dec
// (yield off) does not wait. It returns early, with the task still waiting, when the driver
// shuts down: a later RecoverTask carries on.
func (d *Driver) awaitOwner(h *taskHandle, w *diskWait, dec *yield.Decider) {
	if dec != nil {
		switch d.ownerLeft(h, w, dec) {
		case waitStopped:
			h.stoppedWaiting(w)
			return
		case waitShutdown:
			return
		}
	}
	d.resumeFromDisk(h, w)
}

// waitEnd is how a wait on the owner ended.
type waitEnd int

const (
	waitOwnerLeft waitEnd = iota
	waitStopped
	waitShutdown
)

// ownerLeft feeds the owner's samples to dec, a Decider in the checkpoint layer, until it
// resumes.
func (d *Driver) ownerLeft(h *taskHandle, w *diskWait, dec *yield.Decider) waitEnd {
	samples, unsubscribe := d.sensor().subscribe()
	defer unsubscribe()
	for {
		select {
		case <-d.ctx.Done():
			return waitShutdown
		case <-w.stop:
			return waitStopped
		case s := <-samples:
			dn := dec.Observe(s, yield.Guest{})
			if dn.Layer != yield.LayerCheckpoint {
				return waitOwnerLeft
			}
			h.setOwner(dn.Owner.State)
		}
	}
}

// resumeFromDisk brings the waiting task's VM up: restored from its newest checkpoint, or,
// when that cannot be restored, started afresh, as StartTask does. A stop meanwhile ends the
// task with the checkpoint kept.
func (d *Driver) resumeFromDisk(h *taskHandle, w *diskWait) {
	cfg, spec := h.taskConfig, h.spec
	pc := d.pluginConfig()
	if pc == nil {
		pc = &Config{BootTimeout: defaultBootTimeout}
	}
	ctx, cancel := context.WithTimeout(d.ctx, pc.bootTimeout())
	defer cancel()
	go func() {
		select {
		case <-w.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	// interrupted tells whether a failure came from a stop or the driver shutting down, not
	// from the checkpoint or the VM; it ends the task for a stop.
	interrupted := func() bool {
		select {
		case <-w.stop:
			h.stoppedWaiting(w)
			return true
		default:
			return d.ctx.Err() != nil
		}
	}

	var m Machine
	var g Guest
	resumed := ""
	if dir := d.trustedCheckpoint(cfg); dir == "" {
		h.events("checkpoint "+w.checkpoint+" is gone, starting afresh", nil)
	} else {
		rm, err := d.hv.Restore(ctx, spec, dir)
		switch {
		case err == nil:
			if err := saveVMRecord(spec, vmRecord{PID: rm.PID(), Spec: rm.Spec(), Checkpoint: filepath.Base(dir)}); err != nil {
				// Not the checkpoint's fault: it stays for the task's next start.
				discard(ctx, rm)
				h.failWait(&drivers.ExitResult{ExitCode: exitPreempted,
					Err: fmt.Errorf("resume vm %s from %s, kept for the next start: %w", spec.Name, filepath.Base(dir), err)})
				return
			}
			m, resumed = rm, dir
		case interrupted():
			return
		default:
			d.checkpointFailed(cfg, dir, err)
		}
	}
	if m == nil {
		fm, err := d.hv.Launch(ctx, spec)
		if err == nil && h.mode == modeCommand {
			if g, err = startCommand(ctx, fm, w.guest); err != nil {
				discard(ctx, fm)
			}
		}
		if err == nil {
			if err = saveVMRecord(spec, vmRecord{PID: fm.PID(), Spec: fm.Spec()}); err != nil {
				if g != nil {
					_ = g.Close()
				}
				discard(ctx, fm)
			}
		}
		if err != nil {
			if interrupted() {
				return
			}
			h.failWait(&drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("start vm %s: %w", spec.Name, err)})
			return
		}
		m = fm
	}
	if !h.commit(m, g) {
		// Stopped after the VM came up: a restored VM has not run, so its checkpoint still
		// holds the task's work.
		if g != nil {
			_ = g.Close()
		}
		killCtx, killCancel := context.WithTimeout(context.Background(), killGrace)
		discard(killCtx, m)
		killCancel()
		removeVMRecord(spec)
		h.stoppedWaiting(w)
		return
	}

	if resumed != "" {
		if err := m.Resume(ctx); err != nil {
			if d.ctx.Err() != nil {
				return // the driver is going away: the next one finds the VM paused, by its record
			}
			// The checkpoint stays for the next start; the run loop reports this result.
			h.preempt(&drivers.ExitResult{ExitCode: exitPreempted,
				Err: fmt.Errorf("resume vm %s from checkpoint %s, kept for the next start: %w", spec.Name, filepath.Base(resumed), err)})
			_ = m.Kill()
			go h.run(d.ctx)
			return
		}
		h.events("resumed from checkpoint", map[string]string{"checkpoint": filepath.Base(resumed)})
		keep := ""
		if h.mode == modeImage {
			keep = resumed // the restored VM runs its disk from there
		}
		removeCheckpoints(cfg, keep)
	}
	go h.run(d.ctx)
	d.startYield(h, w.preemption, yield.VMInfo{MemoryMiB: spec.MemoryMiB}, resumed == "")
	d.logger.Info("task left its wait on disk", "task_id", cfg.ID, "vm", spec.Name, "pid", m.PID(), "resumed", resumed != "")
}
