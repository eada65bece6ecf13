package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The primitives in this file apply the yield layers (docs/yield.md) to a running VM: the
// idle scheduling class and the CPU cap through the kernel, the balloon and the pause
// through QMP. They decide nothing; internal/yield does.

// CPUCapPeriod is the CFS bandwidth period of the CPU cap. A new cap takes hold within
// about one period, so the period bounds the cap's reaction (BenchmarkYieldCPU/cap-reaction:
// with the kernel's default of 100 ms the VM was held to its cap after p50 114-116 ms; with
// 20 ms after p50 25-27 ms). 20 ms costs five times the throttling events of 100 ms, which
// is nothing beside a VM's own timer interrupts, and keeps quotas for caps of 5 % of one vCPU
// and up above the kernel's 1 ms minimum (smaller caps are held at that minimum).
const CPUCapPeriod = 20 * time.Millisecond

// minCPUQuota is the smallest quota the kernel accepts for a CFS period.
const minCPUQuota = time.Millisecond

// maxThreadPasses bounds how often forEachThread walks a process's threads while
// new ones keep appearing.
const maxThreadPasses = 8

// SetIdleClass puts every thread of process pid (its main thread, vCPU threads, I/O and
// worker threads) in the SCHED_IDLE class. Threads created afterwards inherit the class from
// the thread that creates them. It is safe to run again, e.g. after a driver restart or to
// catch threads QEMU started since; a thread that exits meanwhile is no error.
//
// The class orders threads within their cgroup only. A QEMU in a cgroup of its own (as
// Nomad places every task) competes with the owner's cgroups at its cgroup's full weight,
// whatever its threads' class: SetCgroupIdle on that cgroup is what makes the owner's
// threads run first (BenchmarkYieldCPU/owner-slowdown: 1.3x owner slowdown with
// SetIdleClass alone, as with nice 19 or no change at all; 0.98x with both).
//
// An idle VM gets no CPU at all while the host is busy, so apply the idle class once the
// guest has booted (its agent answers): a guest kernel starved while it boots can fail its
// timer check and panic ("IO-APIC + timer doesn't work!").
func SetIdleClass(pid int) error {
	err := forEachThread(pid, func(tid int) error {
		attr := unix.SchedAttr{Policy: unix.SCHED_IDLE}
		return unix.SchedSetAttr(tid, &attr, 0)
	})
	if err != nil {
		return fmt.Errorf("set idle class of pid %d: %w", pid, err)
	}
	return nil
}

// SetNormalClass puts every thread of process pid back in the normal class at nice 0,
// undoing SetIdleClass: a VM whose guest must get work done now (inflate its balloon, save
// its state) gets CPU even while the owner is busy.
func SetNormalClass(pid int) error {
	return setNice(pid, 0)
}

// IdleClass reports whether every thread of process pid runs in the SCHED_IDLE class.
func IdleClass(pid int) (bool, error) {
	all := true
	err := forEachThread(pid, func(tid int) error {
		attr, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			return err
		}
		if attr.Policy != unix.SCHED_IDLE {
			all = false
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("read scheduling class of pid %d: %w", pid, err)
	}
	return all, nil
}

// setNice gives every thread of process pid the normal class at nice value nice (as renice
// does for a whole process); the benchmarks compare SCHED_IDLE with it.
func setNice(pid, nice int) error {
	err := forEachThread(pid, func(tid int) error {
		attr := unix.SchedAttr{Policy: unix.SCHED_NORMAL, Nice: int32(nice)}
		return unix.SchedSetAttr(tid, &attr, 0)
	})
	if err != nil {
		return fmt.Errorf("set nice %d on pid %d: %w", nice, pid, err)
	}
	return nil
}

// forEachThread calls fn once for every thread of pid, walking /proc/pid/task again until a
// walk finds no thread it has not seen, so that threads created during a walk are not
// missed. Threads that exit before fn reaches them are skipped.
func forEachThread(pid int, fn func(tid int) error) error {
	if pid <= 0 {
		return fmt.Errorf("invalid pid %d", pid)
	}
	taskDir := filepath.Join("/proc", strconv.Itoa(pid), "task")
	done := make(map[int]bool)
	for pass := 0; pass < maxThreadPasses; pass++ {
		ents, err := os.ReadDir(taskDir)
		if err != nil {
			return fmt.Errorf("list threads: %w", err)
		}
		fresh := 0
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			fresh++
			done[tid] = true
			if err := fn(tid); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("thread %d: %w", tid, err)
			}
		}
		if fresh == 0 {
			return nil
		}
	}
	return fmt.Errorf("threads kept appearing after %d passes", maxThreadPasses)
}

// SetCgroupIdle marks the cgroup dir idle (cpu.idle = 1): the group as a whole then competes
// for CPU like a SCHED_IDLE thread against its siblings, which is what makes an idle-class
// VM in its own cgroup yield to the owner (see SetIdleClass). dir must have the cpu
// controller (see CPUDir); the file exists from Linux 5.15, on cgroup v2 and on the v1 cpu
// hierarchy alike.
func SetCgroupIdle(dir string) error {
	p := filepath.Join(dir, "cpu.idle")
	if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("set cgroup %s idle: no cpu.idle (needs the cpu controller and linux 5.15 or later): %w", dir, err)
		}
		return fmt.Errorf("set cgroup %s idle: %w", dir, err)
	}
	return nil
}

// ClearCgroupIdle undoes SetCgroupIdle (cpu.idle = 0).
func ClearCgroupIdle(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, "cpu.idle"), []byte("0"), 0o644); err != nil {
		return fmt.Errorf("clear cgroup %s idle: %w", dir, err)
	}
	return nil
}

// CgroupIdle reports whether the cgroup dir is marked idle (cpu.idle = 1).
func CgroupIdle(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.idle"))
	if err != nil {
		return false, fmt.Errorf("read cgroup %s idle: %w", dir, err)
	}
	return strings.TrimSpace(string(b)) == "1", nil
}

// SetCPUCap caps the VM's CPU with a hard CFS quota on every cgroup dir in dirs that has the
// cpu controller (cgroup v2 cpu.max, v1 cpu.cfs_quota_us); other dirs (cpuset, memory,
// freezer) are skipped. percent is of the VM's vcpus: 100 is vcpus whole cores, which is no
// cap at all, and lifts any cap set before.
func SetCPUCap(dirs []string, percent, vcpus int) error {
	return setCPUCap(dirs, percent, vcpus, CPUCapPeriod)
}

func setCPUCap(dirs []string, percent, vcpus int, period time.Duration) error {
	if percent < 1 || percent > 100 {
		return fmt.Errorf("cpu cap must be 1 to 100 percent, got %d", percent)
	}
	if vcpus < 1 {
		return fmt.Errorf("cpu cap needs at least one vcpu, got %d", vcpus)
	}
	quota := time.Duration(-1)
	if percent < 100 {
		quota = max(period*time.Duration(percent*vcpus)/100, minCPUQuota)
	}
	var errs []error
	found := false
	for _, dir := range dirs {
		switch cpuFiles(dir) {
		case cpuV2:
			found = true
			errs = append(errs, writeCgroup(dir, "cpu.max", formatCPUMax(quota, period)))
		case cpuV1:
			found = true
			// Lift the quota before changing the period: the kernel checks each write
			// against the other value and the parent's limits.
			errs = append(errs,
				writeCgroup(dir, "cpu.cfs_quota_us", "-1"),
				writeCgroup(dir, "cpu.cfs_period_us", strconv.FormatInt(period.Microseconds(), 10)))
			if quota > 0 {
				errs = append(errs, writeCgroup(dir, "cpu.cfs_quota_us", strconv.FormatInt(quota.Microseconds(), 10)))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("set cpu cap %d%%: %w", percent, err)
	}
	if !found {
		return fmt.Errorf("set cpu cap %d%%: no cgroup with the cpu controller among %q", percent, dirs)
	}
	return nil
}

// CPUCap reads back the cap that SetCPUCap set on the first dir in dirs with the cpu
// controller, as a percentage of vcpus: 100 when there is none (or it exceeds the vcpus).
// The driver uses it to carry on from a VM's cap after a restart.
func CPUCap(dirs []string, vcpus int) (int, error) {
	if vcpus < 1 {
		return 0, fmt.Errorf("read cpu cap: need at least one vcpu, got %d", vcpus)
	}
	for _, dir := range dirs {
		var quota, period time.Duration
		var err error
		switch cpuFiles(dir) {
		case cpuV2:
			quota, period, err = readCPUMax(dir)
		case cpuV1:
			quota, period, err = readCFS(dir)
		default:
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read cpu cap: %w", err)
		}
		if quota < 0 || period <= 0 {
			return 100, nil
		}
		// Round to the nearest percent: SetCPUCap's quota is whole microseconds.
		pct := int((100*quota + time.Duration(vcpus)*period/2) / (time.Duration(vcpus) * period))
		return min(max(pct, 1), 100), nil
	}
	return 0, fmt.Errorf("read cpu cap: no cgroup with the cpu controller among %q", dirs)
}

// CPUUsage is the CPU time the processes in the first dir of dirs with CPU accounting have
// used since the cgroup was created (v1 cpuacct.usage, v2 cpu.stat usage_usec).
func CPUUsage(dirs []string) (time.Duration, error) {
	for _, dir := range dirs {
		if b, err := os.ReadFile(filepath.Join(dir, "cpuacct.usage")); err == nil {
			ns, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("read cpu usage of %s: %w", dir, err)
			}
			return time.Duration(ns), nil
		}
		b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "usage_usec "); ok {
				us, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return 0, fmt.Errorf("read cpu usage of %s: %w", dir, err)
				}
				return time.Duration(us) * time.Microsecond, nil
			}
		}
	}
	return 0, fmt.Errorf("read cpu usage: no cgroup with cpu accounting among %q", dirs)
}

// CPUDir returns the first dir in dirs with the cpu controller: the one to give SetCgroupIdle
// among a task's cgroup dirs (on cgroup v1 also cpuset, memory, freezer...).
func CPUDir(dirs []string) (string, error) {
	for _, d := range dirs {
		if cpuFiles(d) != cpuNone {
			return d, nil
		}
	}
	return "", fmt.Errorf("no cgroup with the cpu controller among %q", dirs)
}

type cpuController int

const (
	cpuNone cpuController = iota
	cpuV1
	cpuV2
)

// cpuFiles tells which cpu controller interface dir offers.
func cpuFiles(dir string) cpuController {
	if _, err := os.Stat(filepath.Join(dir, "cpu.max")); err == nil {
		return cpuV2
	}
	if _, err := os.Stat(filepath.Join(dir, "cpu.cfs_quota_us")); err == nil {
		return cpuV1
	}
	return cpuNone
}

// formatCPUMax is cpu.max's "$MAX $PERIOD" in microseconds, "max" for no quota.
func formatCPUMax(quota, period time.Duration) string {
	q := "max"
	if quota > 0 {
		q = strconv.FormatInt(quota.Microseconds(), 10)
	}
	return q + " " + strconv.FormatInt(period.Microseconds(), 10)
}

// parseCPUMax parses cpu.max; a quota of -1 means none.
func parseCPUMax(s string) (quota, period time.Duration, err error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("cpu.max %q: want \"$MAX $PERIOD\"", s)
	}
	p, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("cpu.max %q: bad period: %w", s, err)
	}
	if f[0] == "max" {
		return -1, time.Duration(p) * time.Microsecond, nil
	}
	q, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("cpu.max %q: bad quota: %w", s, err)
	}
	return time.Duration(q) * time.Microsecond, time.Duration(p) * time.Microsecond, nil
}

func readCPUMax(dir string) (quota, period time.Duration, err error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.max"))
	if err != nil {
		return 0, 0, err
	}
	quota, period, err = parseCPUMax(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", dir, err)
	}
	return quota, period, nil
}

func readCFS(dir string) (quota, period time.Duration, err error) {
	var v [2]int64
	for i, f := range []string{"cpu.cfs_quota_us", "cpu.cfs_period_us"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return 0, 0, err
		}
		v[i], err = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s/%s: %w", dir, f, err)
		}
	}
	if v[0] < 0 {
		return -1, time.Duration(v[1]) * time.Microsecond, nil
	}
	return time.Duration(v[0]) * time.Microsecond, time.Duration(v[1]) * time.Microsecond, nil
}

func writeCgroup(dir, file, value string) error {
	p := filepath.Join(dir, file)
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("write %q to %s: %w", value, p, err)
	}
	return nil
}

// SetBalloon asks the guest to shrink (or grow back) to targetMiB of memory through the
// virtio-balloon device. It returns at once; the guest gets there at its own pace, which
// Balloon shows. A guest without the virtio_balloon driver never moves.
func (m *Machine) SetBalloon(ctx context.Context, targetMiB int) error {
	if targetMiB < 1 {
		return fmt.Errorf("vm %s: balloon target must be positive, got %d MiB", m.spec.Name, targetMiB)
	}
	mon, err := m.Monitor()
	if err != nil {
		return err
	}
	if err := mon.Execute(ctx, "balloon", map[string]any{"value": int64(targetMiB) << 20}, nil); err != nil {
		return fmt.Errorf("vm %s: set balloon to %d MiB: %w", m.spec.Name, targetMiB, err)
	}
	return nil
}

// Balloon returns the guest's memory now, as the balloon reports it (query-balloon
// "actual"): the boot memory less what the guest has handed back.
func (m *Machine) Balloon(ctx context.Context) (int, error) {
	mon, err := m.Monitor()
	if err != nil {
		return 0, err
	}
	var info struct {
		Actual int64 `json:"actual"`
	}
	if err := mon.Execute(ctx, "query-balloon", nil, &info); err != nil {
		return 0, fmt.Errorf("vm %s: query balloon: %w", m.spec.Name, err)
	}
	return int(info.Actual >> 20), nil
}

// balloonPath is the QOM path of the balloon device that Spec.Args adds.
const balloonPath = "/machine/peripheral/balloon0"

// GuestStatsInterval is how often the guest reports its memory statistics once GuestMemory
// has asked for them. The balloon never takes the guest below what it last reported using,
// so a report from before the guest freed memory holds back memory the owner needs until
// the next one. In BenchmarkOwnerMemory, with 2 s here and the owner's memory read every
// second, one trial in three made its first balloon request 3 s after the owner began, and
// the owner passed the desktop's RAM; with 1 s here and 250 ms readings, every trial asked
// within 0.27 s and none passed it.
const GuestStatsInterval = time.Second

// ErrNoGuestStats means the guest has not reported memory statistics yet: it reports only
// once GuestMemory has asked for them, after up to GuestStatsInterval, and never if it has
// no balloon driver.
var ErrNoGuestStats = errors.New("guest has not reported memory statistics yet")

// GuestMemory returns the memory the guest uses: its total less what it reports available
// (virtio-balloon statistics). The first call turns the statistics on and returns
// ErrNoGuestStats until the guest's first report.
func (m *Machine) GuestMemory(ctx context.Context) (int, error) {
	mon, err := m.Monitor()
	if err != nil {
		return 0, err
	}
	var interval int
	if err := mon.Execute(ctx, "qom-get", map[string]any{"path": balloonPath, "property": "guest-stats-polling-interval"}, &interval); err != nil {
		return 0, fmt.Errorf("vm %s: guest memory: %w", m.spec.Name, err)
	}
	if interval == 0 {
		// Set only when off: setting it again restarts the timer, and frequent callers
		// would then never see a report.
		secs := int(GuestStatsInterval / time.Second)
		if err := mon.Execute(ctx, "qom-set", map[string]any{"path": balloonPath, "property": "guest-stats-polling-interval", "value": secs}, nil); err != nil {
			return 0, fmt.Errorf("vm %s: turn on guest memory statistics: %w", m.spec.Name, err)
		}
		return 0, fmt.Errorf("vm %s: %w", m.spec.Name, ErrNoGuestStats)
	}
	var gs struct {
		Stats      map[string]int64 `json:"stats"`
		LastUpdate int64            `json:"last-update"`
	}
	if err := mon.Execute(ctx, "qom-get", map[string]any{"path": balloonPath, "property": "guest-stats"}, &gs); err != nil {
		return 0, fmt.Errorf("vm %s: guest memory: %w", m.spec.Name, err)
	}
	used, ok := usedFromStats(gs.Stats)
	if gs.LastUpdate == 0 || !ok {
		return 0, fmt.Errorf("vm %s: %w", m.spec.Name, ErrNoGuestStats)
	}
	return used, nil
}

// usedFromStats is total less available memory in MiB from virtio-balloon statistics, in
// which QEMU reports -1 for what the guest did not send.
func usedFromStats(stats map[string]int64) (int, bool) {
	total, avail := stats["stat-total-memory"], stats["stat-available-memory"]
	if total <= 0 || avail < 0 || avail > total {
		return 0, false
	}
	return int((total - avail) >> 20), true
}

// Pause stops the guest's vCPUs (QMP stop): it uses no CPU and touches no memory until
// Resume. Pausing a paused VM is no error.
func (m *Machine) Pause(ctx context.Context) error {
	mon, err := m.Monitor()
	if err != nil {
		return err
	}
	if err := mon.Execute(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("vm %s: pause: %w", m.spec.Name, err)
	}
	return nil
}

// Resume lets a paused guest run again (QMP cont). Resuming a running VM is no error.
func (m *Machine) Resume(ctx context.Context) error {
	mon, err := m.Monitor()
	if err != nil {
		return err
	}
	if err := mon.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("vm %s: resume: %w", m.spec.Name, err)
	}
	return nil
}

// Paused reports whether the guest's vCPUs are stopped (QMP query-status not "running"), as
// after Pause, or for a restored VM not yet resumed.
func (m *Machine) Paused(ctx context.Context) (bool, error) {
	mon, err := m.Monitor()
	if err != nil {
		return false, err
	}
	var st struct {
		Running bool `json:"running"`
	}
	if err := mon.Execute(ctx, "query-status", nil, &st); err != nil {
		return false, fmt.Errorf("vm %s: query status: %w", m.spec.Name, err)
	}
	return !st.Running, nil
}
