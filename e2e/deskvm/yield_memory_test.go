package deskvm_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/e2e/cluster"
	"github.com/hashicorp/nomad/api"
	"github.com/shoenig/test/must"
)

const (
	// memoryGuestMiB is the guest RAM of the memory test's job: room for the balloon to
	// take memory back from a guest that uses a few tens of MiB.
	memoryGuestMiB = 512
	// memoryFloorMiB is the test agent's memory_floor.
	memoryFloorMiB = 96
	// memoryLowBelowStart puts memory_low_water this far below the MemAvailable measured when
	// the test starts: this machine has plenty free, and what the agent, its VM and the
	// machine's other processes take meanwhile must stay well above the low water.
	memoryLowBelowStart = 1280
	// memoryDeficitMiB is how far below the low water the hog drives MemAvailable: more than
	// the guest can give back (memoryGuestMiB - memoryFloorMiB), so that the shortfall
	// outlasts the balloon.
	memoryDeficitMiB = 768
	// memoryHandBackMiB is how much less memory the guest must see once the balloon has
	// taken it back: the hog's shortfall takes the balloon down to the floor, more than
	// this below the guest's memoryGuestMiB.
	memoryHandBackMiB = 256
	// memoryHogMaxMiB bounds the hog: never make the host swap or OOM.
	memoryHogMaxMiB = 3072
	// memorySteps is how many steps the job counts. The VM runs uncapped here, 20 to 100 ms
	// a step under TCG as the host is idle or busy, and the first allocation must still be
	// counting when the checkpoint comes, some 8 s after the hog starts.
	memorySteps = 1200
)

// memoryPolicy is the yield block of TestYieldMemory's agent (%d: memory_low_water,
// memory_high_water and memory_floor) and its harvest block, off: only the owner's memory
// moves the balloon here, never the forecast. CPU never counts: cpu_busy_above and the one
// cap band at a load of 1 cannot be passed, since this machine's other processes (a
// simulator now and then) are the "owner" the proc source senses. Memory is sensed for real.
const memoryPolicy = `    yield {
      cpu_idle_below         = 1
      cpu_busy_above         = 1
      load_window            = "1s"
      settle_after           = "2s"
      input_active_within    = "5s"
      away_after             = "10s"
      cpu_cap_step {
        load_above = 1
        percent    = 50
      }
      memory_low_water       = %d
      memory_high_water      = %d
      memory_floor           = %d
      memory_recover_after   = "2s"
      memory_shortfall_after = "6s"
    }
    harvest {
      enabled = false
    }`

// TestYieldMemory runs jobs/checkpoint.nomad.hcl on an agent that yields memory to a real
// owner: a memory hog on this machine drives MemAvailable below memory_low_water, so the
// balloon takes memory back from the guest (down to what it uses plus memory_floor); the
// shortfall the balloon cannot cover lasts memory_shortfall_after, so the VM is
// checkpointed and the task ends; the hog goes, Nomad reschedules the task, the new
// allocation resumes from the checkpoint, the guest gets its memory back, and the job's
// output is that of an undisturbed run.
func TestYieldMemory(t *testing.T) {
	start := time.Now()
	avail0 := memAvailableMiB(t)
	if avail0 < 2*memoryLowBelowStart+memoryHogMaxMiB {
		t.Skipf("the memory test needs %d MiB available on the host, got %d", 2*memoryLowBelowStart+memoryHogMaxMiB, avail0)
	}
	lowWater := avail0 - memoryLowBelowStart
	highWater := lowWater + 256
	a, _ := startYieldAgent(t, "yield-memory", fmt.Sprintf(memoryPolicy, lowWater, highWater, memoryFloorMiB))

	job := runJob(t, a, "jobs/checkpoint.nomad.hcl", func(j *api.Job) {
		task := j.TaskGroups[0].Tasks[0]
		task.Config["args"] = []string{strconv.Itoa(memorySteps)}
		mem := memoryGuestMiB
		task.Resources.MemoryMB = &mem
	})
	first := waitAlloc(t, a, job, "the count task running", 3*time.Minute, cluster.Running("count"))
	waitLogs(t, a, first, "step 10 ", 2*time.Minute)
	totalBefore := guestMemTotalMiB(t, a, first)

	// The owner's programs take memory: MemAvailable drops memoryDeficitMiB below the low
	// water, however much the agent and the machine's other processes took since the start.
	avail1 := memAvailableMiB(t)
	must.Greater(t, lowWater+256, avail1, must.Sprintf(
		"MemAvailable must still be well above memory_low_water (%d MiB) before the hog; it fell from %d to %d MiB since the test started",
		lowWater, avail0, avail1))
	hogMiB := avail1 - lowWater + memoryDeficitMiB
	must.Less(t, memoryHogMaxMiB, hogMiB, must.Sprintf("the hog would take %d MiB (MemAvailable %d MiB, low water %d MiB)", hogMiB, avail1, lowWater))
	hog := startMemoryHog(t, hogMiB)
	t.Logf("MemAvailable %d MiB at the start, %d MiB with the job running; memory_low_water %d MiB; the hog takes %d MiB", avail0, avail1, lowWater, hogMiB)

	// (1) The balloon hands memory back, and the guest really has less; never less than
	// memory_floor above what it uses.
	first = waitEvent(t, a, first.ID, "owner short of memory: guest shrunk to", time.Minute)
	totalAfter := waitGuestMemTotal(t, a, first, totalBefore-memoryHandBackMiB, 20*time.Second)
	first, _, err := a.Client.Allocations().Info(first.ID, nil)
	must.NoError(t, err)
	targets := eventMiBs(first, `(?:shrunk|grown) to (\d+) MiB`)
	must.GreaterEq(t, memoryFloorMiB, slices.Min(targets), must.Sprintf("the balloon never takes the guest below memory_floor; targets %v", targets))
	t.Logf("balloon targets %v MiB; guest MemTotal %d MiB before, %d MiB after: %d MiB handed back",
		targets, totalBefore, totalAfter, totalBefore-totalAfter)

	// (2) The guest cannot give back what the owner lacks: after memory_shortfall_after the
	// VM is checkpointed and the task ends.
	first = waitEvent(t, a, first.ID, "checkpoint: owner short of", time.Minute)
	first = waitEvent(t, a, first.ID, "checkpointed", 2*time.Minute)
	size := eventMiBs(first, `checkpointed (\d+) MiB in`)
	must.SliceLen(t, 1, size, must.Sprintf("one checkpoint; events: %q", cluster.Events(first, "count")))
	t.Logf("checkpointed %d MiB, %s after the test started", size[0], time.Since(start).Round(time.Second))

	// The owner's memory comes back; Nomad reschedules the task, which resumes from the
	// checkpoint, the guest gets its memory back, and the job finishes.
	hog.stop()
	allocs := followChain(t, a, *job.ID, first, 8*time.Minute)
	assertChain(t, a, allocs, memorySteps)
	must.StrContains(t, strings.Join(cluster.Events(allocs[len(allocs)-1], "count"), "\n"), "owner has memory to spare: guest grown to",
		must.Sprint("the resumed guest must get its memory back once the owner has it to spare"))
	t.Logf("the whole test took %s", time.Since(start).Round(time.Second))
}

// memAvailableMiB is the host's MemAvailable.
func memAvailableMiB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	must.NoError(t, err)
	return meminfoMiB(t, string(b), "MemAvailable")
}

// meminfoMiB reads a field of /proc/meminfo text in MiB.
func meminfoMiB(t *testing.T, meminfo, field string) int {
	t.Helper()
	for line := range strings.Lines(meminfo) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kib, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			must.NoError(t, err, must.Sprintf("meminfo line %q", line))
			return kib >> 10
		}
	}
	t.Fatalf("no %s in meminfo:\n%s", field, meminfo)
	return 0
}

// guestMemTotalMiB is MemTotal inside the count task's guest, through nomad alloc exec: the
// balloon takes what it holds out of it.
func guestMemTotalMiB(t *testing.T, a *cluster.Agent, alloc *api.Allocation) int {
	t.Helper()
	out, err := guestMeminfo(t, a, alloc)
	must.NoError(t, err)
	return meminfoMiB(t, out, "MemTotal")
}

func guestMeminfo(t *testing.T, a *cluster.Agent, alloc *api.Allocation) (string, error) {
	var stdout, stderr bytes.Buffer
	code, err := a.Client.Allocations().Exec(t.Context(), alloc, "count", false,
		[]string{"/bin/sh", "-c", "cat /proc/meminfo"}, strings.NewReader(""), &stdout, &stderr, nil, nil)
	if err == nil && code != 0 {
		err = fmt.Errorf("cat /proc/meminfo in the guest exited %d: %s", code, stderr.String())
	}
	return stdout.String(), err
}

// waitGuestMemTotal waits until the guest's MemTotal is at most want MiB and returns it.
func waitGuestMemTotal(t *testing.T, a *cluster.Agent, alloc *api.Allocation, want int, timeout time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := -1
	for {
		if out, err := guestMeminfo(t, a, alloc); err == nil {
			if last = meminfoMiB(t, out, "MemTotal"); last <= want {
				return last
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's MemTotal did not fall to %d MiB within %s; last seen %d MiB", want, timeout, last)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// eventMiBs returns the numbers that pattern's group captures in the count task's events,
// oldest first.
func eventMiBs(alloc *api.Allocation, pattern string) []int {
	re := regexp.MustCompile(pattern)
	var out []int
	for _, e := range cluster.Events(alloc, "count") {
		if m := re.FindStringSubmatch(e); m != nil {
			if n, err := strconv.Atoi(m[1]); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// hogEnv tells a run of this test binary to be a memory hog of that many MiB
// (TestMemoryHogProcess).
const hogEnv = "DESKCLOUD_E2E_MEMORY_HOG_MIB"

// memoryHog is a child process that holds memory, as the owner's programs would.
type memoryHog struct {
	cmd   *exec.Cmd
	stdin io.Closer
}

// startMemoryHog runs this test binary as a child that allocates and touches mib MiB, and
// returns once the memory is held. The hog ends at stop, at the end of the test, or when
// this process dies (its stdin closes).
func startMemoryHog(t *testing.T, mib int) *memoryHog {
	t.Helper()
	exe, err := os.Executable()
	must.NoError(t, err)
	cmd := exec.Command(exe, "-test.run=^TestMemoryHogProcess$")
	cmd.Env = append(os.Environ(), hogEnv+"="+strconv.Itoa(mib))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	must.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	must.NoError(t, err)
	must.NoError(t, cmd.Start())
	h := &memoryHog{cmd: cmd, stdin: stdin}
	t.Cleanup(h.stop)
	held := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if sc.Text() == "holding" {
				held <- true
				break
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		held <- false
	}()
	select {
	case ok := <-held:
		must.True(t, ok, must.Sprint("the memory hog ended before it held its memory"))
	case <-time.After(time.Minute):
		t.Fatalf("the memory hog did not hold %d MiB within a minute", mib)
	}
	return h
}

// stop ends the hog (by its pid) and waits for it; it is safe to call again.
func (h *memoryHog) stop() {
	if h.cmd == nil {
		return
	}
	_ = h.stdin.Close()
	_ = h.cmd.Process.Kill()
	_ = h.cmd.Wait()
	h.cmd = nil
}

// TestMemoryHogProcess is not a test of its own: it is the memory hog TestYieldMemory runs
// as a child process, and it skips otherwise.
func TestMemoryHogProcess(t *testing.T) {
	mib, err := strconv.Atoi(os.Getenv(hogEnv))
	if err != nil {
		t.Skip("the memory hog of TestYieldMemory: runs only as its child process")
	}
	b := make([]byte, mib<<20)
	for i := 0; i < len(b); i += os.Getpagesize() {
		b[i] = 1 // touch every page, so that the memory is resident
	}
	fmt.Println("holding")
	_, _ = io.Copy(io.Discard, os.Stdin) // until the parent closes stdin or dies
	runtime.KeepAlive(b)
}
