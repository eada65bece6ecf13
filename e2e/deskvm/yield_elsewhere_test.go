package deskvm_test

import (
	"context"
	"strconv"
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
func TestYieldResumeElsewhere(t *testing.T) {
	agent(t) // skips where the machine cannot run e2e
	agentMu.Lock()
	t.Cleanup(agentMu.Unlock)
	a, ownerA := startYieldNode(t, "desk-a", yieldPolicy, "[]", nil)
	b, _ := startYieldNode(t, "desk-b", yieldPolicy, "[]", []string{a.Options().RPCAddress()})
	nodeA, err := a.NodeID()
	must.NoError(t, err)
	nodeB, err := b.NodeID()
	must.NoError(t, err)

	// The job starts on desk-a: desk-b takes no work until desk-a's owner is back. With no
	// owner load on the CPU the VM runs at full speed, so the job has more steps than the
	// one-node test's.
	setEligible(t, a, nodeB, false)
	const steps = 2 * yieldSteps
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

	second := waitSecondAlloc(t, a, *job.ID, first.ID, 5*time.Minute)
	must.Eq(t, nodeB, second.NodeID, must.Sprint("the task must resume on desk-b"))
	assertResumed(t, a, first, second, steps)
	t.Logf("checkpointed on %s (%s), resumed on %s (%s)", first.NodeName, first.NodeID[:8], second.NodeName, second.NodeID[:8])
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
