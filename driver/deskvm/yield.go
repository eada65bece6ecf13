package deskvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/plugins/drivers"
)

const (
	// exitPreempted is the exit code of a task whose VM yielded the desktop for good
	// (checkpointed, or stopped to restart): EX_TEMPFAIL, "try again later". Nomad's restart
	// and reschedule policies then start it again, and a checkpoint resumes it.
	exitPreempted = 75
	// imageBootSettle is how long an image-mode guest gets to boot before its VM drops to
	// the idle CPU class; a command-mode guest drops once its agent answers. A guest kernel
	// starved of CPU while it boots can fail its timer check and panic.
	imageBootSettle = 20 * time.Second
	// memoryPoll is how often the guest's memory is read for the memory layer: as often as
	// the guest reports it.
	memoryPoll = vm.GuestStatsInterval
	// yieldOpTimeout bounds one QMP command of the yield loop; a checkpoint has its own.
	yieldOpTimeout = 10 * time.Second
	// checkpointTimeout bounds saving a VM to disk.
	checkpointTimeout = 5 * time.Minute
	// checkpointRoot is the task's checkpoint directory under its local dir, which Nomad
	// keeps across restarts and moves with ephemeral_disk { migrate = true }; the guest
	// agent neither copies it in nor writes it back.
	checkpointRoot = ".deskvm"
	// checkpointPrefix starts each checkpoint's directory name.
	checkpointPrefix = "checkpoint-"
)

// yieldStatus is what the yield loop last applied, for InspectTask and stats.
type yieldStatus struct {
	Layer         yield.Layer
	CPUCapPercent int
	BalloonMiB    int
	Owner         owner.State
}

// runYield follows the owner for this task's VM and applies the decisions, until the VM
// exits or ctx ends. start is the layer the VM is in now; announce reports it as a task
// event (StartTask reports a VM restored from a checkpoint itself).
func (h *taskHandle) runYield(ctx context.Context, sensor *ownerSensor, p yield.Policy, hp *harvest.Forecast, start yield.VMInfo, announce bool) {
	m := h.currentMachine()
	ctx, cancel := untilExit(ctx, m)
	defer cancel()
	if h.mode == modeImage && start.Layer == yield.LayerIdleClass && time.Since(h.startedAt) < imageBootSettle {
		select {
		case <-ctx.Done():
			return
		case <-time.After(imageBootSettle - time.Since(h.startedAt)):
		}
	}
	if err := m.SetIdle(true); err != nil {
		h.events("cannot lower the vm's CPU priority; it competes with the owner at normal priority: "+err.Error(), nil)
	}
	if start.MemoryMiB > 0 && start.BalloonMiB == 0 {
		// A VM restored from a checkpoint keeps the balloon it was saved with: carry on
		// from there, or the guest never gets that memory back.
		opCtx, opCancel := context.WithTimeout(ctx, yieldOpTimeout)
		if b, _, err := m.Memory(opCtx); err == nil && b > 0 && b < start.MemoryMiB {
			start.BalloonMiB = b
		}
		opCancel()
	}
	samples, unsubscribe := sensor.subscribe()
	defer unsubscribe()

	d := yield.NewDecider(p, start)
	h.setYield(d.Decision())
	if announce {
		h.events(d.Decision().Reason, nil)
	}
	paused := start.Layer >= yield.LayerPause
	guest := yield.Guest{BalloonMiB: start.MemoryMiB}
	if start.BalloonMiB > 0 {
		guest.BalloonMiB = start.BalloonMiB
	}
	memTick := time.NewTicker(memoryPoll)
	defer memTick.Stop()
	var fore *ahead
	if hp != nil {
		fore = &ahead{policy: *hp, since: time.Now()}
		if !paused {
			if event := fore.begin(time.Now(), sensor, d); event != "" {
				h.events(event, nil)
			}
		}
	}
	aheadTick := time.NewTicker(aheadEvery)
	defer aheadTick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-aheadTick.C:
			if fore == nil || paused {
				continue
			}
			event, drain := fore.step(now, sensor, d)
			if event != "" {
				h.events(event, nil)
			}
			if drain != "" && p.Preemption == yield.ModeCheckpoint {
				if err := h.checkpoint(ctx, m, "drained: "+drain); err != nil {
					h.events("drain failed, the vm carries on: "+err.Error(), nil)
					continue
				}
				return
			}
		case <-memTick.C:
			if start.MemoryMiB == 0 || paused {
				continue
			}
			opCtx, opCancel := context.WithTimeout(ctx, yieldOpTimeout)
			b, used, err := m.Memory(opCtx)
			opCancel()
			if err == nil {
				guest = yield.Guest{BalloonMiB: b, UsedMiB: used}
			}
		case s := <-samples:
			dec := d.Observe(s, guest)
			if !dec.Changed {
				h.setOwner(dec.Owner.State)
				continue
			}
			if h.apply(ctx, m, dec, &paused) {
				return
			}
		}
	}
}

// apply brings the VM to dec and reports it as a task event; it returns true once the VM
// has ended for good (checkpointed or stopped to restart).
func (h *taskHandle) apply(ctx context.Context, m Machine, dec yield.Decision, paused *bool) (ended bool) {
	prev := h.yieldState()
	opCtx, cancel := context.WithTimeout(ctx, yieldOpTimeout)
	defer cancel()
	var errs []error
	switch dec.Layer {
	case yield.LayerCheckpoint:
		if err := h.checkpoint(ctx, m, dec.Reason); errors.Is(err, errVMEnded) {
			return true
		} else if err != nil {
			h.events("checkpoint failed, the vm stays paused: "+err.Error(), nil)
			h.setYield(dec)
			return false
		}
		return true
	case yield.LayerRestart:
		h.preempt(&drivers.ExitResult{ExitCode: exitPreempted, Err: fmt.Errorf("the owner needs the desktop; the task restarts from the beginning (%s)", dec.Reason)})
		h.events(dec.Reason, nil)
		_ = m.Kill()
		return true
	case yield.LayerPause:
		if !*paused {
			if err := m.Pause(opCtx); err != nil {
				errs = append(errs, err)
			} else {
				*paused = true
			}
		}
	default:
		if *paused {
			if err := m.Resume(opCtx); err != nil {
				errs = append(errs, err)
			} else {
				*paused = false
			}
		}
	}
	if dec.CPUCapPercent != prev.CPUCapPercent {
		if err := m.SetCPUCap(dec.CPUCapPercent); err != nil {
			errs = append(errs, err)
		}
	}
	if dec.BalloonMiB > 0 && dec.BalloonMiB != prev.BalloonMiB {
		if err := m.SetBalloon(opCtx, dec.BalloonMiB); err != nil {
			errs = append(errs, err)
		}
	}
	h.setYield(dec)
	msg := dec.Reason
	if err := errors.Join(errs...); err != nil {
		msg += " (not fully applied: " + strings.ReplaceAll(err.Error(), "\n", "; ") + ")"
	}
	h.events(msg, map[string]string{"layer": dec.Layer.String(), "cpu_cap_percent": fmt.Sprint(dec.CPUCapPercent)})
	return false
}

// checkpoint saves the VM into a new directory under the task's checkpoint root and ends the
// task so that Nomad starts it again, which resumes it from there.
func (h *taskHandle) checkpoint(ctx context.Context, m Machine, reason string) error {
	h.checkpointMu.Lock()
	defer h.checkpointMu.Unlock()
	select {
	case <-m.Done():
		return errVMEnded // checkpointed by the other caller, or gone
	default:
	}
	dir := filepath.Join(checkpointBase(h.taskConfig), checkpointPrefix+time.Now().UTC().Format("20060102T150405.000000000"))
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return err
	}
	// Key and identity first: a checkpoint that cannot be signed would never be resumed.
	key, err := h.ckey.get()
	if err != nil {
		return err
	}
	id, err := taskIdentity(h.taskConfig)
	if err != nil {
		return err
	}
	// The result is set before QEMU exits, so the run loop reports it rather than a crash.
	h.preempt(&drivers.ExitResult{ExitCode: exitPreempted, Err: fmt.Errorf("checkpointed to resume later (%s)", reason)})
	ctx, cancel := context.WithTimeout(ctx, checkpointTimeout)
	defer cancel()
	cp, err := m.Checkpoint(ctx, dir)
	if err != nil {
		h.preempt(nil)
		_ = os.RemoveAll(dir)
		return err
	}
	if err := signCheckpoint(dir, key, id); err != nil {
		// QEMU has exited: the work since the task's start is lost, and the task says so.
		h.preempt(&drivers.ExitResult{ExitCode: exitPreempted, Err: fmt.Errorf("checkpointed but %w; the task starts afresh", err)})
		h.events("checkpoint saved but not signed, so it will not be resumed: "+err.Error(), nil)
		return nil
	}
	h.events(fmt.Sprintf("checkpointed %d MiB in %.1f s", (cp.StateBytes+cp.DiskBytes)>>20, cp.Paused.Seconds()),
		map[string]string{"checkpoint": filepath.Base(dir)})
	return nil
}

// checkpointBase is the directory that holds a task's checkpoints.
func checkpointBase(cfg *drivers.TaskConfig) string {
	return filepath.Join(cfg.TaskDir().LocalDir, checkpointRoot)
}

// latestCheckpoint returns the newest complete checkpoint of the task, or "" when there is
// none. Torn ones (a crash while saving) are removed: they can never be resumed.
func latestCheckpoint(cfg *drivers.TaskConfig) string {
	base := checkpointBase(cfg)
	entries, err := os.ReadDir(base)
	if err != nil {
		return ""
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), checkpointPrefix) {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	for i := len(names) - 1; i >= 0; i-- {
		dir := filepath.Join(base, names[i])
		if vm.CheckCheckpoint(dir) == nil {
			return dir
		}
		_ = os.RemoveAll(dir)
	}
	return ""
}

// checkpointFailed sets aside a checkpoint that could not be restored, as failed-…, so that
// it is never tried again but its contents are not lost, and reports it: the task starts
// afresh.
func (d *Driver) checkpointFailed(cfg *drivers.TaskConfig, dir string, err error) {
	_ = os.Rename(dir, filepath.Join(filepath.Dir(dir), "failed-"+filepath.Base(dir)))
	d.emit(cfg, "checkpoint could not be resumed, starting afresh: "+err.Error(), map[string]string{"checkpoint": filepath.Base(dir)})
}

// removeCheckpoints removes the task's checkpoints except keep (the one an image-mode VM
// runs its disk from).
func removeCheckpoints(cfg *drivers.TaskConfig, keep string) {
	base := checkpointBase(cfg)
	entries, _ := os.ReadDir(base)
	for _, e := range entries {
		if p := filepath.Join(base, e.Name()); p != keep && strings.HasPrefix(e.Name(), checkpointPrefix) {
			_ = os.RemoveAll(p)
		}
	}
}

// vmInfo reads the layer a running VM is in: for a VM found again after a driver restart,
// or one restored from a checkpoint.
func vmInfo(ctx context.Context, m Machine, memoryMiB int) yield.VMInfo {
	info := yield.VMInfo{MemoryMiB: memoryMiB, CPUCapPercent: 100}
	ctx, cancel := context.WithTimeout(ctx, yieldOpTimeout)
	defer cancel()
	if c, err := m.CPUCap(); err == nil {
		info.CPUCapPercent = c
	}
	if b, _, err := m.Memory(ctx); err == nil && b > 0 && b < memoryMiB {
		info.BalloonMiB = b
	}
	switch paused, err := m.Paused(ctx); {
	case err == nil && paused:
		info.Layer = yield.LayerPause
	case info.BalloonMiB > 0:
		info.Layer = yield.LayerMemory
	case info.CPUCapPercent < 100:
		info.Layer = yield.LayerCPUCap
	}
	return info
}
