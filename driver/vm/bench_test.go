package vm

// Benchmarks of the yield layers against real QEMU (TCG), for `make bench`. Each measures a
// few short trials, prints a table of medians and ratios, and reports the headline numbers
// as benchmark metrics. Run them once each:
//
//	go test -run '^$' -bench . -benchtime 1x -timeout 20m ./driver/vm/
//
// They need root, QEMU and the guest kit, and skip without them. The whole set takes a few
// minutes on 2 cores. On a shared machine the other users' load is part of every number: the
// tables show the host's load average beside them.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/shoenig/test/must"
)

// Owner workload: every core busy with a fixed amount of work, sized to take ownerWork on
// an idle core.
const ownerWork = 300 * time.Millisecond

// benchTrials is how many times each configuration is measured.
const benchTrials = 5

// ownerCgroup is a cgroup for the owner's processes beside the VM's, as a desktop session's
// user.slice sits beside Nomad's cgroups.
func ownerCgroup(b *testing.B) string {
	b.Helper()
	dir := filepath.Join("/sys/fs/cgroup/cpu", fmt.Sprintf("deskcloud-test-owner-%d", os.Getpid()))
	must.NoError(b, os.MkdirAll(dir, 0o755))
	b.Cleanup(func() { removeCgroup(dir) })
	return dir
}

// calibrateSpin returns the spin count that takes about d on one core now.
func calibrateSpin(b *testing.B) int64 {
	b.Helper()
	const n = 50_000_000
	var best time.Duration
	for range 3 {
		start := time.Now()
		spin(n)
		if d := time.Since(start); best == 0 || d < best {
			best = d
		}
	}
	return int64(float64(n) * float64(ownerWork) / float64(best))
}

// runOwner runs one owner process per core, each spinning n rounds, in cgroup dir, and
// returns the wall time until the last one is done.
func runOwner(b *testing.B, n int64, dir string) time.Duration {
	b.Helper()
	procs := runtime.NumCPU()
	var cmds []*exec.Cmd
	var gos []io.WriteCloser
	for range procs {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
		cmd.Env = append(os.Environ(), helperEnv+"=spin="+strconv.FormatInt(n, 10))
		in, err := cmd.StdinPipe()
		must.NoError(b, err)
		must.NoError(b, cmd.Start())
		must.NoError(b, os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644))
		cmds = append(cmds, cmd)
		gos = append(gos, in)
	}
	start := time.Now()
	for _, in := range gos {
		_, _ = in.Write([]byte{1})
		in.Close()
	}
	for _, cmd := range cmds {
		must.NoError(b, cmd.Wait())
	}
	return time.Since(start)
}

// vmPolicy is how the VM's threads and cgroup are scheduled.
type vmPolicy struct {
	name string
	note string
	// apply sets the policy on a running VM from the normal class.
	apply func(m *Machine, cgroups []string) error
}

var vmPolicies = []vmPolicy{
	{name: "normal", note: "normal class, as Nomad's qemu driver runs it",
		apply: func(m *Machine, cg []string) error { return nil }},
	{name: "nice19", note: "every QEMU thread at nice 19",
		apply: func(m *Machine, cg []string) error { return setNice(m.PID(), 19) }},
	{name: "idle-threads", note: "every QEMU thread SCHED_IDLE, its cgroup normal",
		apply: func(m *Machine, cg []string) error { return SetIdleClass(m.PID()) }},
	{name: "deskvm", note: "every QEMU thread SCHED_IDLE and cgroup cpu.idle=1",
		apply: func(m *Machine, cg []string) error {
			if err := SetIdleClass(m.PID()); err != nil {
				return err
			}
			return SetCgroupIdle(cg[0])
		}},
}

// resetPolicy puts the VM back in the normal class.
func resetPolicy(m *Machine, cgroups []string) error {
	if err := os.WriteFile(filepath.Join(cgroups[0], "cpu.idle"), []byte("0"), 0o644); err != nil {
		return err
	}
	return setNice(m.PID(), 0)
}

// busyScript keeps every vCPU busy and counts its work: one shell loop per vCPU, each
// printing a line every 1000 rounds.
func busyScript(vcpus int) string {
	return fmt.Sprintf(`for c in $(seq %d); do (i=0; while :; do i=$((i+1)); [ $((i %% 1000)) = 0 ] && echo $c $i; done) & done; wait`, vcpus)
}

// lines counts the lines of path.
func lines(path string) int {
	b, _ := os.ReadFile(path)
	return bytes.Count(b, []byte("\n"))
}

// busyVM boots a 2-vCPU VM (one per host core) in its own cgroups and starts busyScript.
func busyVM(b *testing.B, ctx context.Context) (*Machine, []string) {
	b.Helper()
	cgroups := testCgroups(b)
	vcpus := runtime.NumCPU()
	spec := testSpec(b, "bench-busy", vcpus, 256)
	spec.CgroupDirs = cgroups
	m := startTestVM(b, ctx, spec)
	startCommand(b, ctx, m, busyScript(vcpus))
	waitFor(b, ctx, time.Minute, "the guest's busy loops", func() bool { return lines(spec.Stdout) > 0 })
	return m, cgroups
}

// BenchmarkYieldCPU measures, on one busy VM: the owner's slowdown beside it under each
// scheduling policy, how fast a CPU cap takes hold, and how much work the VM still does
// under deskvm's settings while the owner is away.
func BenchmarkYieldCPU(b *testing.B) {
	requireQEMU(b)
	ctx := b.Context()
	m, cgroups := busyVM(b, ctx)
	b.Run("owner-slowdown", func(b *testing.B) { benchOwnerSlowdown(b, ctx, m, cgroups) })
	b.Run("cap-reaction", func(b *testing.B) { benchCapReaction(b, ctx, m, cgroups) })
	b.Run("cap-onset", func(b *testing.B) { benchCapOnset(b, ctx, m, cgroups) })
	b.Run("harvest", func(b *testing.B) { benchHarvest(b, ctx, m, cgroups) })
}

func benchOwnerSlowdown(b *testing.B, ctx context.Context, m *Machine, cgroups []string) {
	owner := ownerCgroup(b)
	n := calibrateSpin(b)
	times := make(map[string][]time.Duration)
	for range benchTrials {
		must.NoError(b, m.Pause(ctx))
		times["no-vm"] = append(times["no-vm"], runOwner(b, n, owner))
		must.NoError(b, m.Resume(ctx))
		for _, p := range vmPolicies {
			must.NoError(b, resetPolicy(m, cgroups))
			must.NoError(b, p.apply(m, cgroups))
			times[p.name] = append(times[p.name], runOwner(b, n, owner))
		}
	}
	must.NoError(b, resetPolicy(m, cgroups))

	base := median(times["no-vm"])
	tw := newTable("owner slowdown beside a busy %d-vCPU VM (%d owner processes, %d trials, host load %s)",
		runtime.NumCPU(), runtime.NumCPU(), benchTrials, loadAvg())
	fmt.Fprintln(tw, "vm\towner wall p50\tmin\tmax\tvs no vm\t")
	row := func(name, note string) {
		ts := times[name]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.2fx\t  %s\n", name, ms(median(ts)), ms(slices.Min(ts)), ms(slices.Max(ts)),
			float64(median(ts))/float64(base), note)
	}
	row("no-vm", "the VM paused")
	for _, p := range vmPolicies {
		row(p.name, p.note)
		b.ReportMetric(float64(median(times[p.name]))/float64(base), p.name+"-slowdown-x")
	}
	tw.Flush()
}

// capPeriods are the CFS periods compared.
var capPeriods = []time.Duration{100 * time.Millisecond, 20 * time.Millisecond}

func benchCapReaction(b *testing.B, ctx context.Context, m *Machine, cgroups []string) {
	const trials = 10
	const capPct = 10
	vcpus := runtime.NumCPU()
	capCores := float64(capPct) / 100 * float64(vcpus)
	type result struct{ throttled, held []time.Duration }
	results := make(map[time.Duration]*result)
	var before []float64
	for _, period := range capPeriods {
		r := &result{}
		results[period] = r
		for range trials {
			must.NoError(b, setCPUCap(cgroups, 100, vcpus, period))
			// Let the VM run uncapped, and measure how much CPU it gets.
			u0, _ := CPUUsage(cgroups)
			t0 := time.Now()
			waitTicks(ctx, 300*time.Millisecond)
			u1, _ := CPUUsage(cgroups)
			before = append(before, float64(u1-u0)/float64(time.Since(t0)))

			thr0 := throttledCount(cgroups)
			start := time.Now()
			must.NoError(b, setCPUCap(cgroups, capPct, vcpus, period))
			throttled, held := watchCap(ctx, cgroups, thr0, start, capCores, period, 2*time.Second)
			r.throttled = append(r.throttled, throttled)
			r.held = append(r.held, held)
		}
	}
	must.NoError(b, SetCPUCap(cgroups, 100, vcpus))

	tw := newTable("cap reaction: %d%% of %d vCPUs (%.2f cores) on a VM using %.2f cores, %d trials (host load %s)",
		capPct, vcpus, capCores, median(before), trials, loadAvg())
	fmt.Fprintln(tw, "period\tfirst throttle p50\tp99\theld to cap p50\tp99\t")
	for _, period := range capPeriods {
		r := results[period]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", period, ms(median(r.throttled)), ms(percentile(r.throttled, 99)),
			ms(median(r.held)), ms(percentile(r.held, 99)))
		b.ReportMetric(float64(median(r.held))/1e6, fmt.Sprintf("held-p50-ms-period-%dms", period.Milliseconds()))
	}
	tw.Flush()
	fmt.Println("  held to cap: the end of the first window of one period, after the cap was set, in which the VM used no more than the cap (+5% of a core)")
}

// benchCapOnset measures the whole reaction to an owner who starts work: from the owner's
// process starting to the VM held to the cap that the yield policy sets for them, through
// the code the driver runs: the proc owner source (the VM excluded, the driver's default
// cpu_interval), the Decider with the default policy, and SetCPUCap. The VM runs as deskvm
// runs it (idle class, cgroup cpu.idle) and the owner is one busy process, half of this
// 2-core host: the load whose band is a 25 % cap (a first sample that holds only part of the
// owner's work may cap at 50 % before it).
func benchCapOnset(b *testing.B, ctx context.Context, m *Machine, cgroups []string) {
	vcpus := runtime.NumCPU()
	must.NoError(b, resetPolicy(m, cgroups))
	must.NoError(b, SetIdleClass(m.PID()))
	must.NoError(b, SetCgroupIdle(cgroups[0]))
	b.Cleanup(func() { _ = resetPolicy(m, cgroups); _ = SetCPUCap(cgroups, 100, vcpus) })
	acct := ""
	for _, d := range cgroups {
		if _, _, ok := owner.CgroupCounter(d); ok {
			acct = d
			break
		}
	}
	root := owner.RootCgroup("/sys/fs/cgroup")
	ticks := func(interval, window time.Duration) onsetSensing {
		return onsetSensing{fmt.Sprintf("proc-ticks-%s", interval), fmt.Sprintf("/proc ticks, every %s, cap_window %s", interval, window), interval, window,
			func(p *owner.ProcSource) { p.Exclude([]int{m.PID()}, nil) }, ""}
	}
	variants := []onsetSensing{ticks(50*time.Millisecond, 100*time.Millisecond), ticks(25*time.Millisecond, 50*time.Millisecond)}
	if acct != "" && root != "" {
		variants = append(variants, onsetSensing{"cgroup-ns", "cgroup ns (the driver's), every 25ms, cap_window 50ms", 25 * time.Millisecond, 50 * time.Millisecond,
			func(p *owner.ProcSource) { p.Exclude(nil, []string{acct}) }, root})
	}
	// One sub-benchmark per variant, so that on a shared host one can be run alone
	// (-bench 'BenchmarkYieldCPU/cap-onset/cgroup-ns') in a quiet minute.
	for _, v := range variants {
		b.Run(v.key, func(b *testing.B) { onsetTrials(b, ctx, m, cgroups, v) })
	}
}

// onsetSensing is how the owner's CPU is sensed in one cap-onset run.
type onsetSensing struct {
	key, name        string
	interval, window time.Duration
	exclude          func(*owner.ProcSource)
	totalCgroup      string
}

func onsetTrials(b *testing.B, ctx context.Context, m *Machine, cgroups []string, v onsetSensing) {
	const trials = 20
	vcpus := runtime.NumCPU()
	interval := v.interval
	policy := yield.DefaultPolicy()
	policy.CapWindow = v.window
	ownerDir := ownerCgroup(b)

	var first, decided, held []time.Duration
	caps := map[int]int{}
	early := 0
	for range trials {
		must.NoError(b, SetCPUCap(cgroups, 100, vcpus))
		src := owner.NewProcSource(owner.ProcConfig{CPUInterval: interval, TotalCgroup: v.totalCgroup})
		v.exclude(src)
		dec := yield.NewDecider(policy, yield.VMInfo{CPUCapPercent: 100})
		type capAt struct {
			pct int
			at  time.Time
		}
		capCh := make(chan capAt, 16)
		sctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = src.Run(sctx, func(s owner.Sample) {
				d := dec.Observe(s, yield.Guest{})
				if d.Changed && d.CPUCapPercent < 100 {
					err := SetCPUCap(cgroups, d.CPUCapPercent, vcpus)
					if err == nil {
						capCh <- capAt{d.CPUCapPercent, time.Now()}
					}
				}
			})
		}()
		waitTicks(ctx, time.Second) // the quiet host sets the baseline
		if len(capCh) > 0 {
			// The host's own noise set a cap before the owner started: not a clean trial.
			early++
			stop()
			<-done
			continue
		}

		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
		cmd.Env = append(os.Environ(), helperEnv+"=spin=100000000000")
		in, err := cmd.StdinPipe()
		must.NoError(b, err)
		must.NoError(b, cmd.Start())
		must.NoError(b, os.WriteFile(filepath.Join(ownerDir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644))
		onset := time.Now()
		_, _ = in.Write([]byte{1})

		// Wait for the cap of the owner's band, noting when the first cap came.
		var firstAt, bandAt time.Time
		band := 0
		deadline := time.After(3 * time.Second)
	wait:
		for {
			select {
			case c := <-capCh:
				if firstAt.IsZero() {
					firstAt = c.at
				}
				if c.pct <= 25 {
					bandAt, band = c.at, c.pct
					break wait
				}
			case <-deadline:
				break wait
			case <-ctx.Done():
				break wait
			}
		}
		if !bandAt.IsZero() {
			capCores := float64(band) / 100 * float64(vcpus)
			_, h := watchCap(ctx, cgroups, 0, bandAt, capCores, CPUCapPeriod, 2*time.Second)
			first = append(first, firstAt.Sub(onset))
			decided = append(decided, bandAt.Sub(onset))
			if h >= 0 {
				held = append(held, bandAt.Sub(onset)+h)
			}
			caps[band]++
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		in.Close()
		stop()
		<-done
		waitTicks(ctx, 200*time.Millisecond)
	}
	tw := newTable("cap onset, %s: owner process starts → VM held to its band's cap, through the proc source, the Decider and SetCPUCap; %d of %d trials reached the band %v; %d trials dropped because sensing noise had set a cap in the quiet second before the onset (host load %s)",
		v.name, len(held), trials, caps, early, loadAvg())
	if len(held) == 0 {
		tw.Flush()
		return
	}
	fmt.Fprintln(tw, "step\tp50\tp99\tmax\t")
	for _, r := range []struct {
		name string
		ds   []time.Duration
	}{{"first cap set", first}, {"band's cap set", decided}, {"VM held to the band's cap", held}} {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", r.name, ms(median(r.ds)), ms(percentile(r.ds, 99)), ms(slices.Max(r.ds)))
	}
	tw.Flush()
	fmt.Println("  held: the end of the first CFS period after the cap was set in which the VM used no more than it (+5% of a core)")
	if v.totalCgroup != "" {
		b.ReportMetric(float64(percentile(held, 99))/1e6, "onset-held-p99-ms")
		b.ReportMetric(float64(median(held))/1e6, "onset-held-p50-ms")
		b.ReportMetric(float64(early), "noise-caps")
	}
}

// watchCap samples the cgroup's CPU usage every millisecond after a cap was set at start and
// returns when it was first throttled and when a whole window (one CFS period: the cap
// holds per period) first stayed within capCores.
func watchCap(ctx context.Context, cgroups []string, thr0 int64, start time.Time, capCores float64, window, limit time.Duration) (throttled, held time.Duration) {
	type sample struct {
		at    time.Duration
		usage time.Duration
	}
	u, _ := CPUUsage(cgroups)
	samples := []sample{{0, u}}
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	throttled, held = -1, -1
	for time.Since(start) < limit && (throttled < 0 || held < 0) {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Since(start)
		u, _ := CPUUsage(cgroups)
		samples = append(samples, sample{now, u})
		if throttled < 0 && throttledCount(cgroups) > thr0 {
			throttled = now
		}
		if held < 0 && now >= window {
			// The latest sample at least a window ago.
			i := len(samples) - 1
			for i > 0 && samples[i].at > now-window {
				i--
			}
			rate := float64(u-samples[i].usage) / float64(now-samples[i].at)
			if rate <= capCores+0.05 {
				held = now
			}
		}
	}
	return throttled, held
}

// throttledCount is cpu.stat's nr_throttled of the first cgroup that has it.
func throttledCount(cgroups []string) int64 {
	for _, d := range cgroups {
		b, err := os.ReadFile(filepath.Join(d, "cpu.stat"))
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "nr_throttled "); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				return n
			}
		}
	}
	return 0
}

// waitTicks waits d, or until ctx ends; benchmarks measure over time windows.
func waitTicks(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func benchHarvest(b *testing.B, ctx context.Context, m *Machine, cgroups []string) {
	const window = 3 * time.Second
	spec := m.Spec()
	rates := make(map[string][]float64)
	for range benchTrials - 1 {
		for _, p := range []vmPolicy{vmPolicies[0], vmPolicies[3]} {
			must.NoError(b, resetPolicy(m, cgroups))
			must.NoError(b, p.apply(m, cgroups))
			n0, u0, i0, t0 := lines(spec.Stdout), mustUsage(b, cgroups), idleTime(), time.Now()
			waitTicks(ctx, window)
			n1, u1, i1, t1 := lines(spec.Stdout), mustUsage(b, cgroups), idleTime(), time.Now()
			d := t1.Sub(t0)
			vm, idle := float64(u1-u0)/float64(d), float64(i1-i0)/float64(d)
			rates[p.name] = append(rates[p.name], float64(n1-n0)*1000/d.Minutes())
			rates[p.name+"-cpu"] = append(rates[p.name+"-cpu"], vm)
			rates[p.name+"-idle"] = append(rates[p.name+"-idle"], idle)
		}
	}
	must.NoError(b, resetPolicy(m, cgroups))
	base := median(rates["normal"])
	tw := newTable("harvest: guest loop rounds per minute, %d windows of %s (host load %s)",
		benchTrials-1, window, loadAvg())
	fmt.Fprintln(tw, "vm\trounds/min p50\tVM cores\thost idle cores\tvs unmanaged\t")
	for _, name := range []string{"normal", "deskvm"} {
		fmt.Fprintf(tw, "%s\t%.0f\t%.2f\t%.2f\t%.1f%%\t\n", name, median(rates[name]), median(rates[name+"-cpu"]),
			median(rates[name+"-idle"]), 100*median(rates[name])/base)
	}
	tw.Flush()
	fmt.Println("  the owner is away only if nothing else runs on the host: other load takes the CPU a deskvm VM yields")
	b.ReportMetric(100*median(rates["deskvm"])/base, "harvest-%")
}

// idleTime is the host's idle CPU time so far, all cores together (/proc/stat).
func idleTime() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait ...
	if len(f) < 6 {
		return 0
	}
	idle, _ := strconv.ParseInt(f[4], 10, 64)
	iowait, _ := strconv.ParseInt(f[5], 10, 64)
	return time.Duration(idle+iowait) * time.Second / 100 // USER_HZ
}

func mustUsage(b *testing.B, cgroups []string) time.Duration {
	u, err := CPUUsage(cgroups)
	must.NoError(b, err)
	return u
}

// BenchmarkBalloon measures how fast a guest hands 1 GiB back: from SetBalloon to
// query-balloon reporting the target. The guest inflates the balloon itself, so it needs
// CPU: the trials run it in the normal class (the owner wants memory, not CPU), then once
// under deskvm's idle settings, where it gets only the CPU the host leaves over.
func BenchmarkBalloon(b *testing.B) {
	requireQEMU(b)
	ctx := b.Context()
	const memMiB, giveMiB, trials = 1536, 1024, 3
	const idleLimit = 20 * time.Second
	target := memMiB - giveMiB
	cgroups := testCgroups(b)
	spec := testSpec(b, "bench-balloon", 1, memMiB)
	spec.CgroupDirs = cgroups
	m := startTestVM(b, ctx, spec)
	// Touch most of the guest's memory once (two tmpfs files: each tmpfs takes at most half
	// the RAM), so that handing it back frees host memory.
	startCommand(b, ctx, m, "dd if=/dev/zero of=/tmp/a bs=1M count=600 2>/dev/null; dd if=/dev/zero of=/dev/shm/b bs=1M count=600 2>/dev/null; rm /tmp/a /dev/shm/b; echo touched; while :; do sleep 1; done")
	waitFor(b, ctx, 3*time.Minute, "the guest to touch its memory", func() bool { return lines(spec.Stdout) > 0 })

	var took []time.Duration
	rss0 := rssMiB(m.PID())
	var rss1 int
	for range trials {
		d, _, _ := balloonTo(b, ctx, m, target, time.Minute)
		must.Positive(b, d, must.Sprint("the guest did not hand back 1 GiB within a minute"))
		took = append(took, d)
		rss1 = rssMiB(m.PID())
		deflate(b, ctx, m, memMiB)
	}
	must.NoError(b, SetIdleClass(m.PID()))
	must.NoError(b, SetCgroupIdle(cgroups[0]))
	idleTook, idleAt, _ := balloonTo(b, ctx, m, target, idleLimit)
	must.NoError(b, ClearCgroupIdle(cgroups[0]))
	must.NoError(b, SetNormalClass(m.PID()))

	tw := newTable("balloon: %d MiB guest hands back %d MiB (host load %s)", memMiB, giveMiB, loadAvg())
	fmt.Fprintln(tw, "vm\ttrials\tp50\tmin\tmax\tQEMU RSS before\tafter\t")
	fmt.Fprintf(tw, "normal class\t%d\t%s\t%s\t%s\t%d MiB\t%d MiB\t\n", trials, ms(median(took)), ms(slices.Min(took)), ms(slices.Max(took)), rss0, rss1)
	idleRes := ms(idleTook)
	if idleTook < 0 {
		idleRes = fmt.Sprintf("> %s (at %d MiB)", idleLimit, idleAt)
	}
	fmt.Fprintf(tw, "deskvm idle\t1\t%s\t\t\t\t\t\n", idleRes)
	tw.Flush()
	b.ReportMetric(median(took).Seconds(), "handback-1GiB-s")
}

// balloonTo sets the balloon's target and waits until the guest is there or limit passes; it
// returns how long that took (-1 if it did not get there), where the guest got, and QEMU's
// highest RSS on the way.
func balloonTo(b *testing.B, ctx context.Context, m *Machine, target int, limit time.Duration) (took time.Duration, actual, peakRSS int) {
	b.Helper()
	start := time.Now()
	must.NoError(b, m.SetBalloon(ctx, target))
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		peakRSS = max(peakRSS, rssMiB(m.PID()))
		a, err := m.Balloon(ctx)
		must.NoError(b, err)
		if a <= target {
			return time.Since(start), a, peakRSS
		}
		if time.Since(start) > limit {
			return -1, a, peakRSS
		}
		select {
		case <-ctx.Done():
			must.NoError(b, ctx.Err())
		case <-tick.C:
		}
	}
}

// deflate gives the guest all of its memMiB back and waits until it has it.
func deflate(b *testing.B, ctx context.Context, m *Machine, memMiB int) {
	b.Helper()
	must.NoError(b, m.SetBalloon(ctx, memMiB))
	waitFor(b, ctx, 2*time.Minute, "the balloon to give the memory back", func() bool {
		a, err := m.Balloon(ctx)
		return err == nil && a == memMiB
	})
}

// rssMiB is the resident memory of pid.
func rssMiB(pid int) int {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb >> 10
		}
	}
	return 0
}

// fillScript keeps 200 MiB of non-zero data in guest memory (a tmpfs file, below the tmpfs
// limit of half the guest's RAM), as a real job would, then counts.
const fillScript = "yes 0123456789abcdef | head -c 200m > /tmp/blob; i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done"

// BenchmarkCheckpoint measures checkpoint and restore of a 512 MiB guest that counts, in a
// chain (each restored VM is checkpointed again), and the work redone after each restore;
// then savevm of the last VM into a qcow2 image, for comparison.
func BenchmarkCheckpoint(b *testing.B) {
	requireQEMU(b)
	ctx := b.Context()
	const trials = 3
	dirRoot := b.TempDir()
	spec := testSpec(b, "bench-ckpt", 1, 512)
	m := startTestVM(b, ctx, spec)
	startCommand(b, ctx, m, fillScript)
	waitFor(b, ctx, 3*time.Minute, "the guest to fill its memory", func() bool { return lines(spec.Stdout) >= 5 })

	// savevm needs a qcow2 image to write to. A drive that no device uses is not part of
	// the migrated state, so the last VM of the chain can have one.
	img := filepath.Join(dirRoot, "vmstate.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "1G").CombinedOutput()
	must.NoError(b, err, must.Sprintf("qemu-img create: %s", out))

	type row struct {
		cp      Checkpoint
		restore time.Duration
		redone  int
	}
	var rows []row
	for i := range trials {
		dir := filepath.Join(dirRoot, strconv.Itoa(i))
		cp, err := m.Checkpoint(ctx, dir)
		must.NoError(b, err)
		last := counts(b, spec.Stdout)
		spec.Stdout = filepath.Join(dirRoot, fmt.Sprintf("stdout.%d", i))
		if i == trials-1 {
			spec.ExtraArgs = []string{"-drive", "if=none,id=vmstate,format=qcow2,file=" + img}
		}
		start := time.Now()
		m2, err := Restore(ctx, spec, dir)
		must.NoError(b, err)
		b.Cleanup(func() { stopTestVM(b, m2) })
		must.NoError(b, m2.Resume(ctx))
		restore := time.Since(start)
		waitFor(b, ctx, time.Minute, "the restored guest to count", func() bool { return lines(spec.Stdout) >= 2 })
		next := counts(b, spec.Stdout)
		// 0 when the count carries on from the next number: nothing redone, nothing lost.
		rows = append(rows, row{cp, restore, last[len(last)-1] + 1 - next[0]})
		m = m2
	}

	mon, err := m.Monitor()
	must.NoError(b, err)
	fi0, err := os.Stat(img)
	must.NoError(b, err)
	start := time.Now()
	var hmp string
	must.NoError(b, mon.Execute(ctx, "human-monitor-command", map[string]any{"command-line": "savevm ckpt"}, &hmp))
	savevm := time.Since(start)
	must.Eq(b, "", strings.TrimSpace(hmp), must.Sprint("savevm output"))
	fi1, err := os.Stat(img)
	must.NoError(b, err)

	tw := newTable("checkpoint of a 512 MiB guest holding 200 MiB of data, %d in a chain (host load %s)", trials, loadAvg())
	fmt.Fprintln(tw, "#\tstate\tpaused (save+sync+quit)\tsave\trestore+cont\twork redone\t")
	var paused, restores []time.Duration
	var sizes []float64
	for i, r := range rows {
		fmt.Fprintf(tw, "%d\t%d MiB\t%s\t%s\t%s\t%d counts\t\n", i+1, r.cp.StateBytes>>20, ms(r.cp.Paused), ms(r.cp.Save), ms(r.restore), r.redone)
		paused = append(paused, r.cp.Paused)
		restores = append(restores, r.restore)
		sizes = append(sizes, float64(r.cp.StateBytes>>20))
	}
	fmt.Fprintf(tw, "savevm\t%d MiB (qcow2 grew)\t\t%s\t\t\t\n", (fi1.Size()-fi0.Size())>>20, ms(savevm))
	tw.Flush()
	b.ReportMetric(median(paused).Seconds(), "checkpoint-s")
	b.ReportMetric(median(restores).Seconds(), "restore-s")
	b.ReportMetric(median(sizes), "state-MiB")
	b.ReportMetric(savevm.Seconds(), "savevm-s")
}

// Table output.

func newTable(title string, a ...any) *tabwriter.Writer {
	fmt.Printf("\n== "+title+"\n", a...)
	return tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
}

func ms(d time.Duration) string {
	if d < 0 {
		return "never"
	}
	return fmt.Sprintf("%.0f ms", float64(d)/1e6)
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// median of a non-empty sample (the mean of the middle two for an even count).
func median[T ~int64 | ~float64](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile by nearest rank; with few samples, p99 is the largest.
func percentile(xs []time.Duration, p float64) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}
