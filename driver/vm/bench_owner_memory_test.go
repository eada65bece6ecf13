package vm

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
)

// The owner-memory benchmark models a desktop smaller than this machine: a cgroup v1 memory
// cgroup holds both the VM's QEMU and the owner's program, the desktop's RAM is what they
// use at the start plus ownerHeadMiB, and the owner's MemAvailable is what that leaves. The
// owner's program asks for ownerMiB at ownerRate; the memory layer (yield.Decider, fed
// every owner.DefaultMemoryInterval and with the guest's memory every GuestStatsInterval, as
// the driver does) must hand the VM's memory back before the two together pass the
// desktop's RAM, where a real desktop would start swapping the owner out. The cgroup's peak
// usage (memory.max_usage_in_bytes) says whether they did. The RAM is not enforced as a
// limit: a process at a v1 limit with no swap is OOM-killed, and the largest is QEMU.
const (
	ownerVMMiB   = 1536
	ownerMiB     = 1536
	ownerRate    = 512 // MiB/s: a large program loading
	ownerHeadMiB = 1100
	ownerHogEnv  = "DESKCLOUD_OWNER_HOG_MIB"
	// ownerTrialLimit ends a trial that has not finished. It is shorter than the guest's 20 s between touches of its memory.
	ownerTrialLimit = 15 * time.Second
)

// TestOwnerMemoryHog is the owner's program of BenchmarkOwnerMemory, run in a child process:
// it does nothing unless DESKCLOUD_OWNER_HOG_MIB is set. Then it waits for a line on stdin,
// allocates and touches that many MiB at ownerRate, prints "allocated <ms>", and holds the
// memory until stdin closes.
func TestOwnerMemoryHog(t *testing.T) {
	n, err := strconv.Atoi(os.Getenv(ownerHogEnv))
	if err != nil {
		t.Skip("the owner's program of BenchmarkOwnerMemory; runs only as its child")
	}
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return
	}
	const chunk = 16
	start := time.Now()
	var held [][]byte
	for i := 0; i < n; i += chunk {
		b := make([]byte, chunk<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = 1
		}
		held = append(held, b)
		// Pace the demand: chunk i+chunk is due at (i+chunk)/ownerRate seconds.
		if due := time.Duration(float64(i+chunk) / ownerRate * float64(time.Second)); time.Since(start) < due {
			time.Sleep(due - time.Since(start))
		}
	}
	fmt.Printf("allocated %d\n", time.Since(start).Milliseconds())
	_, _ = io.Copy(io.Discard, in)
	_ = held
}

// BenchmarkOwnerMemory measures the memory layer end to end: from the owner's program
// starting to ask for memory on a desktop with little to spare, through sensing, the
// Decider and the balloon, to the VM's memory being back with the owner. It reports how
// long 1 GiB took to come back (the balloon's "actual" 1 GiB below where it was, and
// QEMU's resident memory 1 GiB lower) and by how much the VM and the owner together ever passed the desktop's
// RAM, where a real desktop swaps. The baseline is the same owner beside the same VM with
// the memory layer off.
func BenchmarkOwnerMemory(b *testing.B) {
	requireQEMU(b)
	ctx := b.Context()
	const trials = 3
	desk := deskMemoryCgroup(b)
	spec := testSpec(b, "bench-owner-mem", 1, ownerVMMiB)
	spec.CgroupDirs = append(testCgroups(b), desk)
	m := startTestVM(b, ctx, spec)
	// The guest's job touches most of its memory and frees it every 20 s, as a job between
	// steps does: the trials start right after, before the guest's free page reporting
	// (BenchmarkFreePageReporting) has given it back by itself.
	startCommand(b, ctx, m, "while :; do dd if=/dev/zero of=/tmp/a bs=1M count=600 2>/dev/null; dd if=/dev/zero of=/dev/shm/b bs=1M count=600 2>/dev/null; rm /tmp/a /dev/shm/b; echo touched; sleep 20; done")

	type result struct {
		firstAsk, balloon1G, rss1G, allocated, firstOver time.Duration
		overMiB                                          int
		rss0, rss1                                       int
	}
	trial := func(layer bool) result {
		n := lines(spec.Stdout)
		waitFor(b, ctx, time.Minute, "the guest to touch its memory", func() bool { return lines(spec.Stdout) > n })
		r := result{firstAsk: -1, balloon1G: -1, rss1G: -1, allocated: -1, firstOver: -1, rss0: rssMiB(m.PID())}
		actual0, err := m.Balloon(ctx)
		must.NoError(b, err)

		hog := exec.Command(os.Args[0], "-test.run=^TestOwnerMemoryHog$")
		hog.Env = append(os.Environ(), ownerHogEnv+"="+strconv.Itoa(ownerMiB))
		stdin, err := hog.StdinPipe()
		must.NoError(b, err)
		stdout, err := hog.StdoutPipe()
		must.NoError(b, err)
		must.NoError(b, hog.Start())
		defer func() { _ = stdin.Close(); _ = hog.Wait() }()
		must.NoError(b, os.WriteFile(filepath.Join(desk, "cgroup.procs"), []byte(strconv.Itoa(hog.Process.Pid)), 0o644))
		ram := int(cgroupInt(b, desk, "memory.usage_in_bytes")>>20) + ownerHeadMiB
		setCgroup(b, desk, "memory.max_usage_in_bytes", "0")
		usedMiB := func() int { return int(cgroupInt(b, desk, "memory.usage_in_bytes") >> 20) }

		allocated := make(chan time.Duration, 1)
		go func() {
			line, _ := bufio.NewReader(stdout).ReadString('\n')
			msec, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "allocated ")))
			if err != nil {
				allocated <- -1
				return
			}
			allocated <- time.Duration(msec) * time.Millisecond
		}()

		dec := yield.NewDecider(yield.DefaultPolicy(), yield.VMInfo{MemoryMiB: ownerVMMiB, BalloonMiB: ownerVMMiB})
		var guest yield.Guest
		readGuest := func() {
			a, err1 := m.Balloon(ctx)
			used, err2 := m.GuestMemory(ctx)
			if err1 == nil && err2 == nil {
				guest = yield.Guest{BalloonMiB: a, UsedMiB: used}
			}
		}
		// The driver has polled the guest's statistics all along; so does this, from
		// before the owner starts.
		waitFor(b, ctx, 10*time.Second, "the guest's memory statistics", func() bool { readGuest(); return guest.UsedMiB > 0 })

		start := time.Now()
		_, err = io.WriteString(stdin, "go\n")
		must.NoError(b, err)
		sample := time.NewTicker(owner.DefaultMemoryInterval)
		defer sample.Stop()
		poll := time.NewTicker(GuestStatsInterval)
		defer poll.Stop()
		watch := time.NewTicker(10 * time.Millisecond)
		defer watch.Stop()
		deadline := time.After(ownerTrialLimit)
		observe := func(now time.Time) {
			avail := ram - usedMiB()
			d := dec.Observe(owner.Sample{Time: now, Has: owner.HasMemory, MemAvailableMiB: avail, MemTotalMiB: ram}, guest)
			if d.Changed && d.BalloonMiB > 0 {
				must.NoError(b, m.SetBalloon(ctx, d.BalloonMiB))
				if r.firstAsk < 0 {
					r.firstAsk = time.Since(start)
				}
			}
		}
		done := func() bool {
			return r.allocated >= 0 && (!layer || r.balloon1G >= 0 && r.rss1G >= 0)
		}
		end := func() result {
			r.overMiB = max(0, int(cgroupInt(b, desk, "memory.max_usage_in_bytes")>>20)-ram)
			r.rss1 = rssMiB(m.PID())
			return r
		}
		for !done() {
			select {
			case <-ctx.Done():
				b.Fatal(ctx.Err())
			case <-deadline:
				b.Logf("trial (layer %t) stopped at %s: %+v", layer, ownerTrialLimit, r)
				return end()
			case now := <-sample.C:
				if layer {
					observe(now)
				}
			case <-poll.C:
				readGuest()
			case d := <-allocated:
				r.allocated = d
			case <-watch.C:
				if a, err := m.Balloon(ctx); err == nil && r.balloon1G < 0 && a <= actual0-1024 {
					r.balloon1G = time.Since(start)
				}
				if r.rss1G < 0 && rssMiB(m.PID()) <= r.rss0-1024 {
					r.rss1G = time.Since(start)
				}
				if r.firstOver < 0 && usedMiB() > ram {
					r.firstOver = time.Since(start)
				}
			}
		}
		return end()
	}
	var on, off []result
	for range trials {
		off = append(off, trial(false))
		on = append(on, trial(true))
		deflate(b, ctx, m, ownerVMMiB)
	}

	tw := newTable("owner memory: the owner's program asks for %d MiB at %d MiB/s on a desktop with %d MiB to spare, beside a %d MiB guest; memory sampled every %s (host load %s)",
		ownerMiB, ownerRate, ownerHeadMiB, ownerVMMiB, owner.DefaultMemoryInterval, loadAvg())
	fmt.Fprintln(tw, "memory layer\ttrial\tfirst balloon request\tballoon 1 GiB lower\tQEMU RSS 1 GiB lower\tQEMU RSS before\tafter\towner got it all in\tdesktop's RAM passed at\tpeak over the RAM\t")
	row := func(name string, i int, r result) {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d MiB\t%d MiB\t%s\t%s\t%d MiB\t\n", name, i+1, ms(r.firstAsk), ms(r.balloon1G), ms(r.rss1G), r.rss0, r.rss1, ms(r.allocated), ms(r.firstOver), r.overMiB)
	}
	var took []time.Duration
	over := 0
	for i := range trials {
		row("off (baseline)", i, off[i])
		row("deskvm", i, on[i])
		took = append(took, on[i].balloon1G)
		over = max(over, on[i].overMiB)
	}
	tw.Flush()
	b.ReportMetric(float64(over), "owner-over-ram-MiB")
	if slices.Min(took) >= 0 {
		b.ReportMetric(median(took).Seconds(), "owner-1GiB-back-s")
	}
}

// deskMemoryCgroup makes a cgroup v1 memory cgroup for the benchmark's desktop, and removes
// it at cleanup.
func deskMemoryCgroup(tb testing.TB) string {
	tb.Helper()
	root := "/sys/fs/cgroup/memory"
	if DetectCgroupMode("/sys/fs/cgroup") != CgroupV1 {
		tb.Skip("the owner-memory benchmark needs the cgroup v1 memory hierarchy at " + root)
	}
	if _, err := os.Stat(filepath.Join(root, "memory.limit_in_bytes")); err != nil {
		tb.Skip("the owner-memory benchmark needs the cgroup v1 memory hierarchy: " + err.Error())
	}
	dir := filepath.Join(root, fmt.Sprintf("deskcloud-bench-desk-%d-%d", os.Getpid(), time.Now().UnixNano()))
	must.NoError(tb, os.Mkdir(dir, 0o755))
	tb.Cleanup(func() { removeCgroup(dir) })
	return dir
}

func setCgroup(tb testing.TB, dir, file, value string) {
	tb.Helper()
	must.NoError(tb, writeCgroup(dir, file, value))
}

// cgroupInt reads a cgroup file holding one number.
func cgroupInt(tb testing.TB, dir, file string) int64 {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(dir, file))
	must.NoError(tb, err)
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	must.NoError(tb, err)
	return n
}
