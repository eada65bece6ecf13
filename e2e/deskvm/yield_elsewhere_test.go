package deskvm_test

import (
	"context"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/e2e/cluster"
	"github.com/hashicorp/nomad/api"
	"github.com/shoenig/test/must"
)

// TestYieldResumeElsewhere checkpoints a task on one desktop and resumes it on another. Two
// Nomad nodes run on this machine: desk-a (server and client) and desk-b (a client that
// joins it), each with its own deskvm plugin, state dir, cgroup parent and owner. The
// owners are replayed only (no live sources), so each node has one of its own: this
// machine's CPU is nobody's.
//
// desk-a's owner comes back. As the autoscaler does with a desktop whose owner is at it,
// desk-a is marked ineligible for new work; its VM is paused and then checkpointed into
// the task's local/. Nomad reschedules the task; desk-a being ineligible, it goes to desk-b,
// whose Nomad client fetches the previous allocation's local/ (the checkpoint with it) from
// desk-a's over HTTP (ephemeral_disk { sticky = true, migrate = true }). deskvm on desk-b
// resumes the VM from the checkpoint, and the job's output across both nodes is that of an
// undisturbed run.
//
// Then desk-a's owner leaves, and the work is moved off desk-b as the autoscaler moves it off
// a desktop ahead of its owner: desk-b is marked ineligible and the allocation stopped
// (`nomad alloc stop`, which has Nomad place a replacement; Nomad 1.11's node drain stops a
// batch job's allocations without one). deskvm checkpoints the task on its way out (its
// preemption is "checkpoint"), and the replacement on desk-a resumes from that checkpoint
// and completes. Output across the three allocations is again that of an undisturbed run.
func TestYieldResumeElsewhere(t *testing.T) {
	agent(t) // skips where the machine cannot run e2e
	agentMu.Lock()
	t.Cleanup(agentMu.Unlock)
	// The cluster's checkpoint key: every node has the same, or none could resume another's
	// checkpoints.
	key := filepath.Join(t.TempDir(), "checkpoint.key")
	a, ownerA := startYieldNode(t, "desk-a", yieldPolicy, "[]", nil, key)
	b, _ := startYieldNode(t, "desk-b", yieldPolicy, "[]", []string{a.Options().RPCAddress()}, key)
	nodeA, err := a.NodeID()
	must.NoError(t, err)
	nodeB, err := b.NodeID()
	must.NoError(t, err)

	// The job starts on desk-a: desk-b takes no work until desk-a's owner is back. With no
	// owner load on the CPU the VM runs at full speed, so the job has more steps than the
	// one-node test's.
	setEligible(t, a, nodeB, false)
	const steps = 3 * yieldSteps
	job := runJob(t, a, "jobs/checkpoint.nomad.hcl", func(j *api.Job) {
		j.TaskGroups[0].Tasks[0].Config["args"] = []string{strconv.Itoa(steps)}
	})
	first := waitAlloc(t, a, job, "the count task running", 3*time.Minute, cluster.Running("count"))
	must.Eq(t, nodeA, first.NodeID, must.Sprint("the job must start on desk-a"))
	waitLogs(t, a, first, "step 5 ", 2*time.Minute)

	// desk-a's owner sits down: desk-a takes no new work, desk-b (whose owner is away) does.
	ownerA.setPresent(true)
	setEligible(t, a, nodeA, false)
	setEligible(t, a, nodeB, true)
	first = waitEvent(t, a, first.ID, "paused", time.Minute)
	first = waitEvent(t, a, first.ID, "checkpointed", 2*time.Minute)

	second := waitReplacement(t, a, *job.ID, first.ID, "running", 5*time.Minute, cluster.Running("count"))
	must.Eq(t, nodeB, second.NodeID, must.Sprint("the task must resume on desk-b"))
	second = waitEvent(t, a, second.ID, "resumed from checkpoint", time.Minute)
	before := len(stepLines(logsOf(t, a, first)))
	waitLogs(t, a, second, "step "+strconv.Itoa(before+5)+" ", 2*time.Minute)

	// desk-a's owner leaves and desk-a takes work again; the work moves off desk-b.
	ownerA.setPresent(false)
	setEligible(t, a, nodeA, true)
	setEligible(t, a, nodeB, false)
	_, err = a.Client.Allocations().Stop(second, nil)
	must.NoError(t, err)
	third := waitReplacement(t, a, *job.ID, second.ID, "ended", 5*time.Minute, cluster.Terminal)
	must.Eq(t, nodeA, third.NodeID, must.Sprint("the drained task must resume on desk-a"))
	second, _, err = a.Client.Allocations().Info(second.ID, nil)
	must.NoError(t, err)
	assertChain(t, a, []*api.Allocation{first, second, third}, steps)
	must.True(t, slices.ContainsFunc(cluster.Events(second, "count"), func(e string) bool { return strings.Contains(e, "stopped by Nomad") }),
		must.Sprintf("the stop must checkpoint the task; events: %q", cluster.Events(second, "count")))
	t.Logf("checkpointed on %s, resumed on %s, checkpointed there when stopped, resumed on %s", first.NodeName, second.NodeName, third.NodeName)
}

func logsOf(t *testing.T, a *cluster.Agent, alloc *api.Allocation) string {
	t.Helper()
	out, err := a.Logs(alloc, "count", "stdout")
	must.NoError(t, err)
	return out
}

// setEligible marks a node eligible or ineligible for new allocations, as the autoscaler
// does with a desktop whose owner is back.
func setEligible(t *testing.T, a *cluster.Agent, node string, on bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, err := a.Client.Nodes().ToggleEligibility(node, on, (&api.WriteOptions{}).WithContext(ctx))
	must.NoError(t, err)
}
