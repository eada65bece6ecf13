package deskvm

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestkit"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/hashicorp/nomad/helper/testlog"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	"github.com/shoenig/test/must"
)

// backend is one way to run the driver's VMs in tests: the fake, or real QEMU.
type backend struct {
	name string
	// hv is shared by every driver instance of a test, as VMs outlive drivers.
	newHV func(t *testing.T) Hypervisor
	probe func(context.Context, *Config) hostInfo
	// timeout bounds one scenario's waits: real VMs boot in seconds under TCG.
	timeout time.Duration
}

func fakeBackend() backend {
	return backend{
		name:  "fake",
		newHV: func(t *testing.T) Hypervisor { return newFakeHypervisor(t) },
		probe: func(context.Context, *Config) hostInfo {
			return hostInfo{probe: probeDone, accel: vm.AccelTCG, qemuVersion: "fake", kernel: "/fake/vmlinuz", initrd: "/fake/initrd"}
		},
		timeout: 20 * time.Second,
	}
}

// qemuBackend returns the real-QEMU backend, or skips the test with the reason the machine
// cannot run it.
func qemuBackend(t *testing.T) backend {
	t.Helper()
	if _, err := exec.LookPath(defaultQEMUBinary); err != nil {
		t.Skipf("real QEMU scenarios need %s on PATH (make deps installs it): %v", defaultQEMUBinary, err)
	}
	if os.Geteuid() != 0 {
		t.Skip("real QEMU scenarios write cgroups and /run/deskvm: they need root")
	}
	kernel, initrd := guestkit.KernelELF(), guestkit.Initrd()
	if !fileExists(kernel) || !fileExists(initrd) {
		t.Skipf("real QEMU scenarios need the guest kit at %s (make deps builds it)", filepath.Dir(kernel))
	}
	return backend{
		name:  "qemu",
		newHV: func(t *testing.T) Hypervisor { return newReapingHypervisor(t, qemuHypervisor{}) },
		probe: func(ctx context.Context, c *Config) hostInfo {
			// The accelerator probe has its own test; here TCG runs everywhere.
			v, _ := vm.QEMUVersion(ctx, c.QEMUBinary)
			return hostInfo{probe: probeDone, accel: vm.AccelTCG, qemuVersion: v, kernel: kernel, initrd: initrd}
		},
		timeout: 90 * time.Second,
	}
}

// reapingHypervisor kills every VM it launched or attached when the test ends, so a failed
// test leaves no QEMU behind.
type reapingHypervisor struct {
	Hypervisor
	mu       sync.Mutex
	machines []Machine
}

func newReapingHypervisor(t *testing.T, hv Hypervisor) *reapingHypervisor {
	r := &reapingHypervisor{Hypervisor: hv}
	t.Cleanup(func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, m := range r.machines {
			_ = m.Kill()
		}
	})
	return r
}

func (r *reapingHypervisor) keep(m Machine, err error) (Machine, error) {
	if err == nil {
		r.mu.Lock()
		r.machines = append(r.machines, m)
		r.mu.Unlock()
	}
	return m, err
}

func (r *reapingHypervisor) Launch(ctx context.Context, spec vm.Spec) (Machine, error) {
	return r.keep(r.Hypervisor.Launch(ctx, spec))
}

func (r *reapingHypervisor) Attach(ctx context.Context, spec vm.Spec, pid int) (Machine, error) {
	return r.keep(r.Hypervisor.Attach(ctx, spec, pid))
}

// backends returns the fake and, where the machine has QEMU and the guest kit, real QEMU.
func forEachBackend(t *testing.T, fn func(t *testing.T, b backend)) {
	t.Run("fake", func(t *testing.T) { fn(t, fakeBackend()) })
	t.Run("qemu", func(t *testing.T) { fn(t, qemuBackend(t)) })
}

// newHarness starts a driver on hv through Nomad's driver harness (a real gRPC round trip)
// and configures it.
func newHarness(t *testing.T, b backend, hv Hypervisor, cfg *Config) (*dtestutil.DriverHarness, *Driver) {
	t.Helper()
	d := newDriver(testlog.HCLogger(t), hv)
	d.probe = b.probe
	h := dtestutil.NewDriverHarness(t, d)
	if cfg == nil {
		cfg = testPluginConfig(t)
	}
	var data []byte
	must.NoError(t, base.MsgPackEncode(&data, cfg))
	must.NoError(t, h.SetConfig(&base.Config{PluginConfig: data}))
	waitFor(t, 30*time.Second, "the host probe", func() bool { return d.hostInfo().probe == probeDone })
	t.Cleanup(d.Shutdown)
	return h, d
}

// testPluginConfig is the spec's defaults with yield off and nothing sensed live: the
// "owner" would be whatever else this machine runs, and idle-class VMs starve beside the
// other test packages. Yield has its own tests (yield_test.go).
func testPluginConfig(t *testing.T) *Config {
	c := defaultConfig(t, `yield {
  enabled = false
}
owner {
  sources        = []
  forecast_state = ""
}`)
	c.StateDir = shortTempDir(t)
	c.CheckpointKeyFile = testKeyFile
	c.BootTimeout = "90s"
	c.ImagePaths = []string{filepath.Dir(guestkit.TestImage())}
	return c
}

// shortTempDir is a temp dir with a short path, for unix sockets.
func shortTempDir(t *testing.T) string {
	dir, err := os.MkdirTemp("/tmp", "dvm")
	must.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func newTask(t *testing.T, tc TaskConfig) *drivers.TaskConfig {
	t.Helper()
	allocID := uuid.Generate()
	task := &drivers.TaskConfig{
		AllocID: allocID,
		ID:      allocID + "/test/" + uuid.Short(),
		Name:    "test",
		Env:     map[string]string{"DESKVM_TEST": "hello-env"},
		Resources: &drivers.Resources{
			NomadResources: &structs.AllocatedTaskResources{
				Cpu:    structs.AllocatedCpuResources{CpuShares: 500},
				Memory: structs.AllocatedMemoryResources{MemoryMB: 256},
			},
		},
	}
	must.NoError(t, task.EncodeConcreteDriverConfig(&tc))
	return task
}

// start starts task on h with logs collected, and returns a function reading the task's
// stdout and stderr log files.
func start(t *testing.T, h *dtestutil.DriverHarness, task *drivers.TaskConfig) (*drivers.TaskHandle, func() (string, string)) {
	t.Helper()
	cleanup := h.MkAllocDir(task, true)
	t.Cleanup(cleanup)
	handle, _, err := h.StartTask(task)
	must.NoError(t, err)
	logs := func() (string, string) {
		dir := task.TaskDir().LogDir
		out, _ := os.ReadFile(filepath.Join(dir, task.Name+".stdout.0"))
		errb, _ := os.ReadFile(filepath.Join(dir, task.Name+".stderr.0"))
		return string(out), string(errb)
	}
	return handle, logs
}

func waitExit(t *testing.T, h *dtestutil.DriverHarness, taskID string, timeout time.Duration) *drivers.ExitResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	ch, err := h.WaitTask(ctx, taskID)
	must.NoError(t, err)
	select {
	case res := <-ch:
		must.NotNil(t, res, must.Sprint("wait channel closed without a result"))
		return res
	case <-ctx.Done():
		t.Fatalf("task %s did not exit within %s", taskID, timeout)
		return nil
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestDriver_CommandLifecycle(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		t.Run("exit code and logs", func(t *testing.T) {
			h, _ := newHarness(t, b, b.newHV(t), nil)
			task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", `echo out-$DESKVM_TEST; echo err-line >&2; exit 3`}})
			handle, logs := start(t, h, task)
			res := waitExit(t, h, handle.Config.ID, b.timeout)
			must.Eq(t, 3, res.ExitCode, must.Sprintf("want the guest command's exit code 3, got %+v", res))
			waitFor(t, 5*time.Second, "stdout in the task log", func() bool { o, _ := logs(); return strings.Contains(o, "out-hello-env") })
			// stderr is its own port and log: it may land a moment after stdout.
			waitFor(t, 5*time.Second, "stderr in the task log", func() bool { _, e := logs(); return strings.Contains(e, "err-line") })
			st, err := h.InspectTask(handle.Config.ID)
			must.NoError(t, err)
			must.Eq(t, drivers.TaskStateExited, st.State)
			must.NoError(t, h.DestroyTask(handle.Config.ID, false))
		})

		t.Run("script from the task dir", func(t *testing.T) {
			h, _ := newHarness(t, b, b.newHV(t), nil)
			task := newTask(t, TaskConfig{Command: "/local/run.sh", Args: []string{"7"}})
			cleanup := h.MkAllocDir(task, true)
			t.Cleanup(cleanup)
			script := "#!/bin/sh\necho \"args=$1\"\necho data > \"$NOMAD_ALLOC_DIR/data/out.txt\" 2>/dev/null || echo data > \"$(dirname \"$0\")/../alloc/data/out.txt\"\nexit 0\n"
			must.NoError(t, os.WriteFile(filepath.Join(task.TaskDir().LocalDir, "run.sh"), []byte(script), 0o755))
			handle, _, err := h.StartTask(task)
			must.NoError(t, err)
			res := waitExit(t, h, handle.Config.ID, b.timeout)
			must.Eq(t, 0, res.ExitCode, must.Sprintf("script failed: %+v", res))
			waitFor(t, 5*time.Second, "the script's output", func() bool {
				out, _ := os.ReadFile(filepath.Join(task.TaskDir().LogDir, "test.stdout.0"))
				return strings.Contains(string(out), "args=7")
			})
		})

		t.Run("command not found", func(t *testing.T) {
			h, _ := newHarness(t, b, b.newHV(t), nil)
			task := newTask(t, TaskConfig{Command: "/no/such/command"})
			handle, _ := start(t, h, task)
			res := waitExit(t, h, handle.Config.ID, b.timeout)
			must.Eq(t, 127, res.ExitCode, must.Sprintf("want 127 for a missing command, got %+v", res))
		})

		t.Run("stop sends SIGTERM to the guest command", func(t *testing.T) {
			h, _ := newHarness(t, b, b.newHV(t), nil)
			task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", `trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done`}})
			handle, logs := start(t, h, task)
			waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })
			must.NoError(t, h.StopTask(handle.Config.ID, 10*time.Second, "SIGTERM"))
			res := waitExit(t, h, handle.Config.ID, b.timeout)
			must.Eq(t, 7, res.ExitCode, must.Sprintf("want the trap's exit code 7, got %+v", res))
			waitFor(t, 5*time.Second, "the trap's output", func() bool { o, _ := logs(); return strings.Contains(o, "got-term") })
		})

		t.Run("stop kills after the timeout", func(t *testing.T) {
			h, _ := newHarness(t, b, b.newHV(t), nil)
			task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", `trap '' TERM; echo ready; while :; do sleep 0.1; done`}})
			handle, logs := start(t, h, task)
			waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })
			must.NoError(t, h.StopTask(handle.Config.ID, time.Second, "SIGTERM"))
			res := waitExit(t, h, handle.Config.ID, b.timeout)
			must.Eq(t, int(syscall.SIGKILL), res.Signal, must.Sprintf("want SIGKILL after kill_timeout, got %+v", res))
		})

		t.Run("signal and exec", func(t *testing.T) {
			h, _ := newHarness(t, b, b.newHV(t), nil)
			task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", `trap 'echo got-usr1' USR1; echo ready; while :; do sleep 0.1; done`}})
			handle, logs := start(t, h, task)
			waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })
			must.NoError(t, h.SignalTask(handle.Config.ID, "SIGUSR1"))
			waitFor(t, 10*time.Second, "the USR1 trap", func() bool { o, _ := logs(); return strings.Contains(o, "got-usr1") })
			res, err := h.ExecTask(handle.Config.ID, []string{"/bin/sh", "-c", "echo exec-$DESKVM_TEST; exit 2"}, 30*time.Second)
			must.NoError(t, err)
			must.Eq(t, 2, res.ExitResult.ExitCode)
			must.StrContains(t, string(res.Stdout), "exec-hello-env")
			must.NoError(t, h.StopTask(handle.Config.ID, time.Second, "SIGKILL"))
		})
	})
}

// TestDriver_Recover is Nomad's "loose task" test: a driver restart in the middle of a task,
// and again after the command ended while no driver was there to see it.
func TestDriver_Recover(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		hv := b.newHV(t)
		cfg := testPluginConfig(t)
		h1, d1 := newHarness(t, b, hv, cfg)
		task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", `echo before; while [ ! -e /local/go ] && [ ! -e "$GO_FILE" ]; do sleep 0.1; done; echo after; exit 4`}})
		task.Env["GO_FILE"] = filepath.Join(shortTempDir(t), "go")
		handle, logs := start(t, h1, task)
		waitFor(t, b.timeout, "the command to start", func() bool { o, _ := logs(); return strings.Contains(o, "before") })
		before, err := h1.InspectTask(handle.Config.ID)
		must.NoError(t, err)

		// The plugin goes away; the VM must not.
		d1.Shutdown()
		h1.Kill()

		// The command ends while no driver watches.
		must.NoError(t, os.WriteFile(filepath.Join(task.TaskDir().LocalDir, "go"), nil, 0o644))
		must.NoError(t, os.WriteFile(task.Env["GO_FILE"], nil, 0o644))

		h2, _ := newHarness(t, b, hv, cfg)
		must.NoError(t, h2.RecoverTask(handle))
		after, err := h2.InspectTask(handle.Config.ID)
		must.NoError(t, err)
		must.Eq(t, before.DriverAttributes, after.DriverAttributes, must.Sprint("recovered handle differs"))
		must.Eq(t, before.StartedAt.UnixNano(), after.StartedAt.UnixNano())

		res := waitExit(t, h2, handle.Config.ID, b.timeout)
		must.Eq(t, 4, res.ExitCode, must.Sprintf("the exit code must survive the restart, got %+v", res))
		waitFor(t, 5*time.Second, "output after the restart", func() bool { o, _ := logs(); return strings.Contains(o, "after") })
	})
}

func TestDriver_RecoverGoneVM(t *testing.T) {
	b := fakeBackend()
	hv := newFakeHypervisor(t)
	h, _ := newHarness(t, b, hv, nil)
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "sleep 30"}})
	handle, _ := start(t, h, task)
	for _, m := range hv.machines {
		must.NoError(t, m.Kill())
	}
	h2, _ := newHarness(t, b, hv, nil)
	err := h2.RecoverTask(handle)
	must.ErrorContains(t, err, "is gone")
}

func TestDriver_BootFailureFailsStart(t *testing.T) {
	t.Run("fake", func(t *testing.T) {
		b := fakeBackend()
		hv := newFakeHypervisor(t)
		hv.bootFailure = "guest kernel panic: Kernel panic - not syncing: VFS: Unable to mount root fs"
		h, _ := newHarness(t, b, hv, nil)
		task := newTask(t, TaskConfig{Command: "/bin/true"})
		t.Cleanup(h.MkAllocDir(task, false))
		_, _, err := h.StartTask(task)
		must.ErrorContains(t, err, "Kernel panic")
	})
	t.Run("qemu", func(t *testing.T) {
		b := qemuBackend(t)
		// An initrd that is not an archive: the kernel finds no init and panics.
		bad := filepath.Join(t.TempDir(), "bad-initrd")
		must.NoError(t, os.WriteFile(bad, []byte("not a cpio archive"), 0o644))
		realProbe := b.probe
		b.probe = func(ctx context.Context, c *Config) hostInfo {
			info := realProbe(ctx, c)
			info.initrd = bad
			return info
		}
		h, _ := newHarness(t, b, b.newHV(t), nil)
		task := newTask(t, TaskConfig{Command: "/bin/true"})
		t.Cleanup(h.MkAllocDir(task, false))
		start := time.Now()
		_, _, err := h.StartTask(task)
		must.ErrorContains(t, err, "Kernel panic")
		t.Logf("kernel panic reported after %s", time.Since(start).Round(time.Millisecond))
	})
}

func TestDriver_Fingerprint(t *testing.T) {
	b := fakeBackend()
	h, _ := newHarness(t, b, b.newHV(t), nil)
	ch, err := h.Fingerprint(t.Context())
	must.NoError(t, err)
	var fp *drivers.Fingerprint
	waitFor(t, 10*time.Second, "a healthy fingerprint", func() bool {
		select {
		case fp = <-ch:
			return fp.Health == drivers.HealthStateHealthy
		default:
			return false
		}
	})
	accel, _ := fp.Attributes["driver.deskvm.accelerator"].GetString()
	must.Eq(t, "tcg", accel)
	version, _ := fp.Attributes["driver.deskvm.version"].GetString()
	must.Eq(t, PluginVersion, version)
	must.NotNil(t, fp.Attributes["driver.deskvm.qemu_version"])
}

func TestDriver_TaskStats(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		h, _ := newHarness(t, b, b.newHV(t), nil)
		task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo ready; while :; do :; done"}})
		handle, logs := start(t, h, task)
		waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })
		ch, err := h.TaskStats(t.Context(), handle.Config.ID, 100*time.Millisecond)
		must.NoError(t, err)
		var samples int
		for u := range ch {
			must.Positive(t, u.ResourceUsage.MemoryStats.RSS, must.Sprint("the VM's resident memory"))
			must.False(t, math.IsNaN(u.ResourceUsage.CpuStats.TotalTicks), must.Sprint("ticks must be a number"))
			if samples++; samples == 3 {
				if b.name == "qemu" { // the fake's pid is the test process, not the busy command
					must.Positive(t, u.ResourceUsage.CpuStats.Percent, must.Sprint("a busy guest uses CPU"))
				}
				break
			}
		}
		must.Eq(t, 3, samples)
		must.NoError(t, h.StopTask(handle.Config.ID, time.Second, "SIGKILL"))
	})
}

func TestDriver_ImageMode(t *testing.T) {
	b := qemuBackend(t)
	image := guestkit.TestImage()
	if !fileExists(image) {
		t.Skipf("image mode needs the test image at %s (make deps builds it)", image)
	}
	before, err := os.ReadFile(image)
	must.NoError(t, err)
	t.Run("user data runs and the guest powers off", func(t *testing.T) {
		h, _ := newHarness(t, b, b.newHV(t), nil)
		task := newTask(t, TaskConfig{Image: image, UserData: "#!/bin/sh\necho image-marker-$((6*7))\n"})
		handle, logs := start(t, h, task)
		res := waitExit(t, h, handle.Config.ID, 3*b.timeout)
		must.Eq(t, 0, res.ExitCode, must.Sprintf("a guest that powers off ends the task with 0, got %+v", res))
		must.Nil(t, res.Err)
		waitFor(t, 5*time.Second, "the user data's output on the console", func() bool { o, _ := logs(); return strings.Contains(o, "image-marker-42") })
	})
	t.Run("stop kills a guest that ignores the power button", func(t *testing.T) {
		// The test image has no ACPI daemon, so the power-down request goes unheard and stop
		// must kill the VM after kill_timeout; a full OS would shut down cleanly instead.
		h, _ := newHarness(t, b, b.newHV(t), nil)
		task := newTask(t, TaskConfig{Image: image, UserData: "#!/bin/sh\necho waiting; sleep 600\n"})
		handle, logs := start(t, h, task)
		waitFor(t, 3*b.timeout, "the user data to run", func() bool { o, _ := logs(); return strings.Contains(o, "waiting") })
		must.NoError(t, h.StopTask(handle.Config.ID, 2*time.Second, ""))
		res := waitExit(t, h, handle.Config.ID, b.timeout)
		must.Eq(t, int(syscall.SIGKILL), res.Signal, must.Sprintf("want the VM killed after kill_timeout, got %+v", res))
		must.Nil(t, res.Err)
	})
	after, err := os.ReadFile(image)
	must.NoError(t, err)
	must.True(t, string(before) == string(after), must.Sprint("the base image must never be written"))
}

// TestDriver_QEMUCrashFailsTask kills QEMU under a running task: the task must fail with the
// cause, never hang.
func TestDriver_QEMUCrashFailsTask(t *testing.T) {
	b := qemuBackend(t)
	h, d := newHarness(t, b, b.newHV(t), nil)
	events, err := d.TaskEvents(t.Context())
	must.NoError(t, err)
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo ready; sleep 600"}})
	handle, logs := start(t, h, task)
	waitFor(t, b.timeout, "the command to be ready", func() bool { o, _ := logs(); return strings.Contains(o, "ready") })
	st, err := h.InspectTask(handle.Config.ID)
	must.NoError(t, err)
	pid, err := strconv.Atoi(st.DriverAttributes["pid"])
	must.NoError(t, err)
	must.NoError(t, syscall.Kill(pid, syscall.SIGSEGV))

	res := waitExit(t, h, handle.Config.ID, b.timeout)
	must.NotNil(t, res.Err, must.Sprintf("a crashed VM must fail the task, got %+v", res))
	must.StrContains(t, res.Err.Error(), "qemu was killed by a signal")
	waitFor(t, 10*time.Second, "a task event with the cause", func() bool {
		select {
		case ev := <-events:
			return ev.TaskID == handle.Config.ID && strings.Contains(ev.Message, "qemu was killed by a signal")
		default:
			return false
		}
	})
}

// TestRemoveOwnCgroups checks that destroying a task removes the cgroup v1 cpuacct dir the
// driver made for it, and no other.
func TestRemoveOwnCgroups(t *testing.T) {
	cpu := filepath.Join(cgroupRoot, "cpu", fmt.Sprintf("%sdeskcloud-test-%d", ownCPUPrefix, os.Getpid()))
	if err := os.Mkdir(cpu, 0o755); err == nil {
		t.Cleanup(func() { _ = os.Remove(cpu) })
		removeOwnCgroups([]string{cpu})
		_, err := os.Stat(cpu)
		must.True(t, os.IsNotExist(err), must.Sprintf("a yielding task's own cpu dir must be gone, stat says %v", err))
	}
	acct := filepath.Join(cgroupRoot, "cpuacct")
	if sameMount(filepath.Join(cgroupRoot, "cpu"), acct) {
		t.Skip("cpuacct is mounted with cpu here: Nomad removes it")
	}
	own := filepath.Join(acct, fmt.Sprintf("deskcloud-test-%d", os.Getpid()))
	if err := os.Mkdir(own, 0o755); err != nil {
		t.Skipf("no cgroup v1 cpuacct hierarchy to write to: %v", err)
	}
	t.Cleanup(func() { _ = os.Remove(own) })
	other := t.TempDir()
	removeOwnCgroups([]string{other, own})
	_, err := os.Stat(own)
	must.True(t, os.IsNotExist(err), must.Sprintf("the cpuacct dir must be gone, stat says %v", err))
	_, err = os.Stat(other)
	must.NoError(t, err, must.Sprint("dirs Nomad manages are left to Nomad"))
}

// TestCgroupDirs checks where a task's QEMU goes: on cgroup v1 a yielding task's cpu cgroup
// sits at the root of the cpu hierarchy, beside the owner's session, so that its cpu.idle
// counts against them; everything else stays Nomad's.
func TestCgroupDirs(t *testing.T) {
	task := &drivers.TaskConfig{AllocID: "a1", Name: "t", Resources: &drivers.Resources{
		LinuxResources: &drivers.LinuxResources{CpusetCgroupPath: "/sys/fs/cgroup/cpuset/nomad/shared"}}}
	cpuSame := sameMount(filepath.Join(cgroupRoot, "cpu"), filepath.Join(cgroupRoot, "cpuacct"))
	v1 := func(cpu string) []string {
		dirs := []string{"/sys/fs/cgroup/cpuset/nomad/shared", cpu}
		if !cpuSame {
			dirs = append(dirs, "/sys/fs/cgroup/cpuacct/nomad/a1.t")
		}
		return append(dirs, "/sys/fs/cgroup/memory/nomad/a1.t", "/sys/fs/cgroup/freezer/nomad/a1.t")
	}
	for _, tc := range []struct {
		name   string
		mode   vm.CgroupMode
		yields bool
		want   []string
	}{
		{"v1 yielding", vm.CgroupV1, true, v1("/sys/fs/cgroup/cpu/deskvm.a1.t")},
		{"v1 without yield", vm.CgroupV1, false, v1("/sys/fs/cgroup/cpu/nomad/a1.t")},
		{"v2", vm.CgroupV2, true, []string{"/sys/fs/cgroup/cpuset/nomad/shared"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, cgroupDirs(tc.mode, task, tc.yields))
		})
	}
	must.Nil(t, cgroupDirs(vm.CgroupV1, &drivers.TaskConfig{AllocID: "a1", Name: "t"}, true),
		must.Sprint("no cgroups without Nomad's cpuset path (a test harness)"))
}

// TestDriver_StartWaitsForProbe starts a task while the accelerator probe is still running,
// as a restarted agent may (its node still shows the driver healthy from before): the task
// waits for the probe instead of failing.
func TestDriver_StartWaitsForProbe(t *testing.T) {
	b := fakeBackend()
	release := make(chan struct{})
	probe := b.probe
	b.probe = func(ctx context.Context, c *Config) hostInfo {
		<-release
		return probe(ctx, c)
	}
	d := newDriver(testlog.HCLogger(t), b.newHV(t))
	d.probe = b.probe
	h := dtestutil.NewDriverHarness(t, d)
	var data []byte
	must.NoError(t, base.MsgPackEncode(&data, testPluginConfig(t)))
	must.NoError(t, h.SetConfig(&base.Config{PluginConfig: data}))
	t.Cleanup(d.Shutdown)
	must.Eq(t, probePending, d.hostInfo().probe)

	time.AfterFunc(300*time.Millisecond, func() { close(release) })
	task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "exit 4"}})
	cleanup := h.MkAllocDir(task, true)
	t.Cleanup(cleanup)
	handle, _, err := h.StartTask(task)
	must.NoError(t, err, must.Sprint("a task started during the probe must wait for it, not fail"))
	must.Eq(t, 4, waitExit(t, h, handle.Config.ID, 30*time.Second).ExitCode)
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir()
}
