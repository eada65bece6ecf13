package owner

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/rs/zerolog"
	pscpu "github.com/shirou/gopsutil/v3/cpu"
	"github.com/shirou/gopsutil/v3/mem"
	"github.com/shirou/gopsutil/v3/process"
)

// reportDuty adds the share of one core that one op per interval would take.
func reportDuty(b *testing.B, interval time.Duration) {
	perOp := float64(b.Elapsed()) / float64(b.N)
	b.ReportMetric(100*perOp/float64(interval), "%core@"+interval.String())
}

// BenchmarkProcTick is one CPU sampling tick of a ProcSource on this machine's /proc, with
// two excluded processes, reading memory on every tick (in use it reads memory one tick in
// ten). Its %core@100ms is the share of one core that sensing at 100 ms costs.
func BenchmarkProcTick(b *testing.B) {
	if _, err := os.Stat("/proc/stat"); err != nil {
		b.Skipf("no procfs here: %v", err)
	}
	p := NewProcSource(ProcConfig{MemoryInterval: time.Nanosecond})
	if err := p.open(); err != nil {
		b.Fatal(err)
	}
	defer p.close()
	p.Exclude([]int{os.Getpid(), 1}, nil)
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		now = now.Add(DefaultCPUInterval)
		if _, err := p.sample(now); err != nil {
			b.Fatal(err)
		}
	}
	reportDuty(b, DefaultCPUInterval)
}

// BenchmarkCgroupTick is one sensing tick as the driver takes it on a node with cgroups: the
// node's busy time from the root cgroup's counter, two VMs excluded by their cgroups' counters
// (here the root's own children, which stand in for them), memory from /proc.
func BenchmarkCgroupTick(b *testing.B) {
	root := RootCgroup("/sys/fs/cgroup")
	if root == "" {
		b.Skip("no cgroup here counts the node's CPU time")
	}
	var vms []string
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		if _, _, ok := CgroupCounter(filepath.Join(root, e.Name())); e.IsDir() && ok && len(vms) < 2 {
			vms = append(vms, filepath.Join(root, e.Name()))
		}
	}
	p := NewProcSource(ProcConfig{MemoryInterval: time.Nanosecond, TotalCgroup: root})
	if err := p.open(); err != nil {
		b.Fatal(err)
	}
	defer p.close()
	if !p.UsesCgroupTotal() {
		b.Fatalf("%s did not open as the node's total", root)
	}
	p.Exclude(nil, vms)
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		now = now.Add(DefaultCPUInterval)
		if _, err := p.sample(now); err != nil {
			b.Fatal(err)
		}
	}
	reportDuty(b, DefaultCPUInterval)
}

// BenchmarkGopsutilTick does what BenchmarkProcTick does through gopsutil, for comparison:
// it is why ProcSource reads /proc itself.
func BenchmarkGopsutilTick(b *testing.B) {
	procs := make([]*process.Process, 0, 2)
	for _, pid := range []int32{int32(os.Getpid()), 1} {
		p, err := process.NewProcess(pid)
		if err != nil {
			b.Skipf("gopsutil cannot read process %d: %v", pid, err)
		}
		procs = append(procs, p)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := pscpu.Times(false); err != nil {
			b.Fatal(err)
		}
		for _, p := range procs {
			if _, err := p.Times(); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := mem.VirtualMemory(); err != nil {
			b.Fatal(err)
		}
	}
	reportDuty(b, DefaultCPUInterval)
}

// BenchmarkInputRead decodes a read's worth of mouse events: a 1 kHz mouse moving
// continuously gives one such read per DefaultInputResolution.
func BenchmarkInputRead(b *testing.B) {
	var raw []byte
	for range 21 {
		raw = append(raw, events(relX, Event{Type: evRel, Code: 1, Value: 2}, evSyn)...)
	}
	r := bytes.NewReader(raw)
	er := NewEventReader(r)
	b.ReportAllocs()
	for b.Loop() {
		r.Reset(raw)
		er.start, er.end = 0, 0
		for {
			e, err := er.Read()
			if err != nil || e.IsActivity() {
				break
			}
		}
	}
}

// BenchmarkLogindQuery is one LogindSource query against a fake logind on a private bus:
// a LogindSource makes one a second.
func BenchmarkLogindQuery(b *testing.B) {
	addr := startBus(b)
	newFakeLogind(b, addr, true)
	conn, err := dbus.Connect(addr)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	s := NewLogindSource(LogindConfig{Address: addr})
	seat := conn.Object(logindName, "/org/freedesktop/login1/seat/seat0")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.query(b.Context(), conn, seat); err != nil {
			b.Fatal(err)
		}
	}
	reportDuty(b, DefaultLogindInterval)
}

func BenchmarkClassifierObserve(b *testing.B) {
	c := NewClassifier(DefaultThresholds())
	s := Sample{Time: t0, Has: HasCPU | HasInput | HasMemory, CPU: 0.2, InputIdle: time.Minute, MemAvailableMiB: 4000}
	b.ReportAllocs()
	for b.Loop() {
		s.Time = s.Time.Add(DefaultCPUInterval)
		c.Observe(s)
	}
}

func BenchmarkSamplerMerge(b *testing.B) {
	s := NewSampler(zerolog.Nop(), nil, nil, nil)
	s.last[1] = Sample{Time: t0, Has: HasInput}
	s.last[2] = Sample{Time: t0, Has: HasSession | HasLocked | HasInput, Session: true, InputIdle: time.Hour}
	obs := Sample{Time: t0, Has: HasCPU, CPU: 0.3}
	b.ReportAllocs()
	for b.Loop() {
		obs.Time = obs.Time.Add(DefaultCPUInterval)
		s.last[0] = obs
		s.latest = s.merge(obs)
	}
}

// BenchmarkTraceReader reads trace rows: how fast a simulator can feed a year of trace.
func BenchmarkTraceReader(b *testing.B) {
	var buf bytes.Buffer
	tw := NewTraceWriter(&buf)
	for i := range 10000 {
		tw.Write(Sample{Time: t0.Add(time.Duration(i) * time.Minute), Has: HasCPU | HasMemory | HasInput | HasLocked | HasSession,
			CPU: float64(i%100) / 100, MemAvailableMiB: 4000 + i%1000, MemTotalMiB: 16000, InputIdle: time.Duration(i%900) * time.Second, Session: true})
	}
	tw.Flush()
	raw := buf.Bytes()
	b.ReportAllocs()
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		tr, err := NewTraceReader(bytes.NewReader(raw))
		if err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := tr.Next(); err != nil {
				break
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed())/float64(b.N)/10000, "ns/row")
}
