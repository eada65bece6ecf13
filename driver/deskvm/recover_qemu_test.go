package deskvm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	"github.com/shoenig/test/must"
)

// TestDriver_YieldRecoverQEMU restarts the driver twice under a real VM that yields to a
// replayed owner: once while the VM is capped, once while it is paused. Each new driver must
// find the same QEMU process in the same layer, read back from the VM itself (QMP
// query-status, the cgroup's CFS quota), report it, and carry on from there: the paused VM
// resumes once the owner has been gone for resume_after, and the task ends with its output.
func TestDriver_YieldRecoverQEMU(t *testing.T) {
	b := qemuBackend(t)
	// The guest waits for /local/go, ticking meanwhile, then does some sums.
	const script = `echo ready; n=0; while [ ! -e /local/go ]; do n=$((n+1)); echo "tick $n"; sleep 0.2; done
s=0; i=0; while [ $i -lt 1000 ]; do i=$((i+1)); s=$((s+i*i)); done; echo "sum $s"`
	const wantSum = "sum 333833500" // 1² + 2² + ... + 1000²
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}})
	cgroups := withTaskCgroups(t, task) // before the VMs, so they are reaped first
	hv := b.newHV(t)

	pipe := newOwnerPipe(t)
	cfg := yieldConfig(t, pipe.path, "suspend")
	cfg.Harvest.Enabled = false // the forecast's memory floor is not under test here
	h, d := newHarness(t, b, hv, cfg)
	handle, logs := start(t, h, task)
	id := handle.Config.ID
	pipe.open()
	waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })
	before, err := h.InspectTask(id)
	must.NoError(t, err)
	pid := before.DriverAttributes["pid"]

	// The owner works lightly (load 0.4): the VM is capped at 25%.
	pipe.playUntil(t, 30*time.Second, "the cap at 25%", 40, 3600, layerIs(h, id, yield.LayerCPUCap, 25))
	vmIs(t, d, id, cgroups, 25, false)

	// The driver restarts while the VM is capped.
	h, d, pipe = restartDriver(t, b, hv, cfg, h, d, handle, pid, yield.LayerCPUCap, 25)
	vmIs(t, d, id, cgroups, 25, false)

	// The owner gets busy and types (load 0.9): the cap drops to 10%, and after
	// suspend_after the VM is paused.
	pipe.playUntil(t, 30*time.Second, "the vm paused", 90, 0, layerIs(h, id, yield.LayerPause, 10))
	vmIs(t, d, id, cgroups, 10, true)

	// The driver restarts while the VM is paused.
	h, d, pipe = restartDriver(t, b, hv, cfg, h, d, handle, pid, yield.LayerPause, 10)
	vmIs(t, d, id, cgroups, 10, true)
	out, _ := logs()
	ticks := strings.Count(out, "tick ")

	// The owner leaves: the VM resumes after resume_after (5 s, a sample a second), still
	// capped, and the cap comes back one step per cap_recover_after.
	n := pipe.playUntil(t, 30*time.Second, "the vm resumed", 0, 3600, layerIs(h, id, yield.LayerCPUCap, 10))
	must.GreaterEq(t, 6, n, must.Sprint("a recovered paused vm resumes only after resume_after: 5 s after the first sample is the sixth"))
	vmIs(t, d, id, cgroups, 10, false)
	pipe.playUntil(t, 30*time.Second, "the cap lifted", 0, 3600, layerIs(h, id, yield.LayerIdleClass, 100))
	vmIs(t, d, id, cgroups, 100, false)
	// The idle class is not under test here, and this machine's other work (a simulator,
	// other test packages) would starve an idle-class guest: let it run normally.
	th, ok := d.tasks.Get(id)
	must.True(t, ok)
	must.NoError(t, th.machine.SetIdle(false))
	waitFor(t, b.timeout, "the guest ticking again", func() bool { o, _ := logs(); return strings.Count(o, "tick ") > ticks })

	must.NoError(t, os.WriteFile(filepath.Join(task.TaskDir().LocalDir, "go"), nil, 0o644))
	res := waitExit(t, h, id, b.timeout)
	must.Eq(t, 0, res.ExitCode, must.Sprintf("the command must succeed after two driver restarts, got %+v", res))
	waitFor(t, 5*time.Second, "the sum in the task log", func() bool { o, _ := logs(); return strings.Contains(o, wantSum) })
	out, _ = logs()
	must.Eq(t, 1, strings.Count(out, "ready\n"), must.Sprint("the command must have run once"))
	t.Logf("vm pid %s kept through two driver restarts; resumed on owner sample %d after they left; %d ticks in all",
		pid, n, strings.Count(out, "tick "))
}

// restartDriver shuts the driver down and starts a new one on the same state dir and
// hypervisor, with a fresh owner pipe, which recovers the task: the same VM, in layer with
// its CPU capped at capPercent, as InspectTask and a task event report.
func restartDriver(t *testing.T, b backend, hv Hypervisor, cfg *Config, h *dtestutil.DriverHarness, d *Driver,
	handle *drivers.TaskHandle, pid string, layer yield.Layer, capPercent int) (*dtestutil.DriverHarness, *Driver, *ownerPipe) {
	t.Helper()
	d.Shutdown()
	h.Kill()

	pipe := newOwnerPipe(t)
	next := *cfg
	next.Owner.ReplayFile = pipe.path
	h, d = newHarness(t, b, hv, &next)
	events := collectEvents(t, d)
	must.NoError(t, h.RecoverTask(handle))
	id := handle.Config.ID
	waitFor(t, 10*time.Second, "the recovered layer", layerIs(h, id, layer, capPercent))
	st, err := h.InspectTask(id)
	must.NoError(t, err)
	must.Eq(t, drivers.TaskStateRunning, st.State)
	must.Eq(t, pid, st.DriverAttributes["pid"], must.Sprint("the recovered task must be the same QEMU process"))
	waitFor(t, 10*time.Second, "the recovered event", func() bool { return events.has("recovered: " + layer.String()) })
	pipe.open()
	return h, d, pipe
}

// layerIs is a waitFor condition: InspectTask reports the task in layer with its CPU capped
// at capPercent.
func layerIs(h *dtestutil.DriverHarness, id string, layer yield.Layer, capPercent int) func() bool {
	return func() bool {
		st, err := h.InspectTask(id)
		return err == nil && st.DriverAttributes["layer"] == layer.String() &&
			st.DriverAttributes["cpu_cap_percent"] == strconv.Itoa(capPercent)
	}
}

// vmIs checks the real VM: its QEMU process alive, paused or running as QMP query-status
// says, and capped at capPercent as its cgroup's CFS quota says.
func vmIs(t *testing.T, d *Driver, id string, cgroups []string, capPercent int, paused bool) {
	t.Helper()
	th, ok := d.tasks.Get(id)
	must.True(t, ok, must.Sprintf("task %s is not in the driver", id))
	must.NoError(t, syscall.Kill(th.machine.PID(), 0), must.Sprintf("qemu pid %d must run", th.machine.PID()))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got, err := th.machine.Paused(ctx)
	must.NoError(t, err)
	must.Eq(t, paused, got, must.Sprint("paused, as QMP query-status reports it"))
	c, err := vm.CPUCap(cgroups, th.spec.CPUs)
	must.NoError(t, err)
	must.Eq(t, capPercent, c, must.Sprintf("cpu cap, as the cgroup's quota among %q holds it", cgroups))
}

// playUntil writes the owner at cpu percent with input idle for idle seconds, one sample (a
// second of trace time) at a time, until cond holds, and returns how many it wrote. One at
// a time, because the yield loop reads only the newest sample: a burst could go by unseen.
func (p *ownerPipe) playUntil(t *testing.T, timeout time.Duration, what string, cpu, idle float64, cond func() bool) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	n := 0
	for ; !cond(); n++ {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s (%d samples) waiting for %s", timeout, n, what)
		}
		p.play(1, cpu, idle)
		time.Sleep(20 * time.Millisecond)
	}
	return n
}

// withTaskCgroups gives task the cgroups Nomad would create before StartTask (on cgroup v1 a
// cpuset cgroup, under which the driver adds the others), so that the VM's cap lands in a
// real cgroup; it returns the cgroup dirs the VM joins. Call it before creating the
// hypervisor: cleanups run last first, so the VMs are gone when their cgroups are removed.
func withTaskCgroups(t *testing.T, task *drivers.TaskConfig) []string {
	t.Helper()
	mode := vm.DetectCgroupMode(cgroupRoot)
	name := "deskcloud-test-" + uuid.Short()
	var cpuset string
	switch mode {
	case vm.CgroupV1:
		cpuset = filepath.Join(cgroupRoot, "cpuset", name)
	case vm.CgroupV2:
		cpuset = filepath.Join(cgroupRoot, name)
	default:
		t.Skipf("the cpu cap needs a cgroup filesystem at %s", cgroupRoot)
	}
	task.Resources.LinuxResources = &drivers.LinuxResources{CpusetCgroupPath: cpuset}
	dirs := cgroupDirs(mode, task, true)
	var made []string // created here, removed deepest first
	for _, dir := range dirs {
		for p := dir; ; p = filepath.Dir(p) {
			if _, err := os.Stat(p); err == nil {
				break
			}
			made = append(made, p)
		}
	}
	t.Cleanup(func() {
		for _, dir := range made {
			removeCgroupDir(dir)
		}
	})
	must.NoError(t, os.Mkdir(cpuset, 0o755))
	if mode == vm.CgroupV1 {
		// A v1 cpuset cgroup takes no process before it has CPUs and memory nodes.
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			v, err := os.ReadFile(filepath.Join(filepath.Dir(cpuset), f))
			must.NoError(t, err)
			must.NoError(t, os.WriteFile(filepath.Join(cpuset, f), v, 0o644))
		}
	}
	return dirs
}

// removeCgroupDir removes a cgroup dir once the kernel has let go of the processes that were
// in it, which takes a moment after they exit.
func removeCgroupDir(dir string) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
