package deskvm

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/client/logmon"
	"github.com/hashicorp/nomad/helper/testlog"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

// TestDriver_WaitOnDiskQEMU runs the whole round with a real VM: a task is checkpointed
// while the owner works and exits 75; Nomad's restart of it (the same task dir, a new task
// id) comes while the owner is still active, so it waits on disk with no QEMU process; once
// the owner has left for resume_after the VM is restored and the command carries on where it
// was, to its end.
func TestDriver_WaitOnDiskQEMU(t *testing.T) {
	b := qemuBackend(t)
	// The command counts to 60, slowly; a restart from the beginning would print "ready"
	// twice.
	const script = `echo ready; i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo "tick $i"; sleep 0.1; done; echo done`
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, Preemption: "checkpoint"})
	hv := b.newHV(t)
	pipe := newOwnerPipe(t)
	cfg := yieldConfig(t, pipe.path, "checkpoint")
	cfg.Harvest.Enabled = false // the forecast's memory floor is not under test here
	h, d := newHarness(t, b, hv, cfg)
	events := collectEvents(t, d)
	handle, logs := start(t, h, task)
	pipe.open()
	waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })

	// The owner works: the VM is paused after suspend_after, and checkpointed after
	// checkpoint_after.
	pipe.playUntil(t, 2*b.timeout, "the checkpoint", 95, 0, func() bool { return events.has("checkpointed ") })
	res := waitExit(t, h, handle.Config.ID, b.timeout)
	must.Eq(t, exitPreempted, res.ExitCode, must.Sprintf("result %+v, events: %s", res, events))
	cp := latestCheckpoint(task)
	must.NotEq(t, "", cp, must.Sprint("the checkpoint is in the task's local dir"))
	out, _ := logs()
	must.False(t, strings.Contains(out, "done"), must.Sprint("the command must not have ended before the checkpoint"))

	// Nomad restarts the task while the owner is still at work.
	pipe.play(1, 95, 0)
	must.True(t, d.ownerActive())
	next := *task
	next.ID = task.AllocID + "/" + task.Name + "/" + uuid.Short()
	resumedLogs := taskLogs(t, &next, "resumed")
	restarted, _, err := h.StartTask(&next)
	must.NoError(t, err)
	id := restarted.Config.ID
	waitFor(t, 10*time.Second, "the waiting event", func() bool {
		return events.has("waiting on disk while the owner is active: checkpoint " + filepath.Base(cp))
	})
	st, err := h.InspectTask(id)
	must.NoError(t, err)
	must.Eq(t, layerWaiting, st.DriverAttributes["layer"])
	must.Eq(t, "0", st.DriverAttributes["pid"])
	name := vmName(id)
	must.False(t, qemuRuns(name), must.Sprintf("no qemu may run for %s while the task waits on disk", name))

	// The owner leaves: after resume_after the VM comes back from the checkpoint.
	n := pipe.playUntil(t, 2*b.timeout, "the vm resumed", 0, 3600, func() bool { return events.has("resumed from checkpoint") })
	must.GreaterEq(t, 6, n, must.Sprint("the task resumes only after resume_after: 5 s after the first quiet sample is the sixth"))
	must.True(t, qemuRuns(name), must.Sprintf("qemu runs for %s once the task resumed", name))
	// The idle class is not under test here, and this machine's other work would starve an
	// idle-class guest: let it run normally once the yield loop has set it.
	waitFor(t, 10*time.Second, "the yield loop to take the vm", layerIs(h, id, yield.LayerIdleClass, 100))
	th, ok := d.tasks.Get(id)
	must.True(t, ok)
	must.NoError(t, th.currentMachine().SetIdle(false))

	res = waitExit(t, h, id, 2*b.timeout)
	must.Eq(t, 0, res.ExitCode, must.Sprintf("the resumed command must finish, got %+v, events: %s", res, events))
	waitFor(t, 5*time.Second, "the command's end in the resumed task's log", func() bool { return strings.Contains(resumedLogs(), "done") })
	after := resumedLogs()
	out, _ = logs()
	ticks := strings.Count(out, "tick ")
	must.StrNotContains(t, after, "ready", must.Sprint("the command must carry on, not start again"))
	must.StrNotContains(t, after, "tick 1\n", must.Sprint("the count must carry on after the checkpoint"))
	must.StrContains(t, after, fmt.Sprintf("tick %d\n", ticks+1),
		must.Sprintf("the count must carry on where the checkpoint left it; before:\n%s\nafter:\n%s", out, after))
	must.Eq(t, "", latestCheckpoint(task), must.Sprint("a resumed checkpoint is removed"))
	t.Logf("checkpointed after %d ticks, waited on disk, resumed on owner sample %d after they left", ticks, n)
}

// taskLogs gives task log files of its own, named after name, as Nomad's logmon does for
// each run, and returns a function that reads its stdout log.
func taskLogs(t *testing.T, task *drivers.TaskConfig, name string) func() string {
	t.Helper()
	dir := task.TaskDir().LogDir
	task.StdoutPath = filepath.Join(dir, "."+name+".stdout.fifo")
	task.StderrPath = filepath.Join(dir, "."+name+".stderr.fifo")
	lm := logmon.NewLogMon(testlog.HCLogger(t).Named("logmon"))
	must.NoError(t, lm.Start(&logmon.LogConfig{
		LogDir:        dir,
		StdoutLogFile: name + ".stdout",
		StderrLogFile: name + ".stderr",
		StdoutFifo:    task.StdoutPath,
		StderrFifo:    task.StderrPath,
		MaxFiles:      2,
		MaxFileSizeMB: 10,
	}))
	t.Cleanup(func() { _ = lm.Stop() })
	return func() string {
		b, _ := os.ReadFile(filepath.Join(dir, name+".stdout.0"))
		return string(b)
	}
}

// qemuRuns tells whether a QEMU process of the VM named name runs on this host.
func qemuRuns(name string) bool {
	dirs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte("\x00"+name+",debug-threads=on\x00")) {
			return true
		}
	}
	return false
}
