package owner

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// fakeProc is a procfs stand-in in a temp dir whose counters a test moves.
type fakeProc struct {
	t    *testing.T
	root string
}

func newFakeProc(t *testing.T) *fakeProc {
	fp := &fakeProc{t: t, root: t.TempDir()}
	fp.setStat(0, 0)
	fp.setMeminfo(4096, 16384)
	return fp
}

func (fp *fakeProc) write(path, content string) {
	fp.t.Helper()
	must.NoError(fp.t, os.MkdirAll(filepath.Dir(path), 0o755))
	must.NoError(fp.t, os.WriteFile(path, []byte(content), 0o644))
}

// setStat writes /proc/stat with busy and idle ticks spread over its fields the way the
// kernel would: busy in user, system and softirq; idle in idle and iowait; plus guest time,
// which is already inside user and must not count twice.
func (fp *fakeProc) setStat(busy, idle uint64) {
	user, system, softirq := busy-busy/4-busy/8, busy/4, busy/8
	fp.write(filepath.Join(fp.root, "stat"), fmt.Sprintf(
		"cpu  %d 0 %d %d %d 0 %d 0 %d 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 12345 1 2 3\nctxt 99\n",
		user, system, idle-idle/10, idle/10, softirq, user/2))
}

func (fp *fakeProc) setMeminfo(availMiB, totalMiB int) {
	fp.write(filepath.Join(fp.root, "meminfo"), fmt.Sprintf(
		"MemTotal:       %d kB\nMemFree:         1000 kB\nMemAvailable:   %d kB\nBuffers:          12 kB\n",
		totalMiB<<10, availMiB<<10))
}

// setPID writes /proc/<pid>/stat with a command name that has spaces and parentheses in it.
func (fp *fakeProc) setPID(pid int, utime, stime uint64) {
	fp.write(filepath.Join(fp.root, fmt.Sprint(pid), "stat"), fmt.Sprintf(
		"%d (qemu (vm) 1) S 1 %d %d 0 -1 4194560 100 0 0 0 %d %d 0 0 20 0 5 0 12345 1000000 200 18446744073709551615\n",
		pid, pid, pid, utime, stime))
}

func TestProcSourceSample(t *testing.T) {
	fp := newFakeProc(t)
	cgV2 := filepath.Join(t.TempDir(), "vm2")
	cgV1 := filepath.Join(t.TempDir(), "vm1")
	fp.write(filepath.Join(cgV2, "cpu.stat"), "usage_usec 0\nuser_usec 0\nsystem_usec 0\n")
	fp.write(filepath.Join(cgV1, "cpuacct.usage"), "0\n")
	fp.setPID(4242, 0, 0)

	p := NewProcSource(ProcConfig{Proc: fp.root, MemoryInterval: time.Second})
	must.NoError(t, p.open())
	defer p.close()
	p.Exclude([]int{4242}, []string{cgV2, cgV1})

	// The first sample only sets baselines for CPU, but reads memory.
	s, err := p.sample(t0)
	must.NoError(t, err)
	must.Eq(t, HasMemory, s.Has)
	must.Eq(t, 4096, s.MemAvailableMiB)
	must.Eq(t, 16384, s.MemTotalMiB)

	// 100 ms on 4 cores is 40 ticks: 30 busy, of which the VMs used 5+3 ticks (pid),
	// 60 ms (cgroup v2) and 40 ms (cgroup v1): 18 ticks; the owner 12 of 40.
	fp.setStat(30, 10)
	fp.setPID(4242, 5, 3)
	fp.write(filepath.Join(cgV2, "cpu.stat"), "usage_usec 60000\nuser_usec 0\nsystem_usec 0\n")
	fp.write(filepath.Join(cgV1, "cpuacct.usage"), "40000000\n")
	fp.setMeminfo(2048, 16384)
	s, err = p.sample(t0.Add(100 * time.Millisecond))
	must.NoError(t, err)
	must.Eq(t, HasCPU, s.Has, must.Sprint("memory is read once a second only"))
	must.InDelta(t, 12.0/40, s.CPU, 1e-9)

	// The VM process exits: it drops out, and its last interval counts as the owner's.
	must.NoError(t, os.RemoveAll(filepath.Join(fp.root, "4242")))
	fp.setStat(60, 20)
	fp.write(filepath.Join(cgV2, "cpu.stat"), "usage_usec 160000\n")
	fp.write(filepath.Join(cgV1, "cpuacct.usage"), "40000000\n")
	s, err = p.sample(t0.Add(time.Second))
	must.NoError(t, err)
	must.Eq(t, HasCPU|HasMemory, s.Has)
	must.InDelta(t, 20.0/40, s.CPU, 1e-9)
	must.Eq(t, 2048, s.MemAvailableMiB)

	// The VMs can never make the owner's share negative, even when counters disagree.
	fp.setStat(70, 50)
	fp.write(filepath.Join(cgV2, "cpu.stat"), "usage_usec 900000\n")
	s, err = p.sample(t0.Add(1100 * time.Millisecond))
	must.NoError(t, err)
	must.Eq(t, 0.0, s.CPU)

	// Exclude replaces the set; a cgroup that stays keeps its baseline.
	p.Exclude(nil, []string{cgV2})
	fp.setStat(100, 60)
	fp.write(filepath.Join(cgV2, "cpu.stat"), "usage_usec 1000000\n")
	fp.write(filepath.Join(cgV1, "cpuacct.usage"), "999000000\n")
	s, err = p.sample(t0.Add(1200 * time.Millisecond))
	must.NoError(t, err)
	must.InDelta(t, 20.0/40, s.CPU, 1e-9)
	must.SliceLen(t, 1, p.excluded)
}

// TestProcSourceCgroupTotal takes the node's busy time from a root cgroup's nanosecond
// counter and the wall time, rather than from /proc/stat's ticks.
func TestProcSourceCgroupTotal(t *testing.T) {
	fp := newFakeProc(t)
	root := filepath.Join(t.TempDir(), "cpuacct")
	vm := filepath.Join(root, "nomad", "vm")
	fp.write(filepath.Join(root, "cpuacct.usage"), "1000000000\n")
	fp.write(filepath.Join(vm, "cpuacct.usage"), "500000000\n")
	// A cgroup v1 cpu dir has a cpu.stat of throttling figures, which must not be taken for
	// cgroup v2's usage.
	fp.write(filepath.Join(vm, "cpu.stat"), "nr_periods 5\nnr_throttled 1\n")

	p := NewProcSource(ProcConfig{Proc: fp.root, TotalCgroup: root, Cores: 2})
	must.NoError(t, p.open())
	defer p.close()
	must.True(t, p.UsesCgroupTotal())
	p.Exclude(nil, []string{vm})
	_, err := p.sample(t0)
	must.NoError(t, err)

	// 50 ms on 2 cores is 100 ms of CPU: the node was busy 73 ms of it, the VM 61 ms.
	fp.setStat(1000, 0) // /proc/stat says otherwise; it is not read
	fp.write(filepath.Join(root, "cpuacct.usage"), "1073000000\n")
	fp.write(filepath.Join(vm, "cpuacct.usage"), "561000000\n")
	s, err := p.sample(t0.Add(50 * time.Millisecond))
	must.NoError(t, err)
	must.InDelta(t, 0.12, s.CPU, 1e-9)

	// Without a readable root the source falls back on /proc/stat.
	q := NewProcSource(ProcConfig{Proc: fp.root, TotalCgroup: filepath.Join(t.TempDir(), "none")})
	must.NoError(t, q.open())
	defer q.close()
	must.False(t, q.UsesCgroupTotal())
}

func TestRootCgroup(t *testing.T) {
	dir := t.TempDir()
	must.Eq(t, "", RootCgroup(dir))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "cpu.stat"), []byte("usage_usec 5\n"), 0o644))
	must.Eq(t, dir, RootCgroup(dir), must.Sprint("cgroup v2 root"))
	must.NoError(t, os.MkdirAll(filepath.Join(dir, "cpu,cpuacct"), 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "cpu,cpuacct", "cpuacct.usage"), []byte("5\n"), 0o644))
	must.Eq(t, filepath.Join(dir, "cpu,cpuacct"), RootCgroup(dir), must.Sprint("cgroup v1 cpuacct first"))
}

func TestProcSourceErrors(t *testing.T) {
	cases := []struct {
		name    string
		stat    string
		meminfo string
		want    string
	}{
		{"no cpu line", "intr 1 2 3\n", "", `proc: stat does not start with a cpu line, got "intr 1 2 3"`},
		{"short cpu line", "cpu  1 2 3\n", "", `proc: stat cpu line has fewer than 8 fields, got "cpu  1 2 3"`},
		{"no MemAvailable", "cpu  1 2 3 4 5 6 7 8 0 0\n", "MemTotal: 100 kB\n", "proc: meminfo lacks MemTotal or MemAvailable"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fp := newFakeProc(t)
			fp.write(filepath.Join(fp.root, "stat"), tc.stat)
			if tc.meminfo != "" {
				fp.write(filepath.Join(fp.root, "meminfo"), tc.meminfo)
			}
			p := NewProcSource(ProcConfig{Proc: fp.root})
			must.NoError(t, p.open())
			defer p.close()
			_, err := p.sample(t0)
			must.EqError(t, err, tc.want)
		})
	}

	t.Run("no procfs", func(t *testing.T) {
		p := NewProcSource(ProcConfig{Proc: filepath.Join(t.TempDir(), "nothing")})
		err := p.Run(t.Context(), func(Sample) {})
		must.ErrorIs(t, err, ErrUnavailable)
	})
}

func TestParsePIDStat(t *testing.T) {
	cases := []struct {
		name string
		in   string
		want uint64
		err  bool
	}{
		{"plain", "1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 250 50 0 0 20 0 1 0 5\n", 300 * microsPerTick, false},
		{"name with spaces and parens", "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0\n", 3 * microsPerTick, false},
		{"no name", "7 a R 1\n", 0, true},
		{"too short", "7 (a) R 1 7 7\n", 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePIDStat([]byte(tc.in))
			if tc.err {
				must.Error(t, err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

// TestProcSourceRun drives Run with a fake clock: a sample per tick, memory once a second,
// and a clean stop when the context ends.
func TestProcSourceRun(t *testing.T) {
	fp := newFakeProc(t)
	clock := NewFakeClock(t0)
	p := NewProcSource(ProcConfig{Proc: fp.root, Clock: clock})
	ctx, cancel := context.WithCancel(t.Context())
	got := make(chan Sample, 100)
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, func(s Sample) { got <- s }) }()

	ticks := int(time.Second / DefaultCPUInterval) // memory comes due every DefaultMemoryInterval
	for i := 1; i <= ticks; i++ {
		must.NoError(t, clock.WaitForWaiters(ctx, 1))
		fp.setStat(uint64(10*i), uint64(30*i))
		clock.Advance(DefaultCPUInterval)
	}
	must.NoError(t, clock.WaitForWaiters(ctx, 1))
	cancel()
	must.NoError(t, <-done)
	close(got)

	var samples []Sample
	for s := range got {
		samples = append(samples, s)
	}
	must.SliceLen(t, ticks+1, samples)
	must.Eq(t, HasMemory, samples[0].Has)
	mem := 0
	for i, s := range samples[1:] {
		must.Eq(t, t0.Add(time.Duration(i+1)*DefaultCPUInterval), s.Time)
		must.InDelta(t, 0.25, s.CPU, 1e-9)
		if s.Has&HasMemory != 0 {
			mem++
		}
	}
	must.Eq(t, int(time.Second/DefaultMemoryInterval), mem, must.Sprintf("memory is read at start and every %s", DefaultMemoryInterval))
}

// TestProcSourceRealProc reads this machine's /proc, excluding this test process.
func TestProcSourceRealProc(t *testing.T) {
	if _, err := os.Stat("/proc/stat"); err != nil {
		t.Skipf("no procfs here: %v", err)
	}
	p := NewProcSource(ProcConfig{})
	must.NoError(t, p.open())
	defer p.close()
	p.Exclude([]int{os.Getpid()}, nil)
	s, err := p.sample(time.Now())
	must.NoError(t, err)
	must.Positive(t, s.MemTotalMiB)
	must.Between(t, 0, s.MemAvailableMiB, s.MemTotalMiB)
	for range 3 {
		s, err = p.sample(time.Now())
		must.NoError(t, err)
		must.Between(t, 0.0, s.CPU, 1.0)
	}
}
