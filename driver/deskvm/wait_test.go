package deskvm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	"github.com/shoenig/test/must"
)

// restoredCommand is what the VM of a fake checkpoint runs once restored.
func restoredCommand(script string) guestctl.Spec {
	return guestctl.Spec{TaskID: "before-the-checkpoint", Command: "/bin/sh", Args: []string{"-c", script}}
}

// ownerActive starts d's owner sensing on pipe and plays a busy, typing owner until the
// driver sees them active.
func ownerActive(t *testing.T, d *Driver, pipe *ownerPipe) {
	t.Helper()
	must.NotNil(t, d.sensor())
	pipe.open()
	pipe.playUntil(t, 10*time.Second, "the owner active", 95, 0, d.ownerActive)
}

// waitRig is a driver on the fake hypervisor with a checkpoint-mode yield policy and a
// replayed owner who is active.
type waitRig struct {
	cfg    *Config
	hv     *fakeHypervisor
	h      *dtestutil.DriverHarness
	d      *Driver
	pipe   *ownerPipe
	events *eventLog
}

func newWaitRig(t *testing.T) *waitRig {
	t.Helper()
	hv := newFakeHypervisor(t)
	pipe := newOwnerPipe(t)
	cfg := yieldConfig(t, pipe.path, "checkpoint")
	h, d := newHarness(t, fakeBackend(), hv, cfg)
	r := &waitRig{cfg: cfg, hv: hv, h: h, d: d, pipe: pipe, events: collectEvents(t, d)}
	ownerActive(t, d, pipe)
	return r
}

// restart shuts the driver down and starts another on the same hypervisor and state dir,
// with a fresh owner pipe the test opens; the tasks are left for it to recover.
func (r *waitRig) restart(t *testing.T) *waitRig {
	t.Helper()
	r.d.Shutdown()
	r.h.Kill()
	pipe := newOwnerPipe(t)
	cfg := *r.cfg
	cfg.Owner.ReplayFile = pipe.path
	h, d := newHarness(t, fakeBackend(), r.hv, &cfg)
	return &waitRig{cfg: &cfg, hv: r.hv, h: h, d: d, pipe: pipe, events: collectEvents(t, d)}
}

// ownerLeaves plays an owner who has gone until the waiting task's VM is restored.
func (r *waitRig) ownerLeaves(t *testing.T) int {
	t.Helper()
	return r.pipe.playUntil(t, 30*time.Second, "the vm restored", 0, 3600, func() bool { _, n := r.hv.counts(); return n == 1 })
}

// waitingTask starts, with the owner active, a task whose local dir holds a fake checkpoint
// that runs script when restored, and checks that it waits on disk. The task's own command,
// which a fresh VM would run, prints "fresh" and exits 9.
func waitingTask(t *testing.T, h *dtestutil.DriverHarness, hv *fakeHypervisor, events *eventLog, script string) (*drivers.TaskHandle, string, func() string) {
	t.Helper()
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo fresh; exit 9"}})
	t.Cleanup(h.MkAllocDir(task, true))
	cp := writeFakeCheckpoint(t, task, restoredCommand(script))
	handle, _, err := h.StartTask(task)
	must.NoError(t, err)
	id := handle.Config.ID

	launched, restored := hv.counts()
	must.Eq(t, 0, launched, must.Sprint("a task waiting on disk must launch no vm"))
	must.Eq(t, 0, restored, must.Sprint("a task waiting on disk must restore no vm while the owner is active"))
	want := "waiting on disk while the owner is active: checkpoint " + filepath.Base(cp) + ", 0 MiB"
	waitFor(t, 5*time.Second, "the waiting event", func() bool { return events.has(want) })
	st, err := h.InspectTask(id)
	must.NoError(t, err)
	must.Eq(t, drivers.TaskStateRunning, st.State, must.Sprint("Nomad must see a waiting task running"))
	must.Eq(t, layerWaiting, st.DriverAttributes["layer"], must.Sprintf("attributes: %v", st.DriverAttributes))
	must.Eq(t, "0", st.DriverAttributes["pid"], must.Sprint("a waiting task has no qemu process"))
	must.Eq(t, filepath.Base(cp), st.DriverAttributes["checkpoint"])
	logs := func() string {
		b, _ := os.ReadFile(filepath.Join(task.TaskDir().LogDir, task.Name+".stdout.0"))
		return string(b)
	}
	return handle, cp, logs
}

// TestDriver_WaitOnDisk starts a checkpointed task while the owner is active: it waits on
// disk with no VM, answers stats, signals and exec as a task without a VM, stays there while
// the owner works, and is restored and resumed once the owner has been gone for
// resume_after.
func TestDriver_WaitOnDisk(t *testing.T) {
	r := newWaitRig(t)
	h, hv, events := r.h, r.hv, r.events
	handle, cp, logs := waitingTask(t, h, hv, events, "trap 'echo got-usr1' USR1; echo restored; while :; do sleep 0.1; done")
	id := handle.Config.ID

	ch, err := h.TaskStats(t.Context(), id, 50*time.Millisecond)
	must.NoError(t, err)
	u := <-ch
	must.NotNil(t, u, must.Sprint("a waiting task reports stats"))
	must.Eq(t, 0.0, u.ResourceUsage.CpuStats.Percent, must.Sprint("a waiting task uses no CPU"))
	must.Eq(t, uint64(0), u.ResourceUsage.MemoryStats.RSS, must.Sprint("a waiting task holds no memory"))
	err = h.SignalTask(id, "SIGUSR1")
	must.ErrorContains(t, err, "the task is waiting on disk for the owner to leave")
	_, err = h.ExecTask(id, []string{"/bin/true"}, 5*time.Second)
	must.ErrorContains(t, err, "the task is waiting on disk for the owner to leave")

	// The owner works on, well past resume_after and checkpoint_after: still on disk.
	r.pipe.playUntil(t, 10*time.Second, "twelve busy seconds", 95, 0, countTo(12))
	waitFor(t, 5*time.Second, "the wait to see the owner", func() bool {
		st, err := h.InspectTask(id)
		return err == nil && st.DriverAttributes["owner"] == "active"
	})
	launched, restored := hv.counts()
	must.Eq(t, 0, launched+restored, must.Sprint("no vm while the owner is active"))
	st, err := h.InspectTask(id)
	must.NoError(t, err)
	must.Eq(t, layerWaiting, st.DriverAttributes["layer"])

	// The owner leaves: the VM is restored once they have been gone for resume_after.
	n := r.ownerLeaves(t)
	must.GreaterEq(t, 6, n, must.Sprint("a waiting task resumes only after resume_after: 5 s after the first quiet sample is the sixth"))
	waitFor(t, 10*time.Second, "the resumed event", func() bool { return events.has("resumed from checkpoint") })
	waitFor(t, 10*time.Second, "the restored command's output", func() bool { return strings.Contains(logs(), "restored") })
	st, err = h.InspectTask(id)
	must.NoError(t, err)
	must.NotEq(t, layerWaiting, st.DriverAttributes["layer"])
	must.NotEq(t, "0", st.DriverAttributes["pid"], must.Sprint("the resumed task has its vm's pid"))
	must.MapNotContainsKey(t, st.DriverAttributes, "checkpoint")
	launched, _ = hv.counts()
	must.Eq(t, 0, launched, must.Sprint("the vm comes from the checkpoint, not afresh"))
	must.False(t, strings.Contains(logs(), "fresh"), must.Sprint("the task's command must not run afresh"))
	_, err = os.Stat(cp)
	must.True(t, errors.Is(err, os.ErrNotExist), must.Sprintf("a resumed checkpoint is removed, stat says %v", err))
	_, _, _, paused := fakeVM(t, hv).yieldState()
	must.False(t, paused, must.Sprint("the restored vm must be resumed"))

	must.NoError(t, h.SignalTask(id, "SIGUSR1"), must.Sprint("a resumed task takes signals"))
	waitFor(t, 10*time.Second, "the USR1 trap", func() bool { return strings.Contains(logs(), "got-usr1") })
	must.NoError(t, h.StopTask(id, time.Second, "SIGKILL"))
	res := waitExit(t, h, id, 10*time.Second)
	must.Eq(t, int(syscall.SIGKILL), res.Signal, must.Sprintf("result %+v, events: %s", res, events))
}

// TestDriver_WaitOnDiskRecover restarts the driver under a task waiting on disk: the new
// driver finds it waiting, as it was, and resumes it once the owner leaves; and under a task
// whose VM came up from its checkpoint after StartTask (the state Nomad holds still says
// waiting): the new driver finds that VM rather than restoring again.
func TestDriver_WaitOnDiskRecover(t *testing.T) {
	t.Run("still waiting", func(t *testing.T) {
		r := newWaitRig(t)
		handle, cp, logs := waitingTask(t, r.h, r.hv, r.events, "echo restored; while :; do sleep 0.1; done")
		id := handle.Config.ID
		before, err := r.h.InspectTask(id)
		must.NoError(t, err)

		r = r.restart(t)
		must.NoError(t, r.h.RecoverTask(handle))
		after, err := r.h.InspectTask(id)
		must.NoError(t, err)
		for _, key := range []string{"pid", "mode", "vm", "layer", "checkpoint", "cpu_cap_percent", "balloon_mib"} {
			must.Eq(t, before.DriverAttributes[key], after.DriverAttributes[key], must.Sprintf("attribute %s after the restart", key))
		}
		must.Eq(t, before.StartedAt.UnixNano(), after.StartedAt.UnixNano())
		must.Eq(t, drivers.TaskStateRunning, after.State)
		waitFor(t, 5*time.Second, "the recovered event", func() bool { return r.events.has("recovered: waiting on disk") })
		launched, restored := r.hv.counts()
		must.Eq(t, 0, launched+restored, must.Sprint("recovering a waiting task starts no vm"))

		ownerActive(t, r.d, r.pipe)
		r.ownerLeaves(t)
		waitFor(t, 10*time.Second, "the resumed event", func() bool { return r.events.has("resumed from checkpoint") })
		waitFor(t, 10*time.Second, "the restored command's output", func() bool { return strings.Contains(logs(), "restored") })
		_, err = os.Stat(cp)
		must.True(t, errors.Is(err, os.ErrNotExist), must.Sprintf("a resumed checkpoint is removed, stat says %v", err))
		must.NoError(t, r.h.StopTask(id, time.Second, "SIGKILL"))
		waitExit(t, r.h, id, 10*time.Second)
	})

	t.Run("resumed before the restart", func(t *testing.T) {
		r := newWaitRig(t)
		// The restored command ends once told to, with a code the test checks.
		gate := filepath.Join(shortTempDir(t), "go")
		handle, _, logs := waitingTask(t, r.h, r.hv, r.events,
			"echo restored; while [ ! -e "+gate+" ]; do sleep 0.1; done; echo ending; exit 5")
		id := handle.Config.ID
		r.ownerLeaves(t)
		waitFor(t, 10*time.Second, "the resumed event", func() bool { return r.events.has("resumed from checkpoint") })
		before, err := r.h.InspectTask(id)
		must.NoError(t, err)

		r = r.restart(t)
		must.NoError(t, r.h.RecoverTask(handle), must.Sprint("the handle Nomad holds says waiting; the vm must be found"))
		after, err := r.h.InspectTask(id)
		must.NoError(t, err)
		must.Eq(t, before.DriverAttributes["pid"], after.DriverAttributes["pid"])
		must.NotEq(t, layerWaiting, after.DriverAttributes["layer"])
		launched, restored := r.hv.counts()
		must.Eq(t, 0, launched, must.Sprint("recovering must not start the task afresh"))
		must.Eq(t, 1, restored, must.Sprint("recovering must not restore a second vm"))

		must.NoError(t, os.WriteFile(gate, nil, 0o644))
		res := waitExit(t, r.h, id, 10*time.Second)
		must.Eq(t, 5, res.ExitCode, must.Sprintf("the restored command's exit code, got %+v", res))
		waitFor(t, 5*time.Second, "the restored command's last output", func() bool { return strings.Contains(logs(), "ending") })
	})
}

// TestDriver_StopWhileWaiting stops and destroys tasks waiting on disk: each ends at once,
// no vm is started, and the checkpoint stays for a later start.
func TestDriver_StopWhileWaiting(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(h *dtestutil.DriverHarness, id string) error
		want *drivers.ExitResult // nil: the task is gone
	}{
		{"stop", func(h *dtestutil.DriverHarness, id string) error { return h.StopTask(id, 5*time.Second, "SIGTERM") },
			&drivers.ExitResult{ExitCode: 128 + int(syscall.SIGTERM), Signal: int(syscall.SIGTERM)}},
		{"destroy", func(h *dtestutil.DriverHarness, id string) error { return h.DestroyTask(id, false) }, nil},
		{"force destroy", func(h *dtestutil.DriverHarness, id string) error { return h.DestroyTask(id, true) }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newWaitRig(t)
			h := r.h
			handle, cp, _ := waitingTask(t, h, r.hv, r.events, "echo restored; sleep 60")
			id := handle.Config.ID

			must.NoError(t, tc.end(h, id))
			if tc.want != nil {
				res := waitExit(t, h, id, 5*time.Second)
				must.Eq(t, tc.want.ExitCode, res.ExitCode)
				must.Eq(t, tc.want.Signal, res.Signal)
				must.NoError(t, res.Err)
				st, err := h.InspectTask(id)
				must.NoError(t, err)
				must.Eq(t, drivers.TaskStateExited, st.State)
				waitFor(t, 5*time.Second, "the stopped event", func() bool { return r.events.has("stopped while waiting on disk") })
				must.NoError(t, h.DestroyTask(id, false))
			}
			_, err := h.InspectTask(id)
			must.ErrorContains(t, err, drivers.ErrTaskNotFound.Error(), must.Sprint("a destroyed task is gone"))

			// The owner leaves: nothing comes back for a task that was stopped.
			r.pipe.playUntil(t, 10*time.Second, "ten quiet seconds", 0, 3600, countTo(10))
			launched, restored := r.hv.counts()
			must.Eq(t, 0, launched+restored, must.Sprint("a stopped waiting task must start no vm"))
			must.Eq(t, cp, latestCheckpoint(handle.Config), must.Sprint("the checkpoint must stay for a later start"))
		})
	}
}

// TestDriver_WaitOnDiskRestoreFails: a checkpoint that cannot be restored when the owner
// leaves is kept as failed-…, and the task starts afresh, as at StartTask.
func TestDriver_WaitOnDiskRestoreFails(t *testing.T) {
	r := newWaitRig(t)
	r.hv.restoreFailure = "qemu refuses the state"
	handle, cp, logs := waitingTask(t, r.h, r.hv, r.events, "echo restored; sleep 60")
	id := handle.Config.ID

	r.ownerLeaves(t)
	waitFor(t, 10*time.Second, "a fresh vm", func() bool { l, _ := r.hv.counts(); return l == 1 })
	res := waitExit(t, r.h, id, 10*time.Second)
	must.Eq(t, 9, res.ExitCode, must.Sprintf("the task's own command, run afresh, exits 9; got %+v, events: %s", res, r.events))
	waitFor(t, 5*time.Second, "the fresh command's output", func() bool { return strings.Contains(logs(), "fresh") })
	must.True(t, r.events.has("checkpoint could not be resumed, starting afresh: "), must.Sprintf("events: %s", r.events))
	must.True(t, r.events.has("qemu refuses the state"), must.Sprintf("events: %s", r.events))
	failed := filepath.Join(filepath.Dir(cp), "failed-"+filepath.Base(cp))
	must.NoError(t, vm.CheckCheckpoint(failed), must.Sprint("the checkpoint is kept, renamed, not lost"))
	must.Eq(t, "", latestCheckpoint(handle.Config), must.Sprint("a failed checkpoint is never resumed again"))
}

// TestDriver_CheckpointResumesAtOnce: with yield off, or the owner not active, a
// checkpointed task resumes within StartTask as before.
func TestDriver_CheckpointResumesAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name     string
		yieldOff bool
		cpu      float64 // the owner's CPU percent before the start
		idle     float64 // and input idle seconds
		state    string  // the owner's state the driver must see first
	}{
		{"owner away", false, 0, 3600, "away"},
		{"yield off", true, 95, 0, "active"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := fakeBackend()
			hv := newFakeHypervisor(t)
			pipe := newOwnerPipe(t)
			cfg := yieldConfig(t, pipe.path, "checkpoint")
			cfg.Yield.Enabled = !tc.yieldOff
			h, d := newHarness(t, b, hv, cfg)
			events := collectEvents(t, d)
			must.NotNil(t, d.sensor())
			pipe.open()
			pipe.playUntil(t, 10*time.Second, "the owner "+tc.state, tc.cpu, tc.idle, func() bool {
				a, ok := d.buildFingerprint().Attributes["driver.deskvm.owner.state"]
				if !ok {
					return false
				}
				s, _ := a.GetString()
				return s == tc.state
			})

			task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo fresh; exit 9"}})
			t.Cleanup(h.MkAllocDir(task, true))
			cp := writeFakeCheckpoint(t, task, restoredCommand("echo restored; sleep 60"))
			handle, _, err := h.StartTask(task)
			must.NoError(t, err)
			launched, restored := hv.counts()
			must.Eq(t, 1, restored, must.Sprint("the vm is restored within StartTask"))
			must.Eq(t, 0, launched)
			waitFor(t, 5*time.Second, "the resumed event", func() bool { return events.has("resumed from checkpoint") })
			must.False(t, events.has("waiting on disk"), must.Sprintf("events: %s", events))
			st, err := h.InspectTask(handle.Config.ID)
			must.NoError(t, err)
			must.NotEq(t, layerWaiting, st.DriverAttributes["layer"])
			_, _, _, paused := fakeVM(t, hv).yieldState()
			must.False(t, paused)
			_, err = os.Stat(cp)
			must.True(t, errors.Is(err, os.ErrNotExist), must.Sprintf("a resumed checkpoint is removed, stat says %v", err))
			must.NoError(t, h.StopTask(handle.Config.ID, time.Second, "SIGKILL"))
		})
	}
}

// TestTaskState_DecodesOldHandles: a task handle written before taskState had WaitingOn
// decodes, as a task with a VM.
func TestTaskState_DecodesOldHandles(t *testing.T) {
	type taskStateV1 struct { // taskState as it was before WaitingOn
		TaskConfig *drivers.TaskConfig
		Mode       string
		Spec       vm.Spec
		PID        int
		StartedAt  int64
		Yield      bool
		Preemption string
	}
	task := newTask(t, TaskConfig{Command: "/bin/true"})
	old := taskStateV1{TaskConfig: task, Mode: modeCommand, Spec: vm.Spec{Name: "deskvm-0123456789abcdef", MemoryMiB: 256},
		PID: 4242, StartedAt: 17, Yield: true, Preemption: "suspend"}
	handle := drivers.NewTaskHandle(taskHandleVersion)
	must.NoError(t, handle.SetDriverState(&old))
	var st taskState
	must.NoError(t, handle.GetDriverState(&st))
	must.Eq(t, "", st.WaitingOn)
	must.Eq(t, old.PID, st.PID)
	must.Eq(t, old.Spec.Name, st.Spec.Name)
	must.Eq(t, old.Preemption, st.Preemption)
	must.True(t, st.Yield)
	must.Eq(t, task.ID, st.TaskConfig.ID)
}

// countTo is a playUntil condition that holds after n calls: n samples.
func countTo(n int) func() bool {
	i := 0
	return func() bool { i++; return i > n }
}

// fakeVM is the one VM hv runs.
func fakeVM(t *testing.T, hv *fakeHypervisor) *fakeMachine {
	t.Helper()
	hv.mu.Lock()
	defer hv.mu.Unlock()
	must.Eq(t, 1, len(hv.machines), must.Sprint("want exactly one vm"))
	for _, m := range hv.machines {
		return m
	}
	return nil
}
