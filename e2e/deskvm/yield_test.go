package deskvm_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/e2e/cluster"
	"github.com/hashicorp/nomad/api"
	"github.com/shoenig/test/must"
)

// yieldSteps is how many steps the checkpoint job counts. Under TCG a step takes about 0.1 s
// with the VM to itself; capped and idle-class beside the owner it makes next to no progress,
// so the job is still running when the checkpoint comes.
const yieldSteps = 300

// yieldPolicy is the yield block of TestYieldCheckpointResume's agent: the owner's CPU sensed
// for real and a policy with times short enough for a test.
const yieldPolicy = `    yield {
      cpu_idle_below      = 0.5
      cpu_busy_above      = 0.8
      load_window         = "1s"
      settle_after        = "2s"
      input_active_within = "5s"
      away_after          = "10s"
      cap_recover_after   = "2s"
      suspend_after       = "4s"
      resume_after        = "3s"
      checkpoint_after    = "8s"
    }`

// yieldOwnerConfig is the owner block of a yield agent: the live sources (%s; the proc
// source senses this machine's CPU and memory for real), input replayed from a named pipe
// (%q), and the forecast model kept in the agent's dir (%q).
const yieldOwnerConfig = `    owner {
      sources        = %s
      replay_file    = %q
      forecast_state = %q
    }`

// startYieldAgent starts a Nomad agent of the test's own whose deskvm plugin yields under
// policy (a yield block) to the owner of this machine, with the owner's input replayed from
// a named pipe that the returned trace writes, away to begin with. It holds agentMu until
// the test ends, and stops the agent and whatever jobs are left then.
func startYieldAgent(t *testing.T, name, policy string) (*cluster.Agent, *inputTrace) {
	t.Helper()
	agent(t) // skips where the machine cannot run e2e
	agentMu.Lock()
	t.Cleanup(agentMu.Unlock)
	return startYieldNode(t, name, policy, `["proc"]`, nil, "")
}

// startYieldNode starts a Nomad agent named deskcloud-e2e-name whose deskvm plugin yields
// under policy, senses the owner live from sources (an HCL list) and replays their input
// from a pipe that the returned trace writes. With servers it is a client only that joins
// them, with a cgroup parent of its own: a second desktop on this machine. Its checkpoints
// are signed with the key in keyFile, by default one of the agent's own. Its cleanup stops
// the jobs still on the node, waits for their VMs to end, then stops the agent.
func startYieldNode(t *testing.T, name, policy, sources string, servers []string, keyFile string) (*cluster.Agent, *inputTrace) {
	t.Helper()
	dir, err := os.MkdirTemp("", "deskcloud-e2e-"+name+"-")
	must.NoError(t, err)
	state, err := os.MkdirTemp("/tmp", "dvm-y")
	must.NoError(t, err)
	pipe := filepath.Join(dir, "owner-input.fifo")
	must.NoError(t, syscall.Mkfifo(pipe, 0o600))
	if keyFile == "" {
		keyFile = filepath.Join(dir, "checkpoint.key")
	}
	o := cluster.Options{
		Name: "deskcloud-e2e-" + name, Dir: dir, StateDir: state, StopWithParent: true, Servers: servers,
		DeskvmConfig: fmt.Sprintf("    checkpoint_key_file = %q\n", keyFile) + policy + "\n" +
			fmt.Sprintf(yieldOwnerConfig, sources, pipe, filepath.Join(dir, "forecast.model")),
	}
	if servers != nil {
		o.CgroupParent = "nomad-e2e-" + name
	}
	o, err = cluster.Defaults(o)
	must.NoError(t, err)
	a, err := cluster.Start(o)
	must.NoError(t, err)
	t.Cleanup(func() {
		stopNodeJobs(t, a)
		_ = a.Stop(30 * time.Second)
		if !t.Failed() {
			unmountUnder(dir)
			os.RemoveAll(dir)
			os.RemoveAll(state)
		} else {
			t.Logf("%s agent dir kept at %s", name, dir)
		}
	})
	input := startInputTrace(t, pipe)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	must.NoError(t, a.WaitReady(ctx))
	return a, input
}

// stopNodeJobs deregisters every job with allocations on a's node and waits up to 30 s for
// them to end there: a Nomad client that stops leaves its tasks running.
func stopNodeJobs(t *testing.T, a *cluster.Agent) {
	node, err := a.NodeID()
	if err != nil {
		return
	}
	allocs, _, err := a.Client.Nodes().Allocations(node, nil)
	if err != nil {
		return
	}
	for _, al := range allocs {
		_, _, _ = a.Client.Jobs().Deregister(al.JobID, true, nil)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		allocs, _, err := a.Client.Nodes().Allocations(node, nil)
		if err != nil || !slices.ContainsFunc(allocs, func(al *api.Allocation) bool { return !cluster.Terminal(al) }) {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("allocations on %s still running 30 s after their jobs were stopped", a.Options().Name)
}

// unmountUnder unmounts what is mounted below dir, deepest first: the secrets and private
// tmpfs of task dirs whose allocations the agent had not collected when it stopped, which
// would otherwise keep dir from being removed.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			points = append(points, f[4])
		}
	}
	slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
	for _, p := range points {
		_ = syscall.Unmount(p, syscall.MNT_DETACH)
	}
}

// inputTrace writes the owner's input idle time to the driver's replay pipe twice a second:
// 0 while the owner is at the keyboard, growing from an hour while they are away.
type inputTrace struct {
	mu       sync.Mutex
	present  bool
	leftAt   time.Time
	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

func startInputTrace(t *testing.T, pipe string) *inputTrace {
	tr := &inputTrace{leftAt: time.Now().Add(-time.Hour), stop: make(chan struct{}), done: make(chan struct{})}
	opened := make(chan struct{})
	var openOnce sync.Once
	go func() {
		defer close(tr.done)
		for {
			// Nomad may start the plugin more than once (a short-lived instance checks its
			// config), so the pipe's reader can go away; open it again for the next one.
			f, err := os.OpenFile(pipe, os.O_WRONLY, 0)
			if err != nil {
				return
			}
			openOnce.Do(func() { close(opened) })
			err = tr.write(f)
			f.Close()
			if err == nil {
				return // stopped
			}
		}
	}()
	select {
	case <-opened:
	case <-time.After(2 * time.Minute):
		t.Fatal("the deskvm plugin never opened its owner replay pipe")
	}
	t.Cleanup(tr.close)
	return tr
}

// write writes a sample twice a second until stopped (nil) or the reader goes (an error).
// Rows have no header, so a reader that joins midway reads them as well.
func (tr *inputTrace) write(f *os.File) error {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		tr.mu.Lock()
		idle := 0.0
		if !tr.present {
			idle = time.Since(tr.leftAt).Seconds()
		}
		tr.mu.Unlock()
		// CPU and memory are left empty: the proc source senses them for real.
		if _, err := fmt.Fprintf(f, "%s,,,%.1f,\n", time.Now().UTC().Format(time.RFC3339Nano), idle); err != nil {
			return err
		}
		select {
		case <-tr.stop:
			return nil
		case <-tick.C:
		}
	}
}

func (tr *inputTrace) setPresent(on bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.present && !on {
		tr.leftAt = time.Now()
	}
	tr.present = on
}

func (tr *inputTrace) close() {
	tr.stopOnce.Do(func() { close(tr.stop) })
	select {
	case <-tr.done:
	case <-time.After(5 * time.Second): // blocked opening a pipe nobody reads any more
	}
}

// ownerLoad is a real owner workload: one busy process per core, killed by pid.
type ownerLoad struct{ cmds []*exec.Cmd }

func startOwnerLoad(t *testing.T) *ownerLoad {
	l := &ownerLoad{}
	for range runtime.NumCPU() {
		cmd := exec.Command("/bin/sh", "-c", "while :; do :; done")
		must.NoError(t, cmd.Start())
		l.cmds = append(l.cmds, cmd)
	}
	t.Cleanup(l.stop)
	return l
}

func (l *ownerLoad) stop() {
	for _, c := range l.cmds {
		_ = c.Process.Signal(syscall.SIGKILL)
		_ = c.Wait()
	}
	l.cmds = nil
}

// chain is the checkpoint job's result computed here: step i hashes the previous hash and i.
func chain(n int) (lines []string, result string) {
	h := "seed"
	for i := 1; i <= n; i++ {
		sum := sha256.Sum256([]byte(h + " " + strconv.Itoa(i)))
		h = hex.EncodeToString(sum[:])[:16]
		lines = append(lines, fmt.Sprintf("step %d %s", i, h))
	}
	return lines, h
}

// TestYieldCheckpointResume runs jobs/checkpoint.nomad.hcl on an agent that yields to a real
// owner workload and a replayed input trace: the VM is capped, paused and checkpointed, the
// task is rescheduled and resumes from the checkpoint, and the job's output is exactly that
// of an undisturbed run.
func TestYieldCheckpointResume(t *testing.T) {
	a, input := startYieldAgent(t, "yield", yieldPolicy)

	job := runJob(t, a, "jobs/checkpoint.nomad.hcl", func(j *api.Job) {
		j.TaskGroups[0].Tasks[0].Config["args"] = []string{strconv.Itoa(yieldSteps)}
	})
	first := waitAlloc(t, a, job, "the count task running", 3*time.Minute, cluster.Running("count"))
	waitLogs(t, a, first, "step 10 ", 2*time.Minute)

	// The owner comes back: their programs take every core, then they type.
	load := startOwnerLoad(t)
	first = waitEvent(t, a, first.ID, "CPU capped at", time.Minute)
	input.setPresent(true)
	first = waitEvent(t, a, first.ID, "paused", time.Minute)
	first = waitEvent(t, a, first.ID, "checkpointed", 2*time.Minute)

	// The owner leaves; Nomad reschedules the task, which resumes from the checkpoint.
	load.stop()
	input.setPresent(false)
	assertChain(t, a, followChain(t, a, *job.ID, first, 8*time.Minute), yieldSteps)
}

// followChain returns the checkpointed allocation first and the allocations that replaced
// it, one after another, up to the one that completed. Usually that is the second; where
// this machine's other work counts as the owner's (the proc source cannot tell), a resumed
// VM may be checkpointed again, and its replacement resumes in turn.
func followChain(t *testing.T, a *cluster.Agent, jobID string, first *api.Allocation, timeout time.Duration) []*api.Allocation {
	t.Helper()
	chain := []*api.Allocation{first}
	deadline := time.Now().Add(timeout)
	for {
		next := waitReplacement(t, a, jobID, chain[len(chain)-1].ID, "ended", time.Until(deadline), cluster.Terminal)
		chain = append(chain, next)
		if next.ClientStatus == api.AllocClientStatusComplete {
			return chain
		}
		t.Logf("allocation %d ended %s (events %q); following its replacement", len(chain), next.ClientStatus, cluster.Events(next, "count"))
	}
}

// assertChain checks a chain of allocations of the count job, each replacing the one before
// after a checkpoint: every one after the first resumed from a checkpoint, the last
// completed, each did some of the work, and their output together is byte-identical to an
// undisturbed run of steps steps, as is the result file. It logs every allocation's events.
func assertChain(t *testing.T, a *cluster.Agent, allocs []*api.Allocation, steps int) {
	t.Helper()
	last := allocs[len(allocs)-1]
	// Each later allocation resumed from its predecessor's checkpoint: its steps carry on
	// from the last one before it (checked with the whole output below), and its task
	// events say so, unless a busy life pushed that event out (Nomad keeps a task's last 10).
	for i, al := range allocs[1:] {
		events := cluster.Events(al, "count")
		must.True(t, len(events) >= 10 || slices.ContainsFunc(events, func(e string) bool { return strings.Contains(e, "from checkpoint") }),
			must.Sprintf("allocation %d must resume from the checkpoint; events: %q", i+2, events))
	}
	must.Eq(t, api.AllocClientStatusComplete, last.ClientStatus, must.Sprintf("events: %q", cluster.Events(last, "count")))

	var all string
	done := 0
	for i, al := range allocs {
		out, err := a.Logs(al, "count", "stdout")
		must.NoError(t, err)
		all += out
		n := len(stepLines(out))
		if i < len(allocs)-1 {
			must.Positive(t, n, must.Sprintf("allocation %d did some work before its checkpoint", i+1))
			t.Logf("allocation %d (%s) checkpointed after step %d of %d; the next went on from step %d", i+1, al.NodeName, done+n, steps, done+n+1)
		}
		done += n
	}
	want, result := chain(steps)
	must.Eq(t, want, stepLines(all), must.Sprint("the steps across the allocations must be those of an undisturbed run (0 steps redone)"))
	r, err := a.Client.AllocFS().Cat(last, "alloc/data/result", nil)
	must.NoError(t, err)
	b, err := io.ReadAll(r)
	r.Close()
	must.NoError(t, err)
	must.Eq(t, result+"\n", string(b), must.Sprint("the result file must equal an undisturbed run's"))
	for i, al := range allocs {
		for _, e := range cluster.Events(al, "count") {
			t.Logf("allocation %d: %s", i+1, e)
		}
	}
}

func stepLines(out string) []string {
	var lines []string
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, "step ") {
			lines = append(lines, l)
		}
	}
	return lines
}

// waitLogs waits until the task's stdout contains sub.
func waitLogs(t *testing.T, a *cluster.Agent, alloc *api.Allocation, sub string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, _ := a.Logs(alloc, "count", "stdout")
		if strings.Contains(out, sub) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stdout of %s never showed %q within %s; it holds:\n%s", alloc.ID, sub, timeout, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitEvent waits for a task event of the count task containing sub and returns the
// allocation as it then is.
func waitEvent(t *testing.T, a *cluster.Agent, allocID, sub string, timeout time.Duration) *api.Allocation {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		alloc, _, err := a.Client.Allocations().Info(allocID, nil)
		if err == nil {
			for _, e := range cluster.Events(alloc, "count") {
				if strings.Contains(e, sub) {
					return alloc
				}
			}
		}
		if time.Now().After(deadline) {
			var events []string
			if alloc != nil {
				events = cluster.Events(alloc, "count")
			}
			t.Fatalf("no task event %q within %s; events: %q", sub, timeout, events)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitSecondAlloc waits for the job's allocation that replaced prev to end.
func waitSecondAlloc(t *testing.T, a *cluster.Agent, jobID, prev string, timeout time.Duration) *api.Allocation {
	t.Helper()
	return waitReplacement(t, a, jobID, prev, "ended", timeout, cluster.Terminal)
}

// waitReplacement waits for the job's allocation that replaced prev to satisfy cond.
func waitReplacement(t *testing.T, a *cluster.Agent, jobID, prev, what string, timeout time.Duration, cond func(*api.Allocation) bool) *api.Allocation {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		stubs, _, err := a.Client.Jobs().Allocations(jobID, true, nil)
		if err == nil {
			for _, s := range stubs {
				if s.ID == prev {
					continue
				}
				alloc, _, err := a.Client.Allocations().Info(s.ID, nil)
				if err == nil && alloc.PreviousAllocation == prev && cond(alloc) {
					return alloc
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no allocation replacing %s %s within %s", prev, what, timeout)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
