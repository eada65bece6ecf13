package deskvm

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/shoenig/test/must"
)

// TestDriver_StopCheckpointsQEMU: Nomad stopping a task whose preemption is "checkpoint"
// (a drain, say) checkpoints its real VM, signed, and the task's next start (the
// replacement, with local/ migrated) resumes the command where it stopped. A task of
// another preemption mode is stopped with its signal, as before.
func TestDriver_StopCheckpointsQEMU(t *testing.T) {
	b := qemuBackend(t)
	const script = `echo ready; i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo "tick $i"; sleep 0.1; done; echo done`
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, Preemption: "checkpoint"})
	hv := b.newHV(t)
	pipe := newOwnerPipe(t)
	cfg := yieldConfig(t, pipe.path, "checkpoint")
	cfg.Harvest.Enabled = false
	h, d := newHarness(t, b, hv, cfg)
	events := collectEvents(t, d)
	handle, logs := start(t, h, task)
	waitFor(t, b.timeout, "a few ticks", func() bool { o, _ := logs(); return strings.Contains(o, "tick 3\n") })

	must.NoError(t, h.StopTask(handle.Config.ID, 5*time.Second, "SIGINT"))
	res := waitExit(t, h, handle.Config.ID, b.timeout)
	must.Eq(t, exitPreempted, res.ExitCode, must.Sprintf("result %+v, events: %s", res, events))
	must.ErrorContains(t, res.Err, "stopped by Nomad")
	cp := latestCheckpoint(task)
	must.NotEq(t, "", cp, must.Sprintf("the stop left a checkpoint in local/; events: %s", events))
	must.NoError(t, d.verifyCheckpoint(task, cp), must.Sprint("signed by this node for this task"))
	must.NoError(t, h.DestroyTask(handle.Config.ID, true))
	out, _ := logs()
	ticks := strings.Count(out, "tick ")

	next := *task
	next.ID = task.AllocID + "/" + task.Name + "/" + uuid.Short()
	resumedLogs := taskLogs(t, &next, "resumed")
	again, _, err := h.StartTask(&next)
	must.NoError(t, err)
	waitFor(t, 5*time.Second, "the resumed event", func() bool { return events.has("resumed from checkpoint") })
	th, ok := d.tasks.Get(again.Config.ID)
	must.True(t, ok)
	waitFor(t, 10*time.Second, "the yield loop to take the vm", layerIs(h, again.Config.ID, yield.LayerIdleClass, 100))
	must.NoError(t, th.currentMachine().SetIdle(false)) // this busy machine would starve it
	res = waitExit(t, h, again.Config.ID, 2*b.timeout)
	must.Eq(t, 0, res.ExitCode, must.Sprintf("result %+v, events: %s", res, events))
	waitFor(t, 5*time.Second, "the command's end", func() bool { return strings.Contains(resumedLogs(), "done") })
	after := resumedLogs()
	must.StrNotContains(t, after, "ready", must.Sprint("the command must carry on, not start again"))
	must.StrContains(t, after, fmt.Sprintf("tick %d\n", ticks+1), must.Sprintf("before:\n%s\nafter:\n%s", out, after))
	t.Logf("stopped after %d ticks, checkpointed, resumed at tick %d", ticks, ticks+1)

	t.Run("suspend mode is signalled", func(t *testing.T) {
		other := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "trap 'exit 3' INT; echo ready; while :; do sleep 0.1; done"}, Preemption: "suspend"})
		oh, ologs := start(t, h, other)
		waitFor(t, b.timeout, "ready", func() bool { o, _ := ologs(); return strings.Contains(o, "ready") })
		must.NoError(t, h.StopTask(oh.Config.ID, 5*time.Second, "SIGINT"))
		res := waitExit(t, h, oh.Config.ID, b.timeout)
		must.Eq(t, 3, res.ExitCode, must.Sprintf("the command's trap ran; result %+v", res))
		must.Eq(t, "", latestCheckpoint(other))
	})
}
