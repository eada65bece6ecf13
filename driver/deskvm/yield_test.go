package deskvm

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

// ownerPipe is a named pipe that the driver replays owner samples from, written as the test
// goes, in trace time from a fixed start.
type ownerPipe struct {
	t    *testing.T
	path string
	f    *os.File
	at   time.Time
}

func newOwnerPipe(t *testing.T) *ownerPipe {
	p := filepath.Join(t.TempDir(), "owner.fifo")
	must.NoError(t, syscall.Mkfifo(p, 0o600))
	return &ownerPipe{t: t, path: p, at: time.Date(2026, 3, 2, 9, 0, 0, 0, time.UTC)}
}

// open opens the pipe's write end once the driver reads it.
func (p *ownerPipe) open() {
	f, err := os.OpenFile(p.path, os.O_WRONLY, 0)
	must.NoError(p.t, err)
	p.t.Cleanup(func() { f.Close() })
	_, err = fmt.Fprintln(f, "timestamp,cpu_percent,mem_available_mib,input_idle_seconds,locked")
	must.NoError(p.t, err)
	p.f = f
}

// play writes n samples one second apart of the owner at cpu percent with input idle for
// idle seconds.
func (p *ownerPipe) play(n int, cpu float64, idle float64) {
	for range n {
		_, err := fmt.Fprintf(p.f, "%s,%g,16384,%g,false\n", p.at.Format(time.RFC3339Nano), cpu, idle)
		must.NoError(p.t, err)
		p.at = p.at.Add(time.Second)
	}
}

// yieldConfig is a yield policy with short times, driven by a replayed owner only.
func yieldConfig(t *testing.T, pipe string, preemption string) *Config {
	c := defaultConfig(t, fmt.Sprintf(`yield {
  load_window     = "0s"
  settle_after    = "0s"
  suspend_after   = "5s"
  resume_after    = "5s"
  checkpoint_after = "5s"
  preemption      = %q
}
owner {
  sources        = []
  replay_file    = %q
  replay_speed   = 0
  forecast_state = ""
}`, preemption, pipe))
	c.StateDir = shortTempDir(t)
	c.CheckpointKeyFile = testKeyFile
	c.BootTimeout = "90s"
	return c
}

// eventLog collects the driver's task events.
type eventLog struct {
	mu   sync.Mutex
	msgs []string
}

func collectEvents(t *testing.T, d *Driver) *eventLog {
	ch, err := d.TaskEvents(t.Context())
	must.NoError(t, err)
	l := &eventLog{}
	go func() {
		for ev := range ch {
			l.mu.Lock()
			l.msgs = append(l.msgs, ev.Message)
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *eventLog) has(sub string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, m := range l.msgs {
		if strings.Contains(m, sub) {
			return true
		}
	}
	return false
}

func (l *eventLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.msgs, " | ")
}

// TestDriver_YieldLayers drives a fake VM through the CPU cap, pause and resume with a
// replayed owner, and checks the VM's controls, the task events and InspectTask.
func TestDriver_YieldLayers(t *testing.T) {
	b := fakeBackend()
	hv := newFakeHypervisor(t)
	pipe := newOwnerPipe(t)
	h, d := newHarness(t, b, hv, yieldConfig(t, pipe.path, "suspend"))
	events := collectEvents(t, d)
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo ready; while :; do sleep 0.1; done"}})
	handle, _ := start(t, h, task)
	pipe.open()
	machine := func() *fakeMachine {
		hv.mu.Lock()
		defer hv.mu.Unlock()
		for _, m := range hv.machines {
			return m
		}
		return nil
	}
	attr := func(key string) string {
		st, err := h.InspectTask(handle.Config.ID)
		must.NoError(t, err)
		return st.DriverAttributes[key]
	}

	waitFor(t, 10*time.Second, "the vm at idle priority", func() bool { idle, _, _, _ := machine().yieldState(); return idle })

	pipe.play(2, 40, 3600) // owner load 0.4: the 25% band
	waitFor(t, 10*time.Second, "the cap at 25%", func() bool { _, c, _, _ := machine().yieldState(); return c == 25 })
	must.Eq(t, "25", attr("cpu_cap_percent"))
	// The cap is set before its event is sent, and events reach the collector on their own.
	waitFor(t, 5*time.Second, "the cap's event", func() bool { return events.has("CPU capped at 25%") })

	pipe.play(8, 90, 0) // busy and typing for 8 s: past suspend_after
	waitFor(t, 10*time.Second, "the vm paused", func() bool { _, _, _, p := machine().yieldState(); return p })
	must.Eq(t, yield.LayerPause.String(), attr("layer"))
	_, c, _, _ := machine().yieldState()
	must.Eq(t, 10, c, must.Sprint("a busy owner caps the vm at the last band before the pause"))

	pipe.play(8, 0, 3600) // gone: past resume_after
	waitFor(t, 10*time.Second, "the vm resumed", func() bool { _, _, _, p := machine().yieldState(); return !p })
	must.True(t, events.has("pause"), must.Sprintf("events: %s", events))
	must.NoError(t, h.StopTask(handle.Config.ID, time.Second, "SIGKILL"))
	res := waitExit(t, h, handle.Config.ID, 10*time.Second)
	must.NotEq(t, exitPreempted, res.ExitCode, must.Sprint("suspend mode never ends the task"))

	// The node's attributes describe the owner.
	fp := d.buildFingerprint()
	must.Eq(t, "away", fp.Attributes["driver.deskvm.owner.state"].GoString(), must.Sprintf("attributes: %v", fp.Attributes))
}

// TestDriver_YieldRestart: preemption = "restart" ends the task with the preempted exit code
// once the VM has been paused for checkpoint_after.
func TestDriver_YieldRestart(t *testing.T) {
	b := fakeBackend()
	hv := newFakeHypervisor(t)
	pipe := newOwnerPipe(t)
	h, d := newHarness(t, b, hv, yieldConfig(t, pipe.path, "checkpoint"))
	events := collectEvents(t, d)
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "while :; do sleep 0.1; done"}, Preemption: "restart"})
	handle, _ := start(t, h, task)
	pipe.open()
	pipe.play(8, 95, 0) // busy past suspend_after
	waitFor(t, 10*time.Second, "the vm paused", func() bool {
		st, err := h.InspectTask(handle.Config.ID)
		return err == nil && st.DriverAttributes["layer"] == yield.LayerPause.String()
	})
	pipe.play(8, 95, 0) // and paused past checkpoint_after
	res := waitExit(t, h, handle.Config.ID, 20*time.Second)
	must.Eq(t, exitPreempted, res.ExitCode, must.Sprintf("result %+v, events: %s", res, events))
	must.ErrorContains(t, res.Err, "restarts from the beginning")
	st, err := h.InspectTask(handle.Config.ID)
	must.NoError(t, err)
	must.Eq(t, drivers.TaskStateExited, st.State)
}

// TestDriver_YieldRecover: a driver restart while the VM is capped and paused finds it as it
// was, and the new driver carries on from that layer: it resumes the VM once the owner has
// been gone for resume_after.
func TestDriver_YieldRecover(t *testing.T) {
	b := fakeBackend()
	hv := newFakeHypervisor(t)
	pipe1 := newOwnerPipe(t)
	cfg1 := yieldConfig(t, pipe1.path, "suspend")
	h1, d1 := newHarness(t, b, hv, cfg1)
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "while :; do sleep 0.1; done"}})
	handle, _ := start(t, h1, task)
	pipe1.open()
	pipe1.play(8, 95, 0)
	waitFor(t, 10*time.Second, "the vm paused", func() bool {
		st, err := h1.InspectTask(handle.Config.ID)
		return err == nil && st.DriverAttributes["layer"] == yield.LayerPause.String()
	})

	d1.Shutdown()
	h1.Kill()

	pipe2 := newOwnerPipe(t)
	cfg2 := yieldConfig(t, pipe2.path, "suspend")
	cfg2.StateDir = cfg1.StateDir
	h2, d2 := newHarness(t, b, hv, cfg2)
	events := collectEvents(t, d2)
	must.NoError(t, h2.RecoverTask(handle))
	// The recovered task knows its own task config, which its checkpoints are signed for.
	rh, ok := d2.tasks.Get(handle.Config.ID)
	must.True(t, ok)
	want, err := taskIdentity(task)
	must.NoError(t, err)
	got, err := taskIdentity(rh.taskConfig)
	must.NoError(t, err, must.Sprint("the recovered task's config must carry its driver config"))
	must.Eq(t, want, got)
	st, err := h2.InspectTask(handle.Config.ID)
	must.NoError(t, err)
	waitFor(t, 10*time.Second, "the recovered layer", func() bool {
		st, err = h2.InspectTask(handle.Config.ID)
		return err == nil && st.DriverAttributes["layer"] == yield.LayerPause.String()
	})
	must.Eq(t, "10", st.DriverAttributes["cpu_cap_percent"], must.Sprint("the cap is read back from the vm"))
	waitFor(t, 10*time.Second, "the recovered event", func() bool { return events.has("recovered: pause") })
	var m *fakeMachine
	for _, fm := range hv.machines {
		m = fm
	}
	_, _, _, paused := m.yieldState()
	must.True(t, paused, must.Sprint("recovering must not resume a paused vm"))

	pipe2.open()
	pipe2.play(8, 0, 3600) // gone past resume_after
	waitFor(t, 10*time.Second, "the vm resumed", func() bool { _, _, _, p := m.yieldState(); return !p })
	must.NoError(t, h2.StopTask(handle.Config.ID, time.Second, "SIGKILL"))
}
