package owner

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of a ProcSource.
const (
	// DefaultCPUInterval is how often a ProcSource samples CPU: often enough that the yield
	// policy can cap a VM within a fraction of a second of the owner getting busy.
	DefaultCPUInterval = 25 * time.Millisecond
	// DefaultMemoryInterval is how often a ProcSource reads memory. A program loading can
	// ask for 512 MiB a second, and the balloon hands back a GiB in under a second, so
	// sensing sets the pace: at 1 s the owner of a desktop with 1.1 GiB to spare passed its
	// RAM in 1 of 3 trials of BenchmarkOwnerMemory (driver/vm), at 250 ms in none. Reading
	// /proc/meminfo costs microseconds.
	DefaultMemoryInterval = 250 * time.Millisecond
)

// userHZ is the unit of /proc/stat and /proc/<pid>/stat times. The kernel fixes it at 100
// for user space on every architecture deskcloud runs on.
const userHZ = 100

const microsPerTick = 1_000_000 / userHZ

// ProcConfig configures a ProcSource; the zero value reads the real /proc.
type ProcConfig struct {
	// Proc is where procfs is mounted; default "/proc".
	Proc string
	// CPUInterval is the time between CPU samples; default DefaultCPUInterval.
	CPUInterval time.Duration
	// MemoryInterval is the time between memory samples; default DefaultMemoryInterval.
	MemoryInterval time.Duration
	// Clock paces the samples; default SystemClock.
	Clock Clock
	// TotalCgroup, when set, is a cgroup directory whose CPU usage is the node's busy time:
	// the root of the cgroup v1 cpuacct hierarchy or the cgroup v2 root (see RootCgroup).
	// Its counter runs in nanoseconds where /proc/stat's runs in 10 ms ticks, so with the
	// VMs excluded by their cgroups the owner's share is exact rather than a tick or two
	// off on each side, which at 50 ms samples is ±0.2 of a 2-core node. Left empty, or
	// unreadable, /proc/stat is used.
	TotalCgroup string
	// Cores is the node's CPU count, for the share when TotalCgroup is used; default
	// runtime.NumCPU().
	Cores int
}

// RootCgroup returns the cgroup directory under root (normally /sys/fs/cgroup) that counts
// the whole node's CPU time, for ProcConfig.TotalCgroup: the cgroup v1 cpuacct hierarchy's
// root, or the cgroup v2 root when its cpu.stat counts usage; "" if neither does.
func RootCgroup(root string) string {
	for _, d := range []string{"cpuacct", "cpu,cpuacct", "cpuacct,cpu"} {
		dir := filepath.Join(root, d)
		if _, err := os.Stat(filepath.Join(dir, "cpuacct.usage")); err == nil {
			return dir
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, "cpu.stat")); err == nil && bytes.HasPrefix(b, []byte("usage_usec ")) {
		return root
	}
	return ""
}

// CgroupCounter returns the file under a cgroup dir that counts its CPU time and whether it
// is cgroup v2's cpu.stat; ok is false when the dir has neither. cpuacct.usage is looked for
// first: a cgroup v1 cpu dir has a cpu.stat too, of throttling figures only.
func CgroupCounter(dir string) (file string, v2, ok bool) {
	if f := filepath.Join(dir, "cpuacct.usage"); fileExists(f) {
		return f, false, true
	}
	if f := filepath.Join(dir, "cpu.stat"); fileExists(f) {
		if b, err := os.ReadFile(f); err == nil && bytes.HasPrefix(b, []byte("usage_usec ")) {
			return f, true, true
		}
	}
	return "", false, false
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// ProcSource samples the owner's CPU and memory from procfs. Owner CPU is the node's busy
// time less the CPU time of the excluded processes and cgroups (deskcloud's VMs), as a share
// of all cores.
//
// It reads /proc directly rather than through gopsutil: one sample needs the first line of
// /proc/stat and a few fields of /proc/meminfo, and keeping those files open and re-reading
// them into one buffer costs several times less than gopsutil's parse of every line (see
// BenchmarkGopsutilTick).
type ProcSource struct {
	cfg ProcConfig

	mu       sync.Mutex
	wantPIDs []int    // guarded by mu
	wantCgs  []string // guarded by mu
	gen      int      // bumped by Exclude, guarded by mu

	// The rest belongs to the goroutine running Run.
	stat, meminfo procFile
	buf           []byte
	seenGen       int
	excluded      []*counter
	havePrev      bool
	prevTotal     uint64    // µs
	prevBusy      uint64    // µs
	root          *counter  // the node's busy time from TotalCgroup; nil reads /proc/stat
	prevAt        time.Time // when root was last read
	nextMem       time.Time
}

// counter follows the cumulative CPU time of one excluded process or cgroup.
type counter struct {
	path   string // the file to read
	kind   counterKind
	f      procFile
	prev   uint64 // µs at the last sample
	primed bool   // prev is valid
}

type counterKind int

const (
	counterPID      counterKind = iota // /proc/<pid>/stat, utime+stime in ticks
	counterCgroupV2                    // cpu.stat, usage_usec
	counterCgroupV1                    // cpuacct.usage, nanoseconds
)

// NewProcSource returns a ProcSource with cfg's zero fields set to their defaults.
func NewProcSource(cfg ProcConfig) *ProcSource {
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	if cfg.CPUInterval <= 0 {
		cfg.CPUInterval = DefaultCPUInterval
	}
	if cfg.MemoryInterval <= 0 {
		cfg.MemoryInterval = DefaultMemoryInterval
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	if cfg.Cores <= 0 {
		cfg.Cores = runtime.NumCPU()
	}
	return &ProcSource{cfg: cfg, buf: make([]byte, 4096), seenGen: -1}
}

// Name returns "proc".
func (p *ProcSource) Name() string { return "proc" }

// Exclude sets the processes and cgroups whose CPU time is not the owner's: the QEMU
// processes of deskcloud's VMs, or the cgroup directories they run in (cgroup v2 with
// cpu.stat, or v1 cpuacct). It replaces the previous set and may be called while Run runs.
//
// Name each VM once, by pid or by cgroup: a process inside an excluded cgroup is subtracted
// twice if it is excluded by pid as well.
//
// A process or cgroup counts from the second sample after it is added: its first sample
// only sets the baseline, so for that one interval its CPU counts as the owner's, which errs
// on the owner's side.
func (p *ProcSource) Exclude(pids []int, cgroups []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wantPIDs = slices.Clone(pids)
	p.wantCgs = slices.Clone(cgroups)
	p.gen++
}

// Run samples CPU every CPUInterval and memory every MemoryInterval until ctx ends. The
// first CPU figure comes one interval after start, since it is a difference.
func (p *ProcSource) Run(ctx context.Context, emit func(Sample)) error {
	if err := p.open(); err != nil {
		return err
	}
	defer p.close()
	next := p.cfg.Clock.Now()
	for {
		s, err := p.sample(p.cfg.Clock.Now())
		if err != nil {
			return err
		}
		if s.Has != 0 {
			emit(s)
		}
		next = next.Add(p.cfg.CPUInterval)
		wait := next.Sub(p.cfg.Clock.Now())
		if wait < 0 { // fell behind, e.g. after a suspend: start the schedule afresh
			next, wait = p.cfg.Clock.Now(), 0
		}
		select {
		case <-ctx.Done():
			return nil
		case <-p.cfg.Clock.After(wait):
		}
	}
}

func (p *ProcSource) open() error {
	var err error
	if p.stat, err = openProcFile(filepath.Join(p.cfg.Proc, "stat")); err != nil {
		return fmt.Errorf("proc: %w: %w", ErrUnavailable, err)
	}
	if p.meminfo, err = openProcFile(filepath.Join(p.cfg.Proc, "meminfo")); err != nil {
		p.stat.close()
		return fmt.Errorf("proc: %w: %w", ErrUnavailable, err)
	}
	if p.cfg.TotalCgroup != "" {
		if file, v2, ok := CgroupCounter(p.cfg.TotalCgroup); ok {
			kind := counterCgroupV1
			if v2 {
				kind = counterCgroupV2
			}
			p.root = &counter{path: file, kind: kind}
		}
	}
	return nil
}

// UsesCgroupTotal reports whether the node's busy time comes from TotalCgroup (true) or from
// /proc/stat; it is known once Run has started.
func (p *ProcSource) UsesCgroupTotal() bool { return p.root != nil }

func (p *ProcSource) close() {
	p.stat.close()
	p.meminfo.close()
	for _, c := range p.excluded {
		c.f.close()
	}
	p.excluded = nil
}

// sample takes one reading at now. It is one tick of Run, split out for tests and the
// benchmark.
func (p *ProcSource) sample(now time.Time) (Sample, error) {
	s := Sample{Time: now}
	var total, busy uint64
	if p.root != nil {
		// Busy time in µs from the root cgroup; total is the wall time on every core.
		busy = p.prevBusy + p.root.delta(p.buf)
		if p.havePrev && now.After(p.prevAt) {
			total = p.prevTotal + uint64(now.Sub(p.prevAt).Microseconds())*uint64(p.cfg.Cores)
		} else {
			total = p.prevTotal
		}
		p.prevAt = now
	} else {
		var err error
		if total, busy, err = p.readStat(); err != nil {
			return s, err
		}
	}
	p.syncExcluded()
	var excluded uint64
	for _, c := range p.excluded {
		excluded += c.delta(p.buf)
	}
	if p.havePrev && total > p.prevTotal {
		dTotal, dBusy := total-p.prevTotal, busy-p.prevBusy
		owner := dBusy - min(excluded, dBusy)
		s.CPU = min(float64(owner)/float64(dTotal), 1)
		s.Has |= HasCPU
	}
	p.havePrev, p.prevTotal, p.prevBusy = true, total, busy
	if !now.Before(p.nextMem) {
		avail, total, err := p.readMeminfo()
		if err != nil {
			return s, err
		}
		s.MemAvailableMiB, s.MemTotalMiB = avail, total
		s.Has |= HasMemory
		p.nextMem = now.Add(p.cfg.MemoryInterval)
	}
	return s, nil
}

// readStat returns the node's total and busy CPU time in µs from the first line of
// /proc/stat. Guest time is already inside user time, so it is not added again; idle and
// iowait are not busy; steal belongs to no one on this node.
func (p *ProcSource) readStat() (total, busy uint64, err error) {
	b, err := p.stat.read(p.buf)
	if err != nil {
		return 0, 0, fmt.Errorf("proc: read stat: %w", err)
	}
	line, _, _ := bytes.Cut(b, []byte{'\n'})
	rest, ok := bytes.CutPrefix(line, []byte("cpu "))
	if !ok {
		return 0, 0, fmt.Errorf("proc: stat does not start with a cpu line, got %q", line)
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal
	for i := range v {
		if v[i], rest, ok = nextUint(rest); !ok {
			return 0, 0, fmt.Errorf("proc: stat cpu line has fewer than 8 fields, got %q", line)
		}
	}
	busy = v[0] + v[1] + v[2] + v[5] + v[6]
	total = busy + v[3] + v[4] + v[7]
	return total * microsPerTick, busy * microsPerTick, nil
}

// readMeminfo returns MemAvailable and MemTotal in MiB.
func (p *ProcSource) readMeminfo() (avail, total int, err error) {
	b, err := p.meminfo.read(p.buf)
	if err != nil {
		return 0, 0, fmt.Errorf("proc: read meminfo: %w", err)
	}
	var gotAvail, gotTotal bool
	for len(b) > 0 && !(gotAvail && gotTotal) {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		key, val, ok := bytes.Cut(line, []byte{':'})
		if !ok {
			continue
		}
		var kib uint64
		switch string(key) {
		case "MemTotal":
			kib, _, gotTotal = nextUint(val)
			total = int(kib >> 10)
		case "MemAvailable":
			kib, _, gotAvail = nextUint(val)
			avail = int(kib >> 10)
		}
	}
	if !gotAvail || !gotTotal {
		return 0, 0, errors.New("proc: meminfo lacks MemTotal or MemAvailable")
	}
	return avail, total, nil
}

// syncExcluded brings the open counters in line with the latest Exclude call.
func (p *ProcSource) syncExcluded() {
	p.mu.Lock()
	if p.gen == p.seenGen {
		p.mu.Unlock()
		return
	}
	pids, cgs := p.wantPIDs, p.wantCgs
	p.seenGen = p.gen
	p.mu.Unlock()

	want := make([]*counter, 0, len(pids)+len(cgs))
	for _, pid := range pids {
		want = append(want, &counter{path: filepath.Join(p.cfg.Proc, strconv.Itoa(pid), "stat"), kind: counterPID})
	}
	for _, dir := range cgs {
		kind, file := counterCgroupV1, filepath.Join(dir, "cpuacct.usage")
		if f, v2, ok := CgroupCounter(dir); ok && v2 {
			kind, file = counterCgroupV2, f
		}
		want = append(want, &counter{path: file, kind: kind})
	}
	// Keep the counters that stay, with their baselines.
	for i, w := range want {
		j := slices.IndexFunc(p.excluded, func(c *counter) bool { return c != nil && c.path == w.path })
		if j >= 0 {
			want[i], p.excluded[j] = p.excluded[j], nil
		}
	}
	for _, c := range p.excluded {
		if c != nil {
			c.f.close()
		}
	}
	p.excluded = want
}

// delta returns the µs of CPU the counter's process or cgroup used since the last call. A
// counter that cannot be read (not yet created, or gone) contributes nothing and is opened
// afresh next time.
func (c *counter) delta(buf []byte) uint64 {
	if c.f.file == nil {
		f, err := openProcFile(c.path)
		if err != nil {
			return 0
		}
		c.f, c.primed = f, false
	}
	cur, err := c.read(buf)
	if err != nil {
		c.f.close()
		c.f, c.primed = procFile{}, false
		return 0
	}
	var d uint64
	if c.primed && cur >= c.prev {
		d = cur - c.prev
	}
	c.prev, c.primed = cur, true
	return d
}

func (c *counter) read(buf []byte) (uint64, error) {
	b, err := c.f.read(buf)
	if err != nil {
		return 0, err
	}
	switch c.kind {
	case counterPID:
		return parsePIDStat(b)
	case counterCgroupV2:
		line, _, _ := bytes.Cut(b, []byte{'\n'})
		rest, ok := bytes.CutPrefix(line, []byte("usage_usec "))
		if !ok {
			return 0, fmt.Errorf("%s does not start with usage_usec", c.path)
		}
		v, _, ok := nextUint(rest)
		if !ok {
			return 0, fmt.Errorf("%s: bad usage_usec %q", c.path, line)
		}
		return v, nil
	default:
		v, _, ok := nextUint(b)
		if !ok {
			return 0, fmt.Errorf("%s: bad usage %q", c.path, b)
		}
		return v / 1000, nil
	}
}

// parsePIDStat returns utime+stime in µs from /proc/<pid>/stat. The command name, field 2,
// may hold spaces and parentheses, so fields are counted from its last ')'.
func parsePIDStat(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("pid stat has no command name, got %q", b)
	}
	rest := b[i+1:]
	// Fields after the name start at 3 (state); utime and stime are 14 and 15.
	for range 11 {
		if rest = skipField(rest); len(rest) == 0 {
			return 0, fmt.Errorf("pid stat too short, got %q", b)
		}
	}
	utime, rest, ok1 := nextUint(rest)
	stime, _, ok2 := nextUint(rest)
	if !ok1 || !ok2 {
		return 0, fmt.Errorf("pid stat has no utime and stime, got %q", b)
	}
	return (utime + stime) * microsPerTick, nil
}

// procFile is a procfs, sysfs or cgroupfs file kept open between samples. Such files are
// generated afresh by each read from offset 0, so one pread per sample serves, where
// os.File.ReadAt would pread again to find the end and a fresh open would add two syscalls.
type procFile struct {
	file *os.File
	fd   int
}

func openProcFile(path string) (procFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return procFile{}, err
	}
	return procFile{file: f, fd: int(f.Fd())}, nil
}

// read fills buf from the start of the file, up to len(buf) bytes: the files read here are
// either small or read only for their first lines.
func (f procFile) read(buf []byte) ([]byte, error) {
	for {
		n, err := unix.Pread(f.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, &os.PathError{Op: "read", Path: f.file.Name(), Err: err}
		}
		return buf[:n], nil
	}
}

func (f procFile) close() {
	if f.file != nil {
		f.file.Close()
	}
}

// nextUint parses the next unsigned decimal in b, skipping leading spaces, and returns it
// with the rest of b.
func nextUint(b []byte) (v uint64, rest []byte, ok bool) {
	i := 0
	for i < len(b) && (b[i] == ' ' || b[i] == '\t') {
		i++
	}
	start := i
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		v = v*10 + uint64(b[i]-'0')
		i++
	}
	return v, b[i:], i > start
}

// skipField drops leading spaces and one space-separated field from b.
func skipField(b []byte) []byte {
	i := 0
	for i < len(b) && b[i] == ' ' {
		i++
	}
	for i < len(b) && b[i] != ' ' {
		i++
	}
	return b[i:]
}
