package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/guestkit"
)

// testQEMU is the emulator the real-QEMU tests run.
const testQEMU = "qemu-system-x86_64"

// bootTimeout bounds a command-mode guest's boot under TCG on a busy 2-core machine.
const bootTimeout = 3 * time.Minute

// helperEnv makes the test binary act as a helper process (see TestHelperProcess).
const helperEnv = "DESKVM_VM_TEST_HELPER"

// TestHelperProcess is not a test: the tests and benchmarks run the test binary again as a
// child process that does one job, named by helperEnv.
func TestHelperProcess(t *testing.T) {
	job := os.Getenv(helperEnv)
	if job == "" {
		t.Skip("only runs as a helper process")
	}
	switch {
	case job == "threads":
		// Several OS threads that block forever, like a VM's vCPU threads.
		for range 4 {
			go func() {
				runtime.LockOSThread()
				select {}
			}()
		}
		select {}
	case strings.HasPrefix(job, "spin="):
		// A fixed amount of CPU work: the owner's workload in the benchmarks.
		// It starts when its stdin gives a byte, so that the parent can first move it
		// into a cgroup.
		n, _ := strconv.ParseInt(strings.TrimPrefix(job, "spin="), 10, 64)
		_, _ = os.Stdin.Read(make([]byte, 1))
		fmt.Println(spin(n))
		os.Exit(0)
	}
	os.Exit(2)
}

// spin does n rounds of integer work the compiler cannot drop.
func spin(n int64) uint64 {
	x := uint64(88172645463325252)
	for range n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
	}
	return x
}

// startHelper runs the test binary as a helper doing job and kills it at cleanup.
func startHelper(t *testing.T, job string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), helperEnv+"="+job)
	must.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

// waitFor polls cond until it holds, or fails the test after timeout.
func waitFor(tb testing.TB, ctx context.Context, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			tb.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

func threadCount(pid int) int {
	ents, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	return len(ents)
}

// threadPolicies maps each thread's name to its scheduling policy.
func threadPolicies(tb testing.TB, pid int) map[string]uint32 {
	tb.Helper()
	ents, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	must.NoError(tb, err)
	out := make(map[string]uint32)
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		comm, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "task", e.Name(), "comm"))
		if err != nil {
			continue
		}
		attr, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			continue
		}
		out[fmt.Sprintf("%s[%d]", strings.TrimSpace(string(comm)), tid)] = attr.Policy
	}
	return out
}

func TestSetIdleClass(t *testing.T) {
	cmd := startHelper(t, "threads")
	pid := cmd.Process.Pid
	waitFor(t, t.Context(), 10*time.Second, "the helper's threads", func() bool { return threadCount(pid) >= 5 })

	idle, err := IdleClass(pid)
	must.NoError(t, err)
	must.False(t, idle, must.Sprint("a new process runs in the normal class"))

	for i := range 2 { // again: re-running is safe
		must.NoError(t, SetIdleClass(pid), must.Sprintf("run %d", i+1))
		for name, policy := range threadPolicies(t, pid) {
			must.Eq(t, unix.SCHED_IDLE, policy, must.Sprintf("thread %s policy", name))
		}
		idle, err := IdleClass(pid)
		must.NoError(t, err)
		must.True(t, idle)
	}

	must.NoError(t, setNice(pid, 19))
	for name, policy := range threadPolicies(t, pid) {
		must.Eq(t, unix.SCHED_NORMAL, policy, must.Sprintf("thread %s policy after setNice", name))
	}
}

func TestSetIdleClassErrors(t *testing.T) {
	gone := exec.Command("true")
	must.NoError(t, gone.Run())
	for _, tc := range []struct {
		name string
		pid  int
		want string
	}{
		{name: "invalid pid", pid: 0, want: "invalid pid 0"},
		{name: "exited process", pid: gone.Process.Pid, want: "list threads"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := SetIdleClass(tc.pid)
			must.ErrorContains(t, err, tc.want)
		})
	}
}

// fakeCgroup creates a directory with the cpu files of one cgroup version, as the kernel
// shows them for a new cgroup.
func fakeCgroup(t *testing.T, version int) string {
	dir := t.TempDir()
	files := map[string]string{"cpu.max": "max 100000\n", "cpu.idle": "0\n", "cpu.stat": "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n"}
	if version == 1 {
		files = map[string]string{"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n", "cpuacct.usage": "987654321\n"}
	}
	for f, v := range files {
		must.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte(v), 0o644))
	}
	return dir
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func TestSetCPUCapFiles(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
		percent int
		vcpus   int
		files   map[string]string
	}{
		{name: "v2 quarter of two vcpus", version: 2, percent: 25, vcpus: 2, files: map[string]string{"cpu.max": "10000 20000"}},
		{name: "v2 no cap", version: 2, percent: 100, vcpus: 4, files: map[string]string{"cpu.max": "max 20000"}},
		{name: "v2 smallest quota", version: 2, percent: 5, vcpus: 1, files: map[string]string{"cpu.max": "1000 20000"}},
		{name: "v1 ten percent of four vcpus", version: 1, percent: 10, vcpus: 4, files: map[string]string{"cpu.cfs_quota_us": "8000", "cpu.cfs_period_us": "20000"}},
		{name: "v1 no cap", version: 1, percent: 100, vcpus: 1, files: map[string]string{"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "20000"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeCgroup(t, tc.version)
			other := t.TempDir() // a cpuset or memory dir: skipped
			must.NoError(t, SetCPUCap([]string{other, dir}, tc.percent, tc.vcpus))
			for f, want := range tc.files {
				must.Eq(t, want, readTrim(t, filepath.Join(dir, f)), must.Sprintf("%s after a cap of %d%% of %d vcpus", f, tc.percent, tc.vcpus))
			}
			got, err := CPUCap([]string{other, dir}, tc.vcpus)
			must.NoError(t, err)
			must.Eq(t, tc.percent, got, must.Sprint("cap read back"))
		})
	}
}

func TestSetCPUCapErrors(t *testing.T) {
	v2 := fakeCgroup(t, 2)
	for _, tc := range []struct {
		name    string
		dirs    []string
		percent int
		vcpus   int
		want    string
	}{
		{name: "zero percent", dirs: []string{v2}, percent: 0, vcpus: 1, want: "1 to 100 percent, got 0"},
		{name: "over 100 percent", dirs: []string{v2}, percent: 150, vcpus: 1, want: "1 to 100 percent, got 150"},
		{name: "no vcpus", dirs: []string{v2}, percent: 50, vcpus: 0, want: "at least one vcpu, got 0"},
		{name: "no cpu controller", dirs: []string{t.TempDir()}, percent: 50, vcpus: 1, want: "no cgroup with the cpu controller"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			must.ErrorContains(t, SetCPUCap(tc.dirs, tc.percent, tc.vcpus), tc.want)
		})
	}
}

func TestCPUCapParse(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cpuMax string
		vcpus  int
		want   int
		err    string
	}{
		{name: "no cap", cpuMax: "max 100000", vcpus: 2, want: 100},
		{name: "half of one", cpuMax: "50000 100000", vcpus: 1, want: 50},
		{name: "other period", cpuMax: "5000 20000", vcpus: 2, want: 13}, // 12.5% rounds up
		{name: "above the vcpus", cpuMax: "400000 100000", vcpus: 2, want: 100},
		{name: "garbage", cpuMax: "lots", vcpus: 1, err: "want \"$MAX $PERIOD\""},
		{name: "bad quota", cpuMax: "x 100000", vcpus: 1, err: "bad quota"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeCgroup(t, 2)
			must.NoError(t, os.WriteFile(filepath.Join(dir, "cpu.max"), []byte(tc.cpuMax+"\n"), 0o644))
			got, err := CPUCap([]string{dir}, tc.vcpus)
			if tc.err != "" {
				must.ErrorContains(t, err, tc.err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

func TestCPUUsageFiles(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
		want    time.Duration
	}{
		{name: "v1 cpuacct.usage", version: 1, want: 987654321 * time.Nanosecond},
		{name: "v2 cpu.stat", version: 2, want: 1234567 * time.Microsecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CPUUsage([]string{t.TempDir(), fakeCgroup(t, tc.version)})
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
	_, err := CPUUsage([]string{t.TempDir()})
	must.ErrorContains(t, err, "no cgroup with cpu accounting")
}

func TestCPUDir(t *testing.T) {
	v1, v2, other := fakeCgroup(t, 1), fakeCgroup(t, 2), t.TempDir()
	for _, tc := range []struct {
		name string
		dirs []string
		want string
	}{
		{name: "v1 after cpuset", dirs: []string{other, v1}, want: v1},
		{name: "v2", dirs: []string{v2}, want: v2},
		{name: "none", dirs: []string{other}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CPUDir(tc.dirs)
			if tc.want == "" {
				must.ErrorContains(t, err, "no cgroup with the cpu controller")
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

func TestSetCgroupIdleFiles(t *testing.T) {
	dir := fakeCgroup(t, 2)
	idle, err := CgroupIdle(dir)
	must.NoError(t, err)
	must.False(t, idle)
	must.NoError(t, SetCgroupIdle(dir))
	idle, err = CgroupIdle(dir)
	must.NoError(t, err)
	must.True(t, idle)

	err = SetCgroupIdle(filepath.Join(t.TempDir(), "missing"))
	must.ErrorIs(t, err, os.ErrNotExist)
	must.ErrorContains(t, err, "no cpu.idle")
}

func TestUsedFromStats(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stats map[string]int64
		want  int
		ok    bool
	}{
		{name: "reported", stats: map[string]int64{"stat-total-memory": 512 << 20, "stat-available-memory": 400 << 20}, want: 112, ok: true},
		{name: "not sent", stats: map[string]int64{"stat-total-memory": -1, "stat-available-memory": -1}},
		{name: "none", stats: nil},
		{name: "available above total", stats: map[string]int64{"stat-total-memory": 1 << 20, "stat-available-memory": 2 << 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := usedFromStats(tc.stats)
			must.Eq(t, tc.ok, ok)
			must.Eq(t, tc.want, got)
		})
	}
}

// testCgroups creates v1 cpu and cpuacct cgroups for one test VM and removes them at
// cleanup, or skips when the host has no v1 cpu hierarchy.
func testCgroups(tb testing.TB) []string {
	tb.Helper()
	if DetectCgroupMode("/sys/fs/cgroup") != CgroupV1 {
		tb.Skip("the real-cgroup tests need the cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu")
	}
	name := fmt.Sprintf("deskcloud-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	var dirs []string
	for _, ctrl := range []string{"cpu", "cpuacct"} {
		if ctrl == "cpuacct" && sameFile("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct") {
			continue
		}
		dir := filepath.Join("/sys/fs/cgroup", ctrl, name)
		must.NoError(tb, os.Mkdir(dir, 0o755))
		dirs = append(dirs, dir)
	}
	tb.Cleanup(func() {
		// The VMs in them were killed by cleanups registered later, which ran first.
		for _, d := range dirs {
			removeCgroup(d)
		}
	})
	return dirs
}

// removeCgroup removes a cgroup dir once the kernel has let go of the processes that were in
// it, which takes a moment after they exit.
func removeCgroup(dir string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for os.Remove(dir) != nil {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func sameFile(a, b string) bool {
	ra, errA := filepath.EvalSymlinks(a)
	rb, errB := filepath.EvalSymlinks(b)
	return errA == nil && errB == nil && ra == rb
}

// requireQEMU skips the test unless QEMU, the guest kit and root are there.
func requireQEMU(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath(testQEMU); err != nil {
		tb.Skipf("real QEMU tests need %s on PATH (make deps installs it): %v", testQEMU, err)
	}
	if err := guestkit.Check(); err != nil {
		tb.Skipf("real QEMU tests need the guest kit (make deps builds it): %v", err)
	}
	if os.Geteuid() != 0 {
		tb.Skip("real QEMU tests write cgroups and set other processes' scheduling: they need root")
	}
}

// testSpec is a command-mode VM for the real-QEMU tests under TCG.
func testSpec(tb testing.TB, name string, cpus, memMiB int) Spec {
	tb.Helper()
	// Unix socket paths must stay short, so not under t.TempDir.
	dir, err := os.MkdirTemp("/tmp", "dvm")
	must.NoError(tb, err)
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return Spec{
		Name:        name,
		StateDir:    filepath.Join(dir, "state"),
		SocketDir:   filepath.Join(dir, "s"),
		QEMUBinary:  testQEMU,
		Accelerator: AccelTCG,
		CPUs:        cpus,
		MemoryMiB:   memMiB,
		Kernel:      guestkit.KernelELF(),
		Initrd:      guestkit.Initrd(),
		Append:      CommandAppend,
		Stdout:      filepath.Join(dir, "stdout"),
		Stderr:      filepath.Join(dir, "stderr"),
	}
}

// startTestVM starts spec and kills the VM at cleanup, showing QEMU's log and the console
// if the test failed.
func startTestVM(tb testing.TB, ctx context.Context, spec Spec) *Machine {
	tb.Helper()
	m, err := Start(ctx, spec)
	must.NoError(tb, err)
	tb.Cleanup(func() { stopTestVM(tb, m) })
	return m
}

func stopTestVM(tb testing.TB, m *Machine) {
	// A starved QEMU takes long to die: it needs CPU to exit.
	for _, d := range m.Spec().CgroupDirs {
		_ = os.WriteFile(filepath.Join(d, "cpu.idle"), []byte("0"), 0o644)
	}
	_ = setNice(m.PID(), 0)
	_ = m.Kill()
	<-m.Done()
	_ = m.Close()
	if tb.Failed() {
		tb.Logf("vm %s: qemu log: %s; console: %s", m.Spec().Name, m.LogTail(10), m.ConsoleTail(20))
	}
}

// startCommand dials the guest agent and starts a shell command; the client is closed at
// cleanup.
func startCommand(tb testing.TB, ctx context.Context, m *Machine, script string, mounts ...guestctl.Mount) *guestctl.Client {
	tb.Helper()
	dctx, cancel := context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	spec := m.Spec()
	c, err := guestctl.Dial(dctx, spec.ControlSocket())
	must.NoError(tb, err, must.Sprintf("dial the guest agent; console: %s", m.ConsoleTail(10)))
	tb.Cleanup(func() { c.Close() })
	must.NoError(tb, c.Start(ctx, guestctl.Spec{TaskID: "task-1", Command: "/bin/sh", Args: []string{"-c", script}, Mounts: mounts}))
	st, err := c.Status(ctx)
	must.NoError(tb, err)
	must.Eq(tb, guestctl.StateRunning, st.State, must.Sprintf("command state; error %q", st.Error))
	return c
}

func TestYieldQEMU(t *testing.T) {
	requireQEMU(t)
	ctx := t.Context()
	cgroups := testCgroups(t)
	spec := testSpec(t, "yield-test", 2, 512)
	spec.CgroupDirs = cgroups
	m := startTestVM(t, ctx, spec)
	mon, err := m.Monitor()
	must.NoError(t, err)
	// Boot at normal priority: a guest kernel starved while it boots fails its timer
	// check and panics ("IO-APIC + timer doesn't work") on a busy host. The balloon needs
	// the guest's virtio_balloon driver, which the agent loads before it answers.
	startCommand(t, ctx, m, "while :; do sleep 1; done")

	t.Run("idle class on every thread", func(t *testing.T) {
		must.NoError(t, SetIdleClass(m.PID()))
		pol := threadPolicies(t, m.PID())
		vcpus := 0
		for name, p := range pol {
			must.Eq(t, unix.SCHED_IDLE, p, must.Sprintf("qemu thread %s policy", name))
			if strings.HasPrefix(name, "CPU ") {
				vcpus++
			}
		}
		must.Eq(t, 2, vcpus, must.Sprintf("vcpu threads among %v", pol))

		// Back to normal: the balloon below needs the guest to get CPU on a busy host.
		must.NoError(t, SetNormalClass(m.PID()))
		for name, p := range threadPolicies(t, m.PID()) {
			must.Eq(t, unix.SCHED_NORMAL, p, must.Sprintf("qemu thread %s policy after SetNormalClass", name))
		}
	})

	t.Run("cgroup idle", func(t *testing.T) {
		for _, want := range []bool{true, false} {
			set := SetCgroupIdle
			if !want {
				set = ClearCgroupIdle
			}
			must.NoError(t, set(cgroups[0]))
			idle, err := CgroupIdle(cgroups[0])
			must.NoError(t, err)
			must.Eq(t, want, idle)
		}
	})

	t.Run("cpu cap", func(t *testing.T) {
		for _, pct := range []int{50, 10, 100, 25} {
			must.NoError(t, SetCPUCap(cgroups, pct, 2))
			got, err := CPUCap(cgroups, 2)
			must.NoError(t, err)
			must.Eq(t, pct, got, must.Sprint("cap read back from the kernel"))
		}
		must.Eq(t, "10000", readTrim(t, filepath.Join(cgroups[0], "cpu.cfs_quota_us")))
		must.NoError(t, SetCPUCap(cgroups, 100, 2))
		used, err := CPUUsage(cgroups)
		must.NoError(t, err)
		must.Positive(t, used, must.Sprint("cpu time of the booting vm"))
	})

	t.Run("balloon", func(t *testing.T) {
		actual, err := m.Balloon(ctx)
		must.NoError(t, err)
		must.Eq(t, 512, actual)
		must.NoError(t, m.SetBalloon(ctx, 256))
		waitFor(t, ctx, time.Minute, "the guest to hand back 256 MiB", func() bool {
			a, err := m.Balloon(ctx)
			return err == nil && a <= 256
		})
		must.NoError(t, m.SetBalloon(ctx, 512))
		waitFor(t, ctx, time.Minute, "the guest to take its memory back", func() bool {
			a, err := m.Balloon(ctx)
			return err == nil && a == 512
		})
		must.ErrorContains(t, m.SetBalloon(ctx, 0), "must be positive")
	})

	t.Run("guest memory", func(t *testing.T) {
		var used int
		waitFor(t, ctx, time.Minute, "guest memory statistics", func() bool {
			var err error
			used, err = m.GuestMemory(ctx)
			if err != nil && !errors.Is(err, ErrNoGuestStats) {
				t.Fatalf("guest memory: %v", err)
			}
			return err == nil
		})
		must.Between(t, 1, used, 512, must.Sprint("guest used MiB"))
	})

	t.Run("pause and resume", func(t *testing.T) {
		for _, step := range []struct {
			name string
			do   func(context.Context) error
			want string
		}{
			{"pause", m.Pause, "paused"},
			{"pause again", m.Pause, "paused"},
			{"resume", m.Resume, "running"},
			{"resume again", m.Resume, "running"},
		} {
			must.NoError(t, step.do(ctx), must.Sprint(step.name))
			st, err := mon.RunState(ctx)
			must.NoError(t, err)
			must.Eq(t, step.want, st, must.Sprintf("run state after %s", step.name))
		}
	})
}
