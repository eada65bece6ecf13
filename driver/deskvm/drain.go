package deskvm

import (
	"context"
	"errors"
	"time"

	"github.com/deskcloud/deskcloud/internal/yield"
)

// A task whose preemption is "checkpoint" is checkpointed, not signalled, whenever Nomad
// stops it: a node drain (the autoscaler drains a desktop ahead of its owner, or an
// operator runs `nomad node drain`), a migration, or a job stop. With the job's ephemeral
// disk sticky and migrating, the checkpoint travels with local/ to the replacement, which
// resumes where the VM stopped, on this node or another. A job stop wastes the checkpoint,
// a second or so of saving.

// stopSaveGrace is how long QEMU gets to exit once the checkpoint on stop is complete.
const stopSaveGrace = 10 * time.Second

// errVMEnded: the VM ended before it could be checkpointed.
var errVMEnded = errors.New("the vm has already ended")

// checkpointsOnStop tells whether Nomad stopping h's task checkpoints its VM: yield is on
// and the task's preemption, within the node's policy, is "checkpoint". Only then does the
// guest run detached from its 9p shares, which QEMU cannot save.
func (d *Driver) checkpointsOnStop(h *taskHandle) bool {
	d.mu.RLock()
	pc, policy := d.config, d.policy
	d.mu.RUnlock()
	if pc == nil || !pc.Yield.Enabled {
		return false
	}
	var tc TaskConfig
	if err := h.taskConfig.DecodeDriverConfig(&tc); err != nil {
		return false
	}
	p, err := policy.ForTask(tc.Preemption)
	return err == nil && p.Preemption == yield.ModeCheckpoint
}

// checkpointForStop checkpoints the running VM on its way out and reports whether the task
// has ended so. It reports false, having changed nothing, when the task waits on disk (it
// has no VM) or the checkpoint failed: the caller then stops the task as usual.
func (h *taskHandle) checkpointForStop() bool {
	m := h.currentMachine()
	if m == nil || !h.isRunning() {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), checkpointTimeout)
	defer cancel()
	if err := h.checkpoint(ctx, m, "stopped by Nomad"); err != nil {
		if !errors.Is(err, errVMEnded) {
			h.events("checkpoint on stop failed, stopping the task instead: "+err.Error(), nil)
		}
		return false
	}
	return h.waitDone(stopSaveGrace)
}
