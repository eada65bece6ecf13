package cluster

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/hashicorp/nomad/api"
)

// OneShotJob returns a batch job of one group "g" with one task "t" that is neither
// restarted nor rescheduled, for measurements, where a failed run must fail the measurement
// rather than be retried.
func OneShotJob(id, driver string, config map[string]any, res *api.Resources) *api.Job {
	job := api.NewBatchJob(id, id, "global", 50)
	tg := api.NewTaskGroup("g", 1)
	zero, no, fail := 0, false, "fail"
	tg.RestartPolicy = &api.RestartPolicy{Attempts: &zero, Mode: &fail}
	tg.ReschedulePolicy = &api.ReschedulePolicy{Attempts: &zero, Unlimited: &no}
	task := api.NewTask("t", driver)
	task.Config = config
	task.Resources = res
	tg.AddTask(task)
	job.AddTaskGroup(tg)
	return job
}

// RunJobFile parses a jobspec with the agent (as `nomad job run` does) and registers it.
// mutate, if set, edits the parsed job first, e.g. to give it a unique id.
func (a *Agent) RunJobFile(path string, mutate func(*api.Job)) (*api.Job, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	job, err := a.Client.Jobs().ParseHCL(string(src), true)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	if mutate != nil {
		mutate(job)
	}
	if _, _, err := a.Client.Jobs().Register(job, nil); err != nil {
		return nil, fmt.Errorf("register %s: %w", path, err)
	}
	return job, nil
}

// WaitAlloc waits for the job's first allocation to satisfy cond and returns it.
func (a *Agent) WaitAlloc(ctx context.Context, jobID string, what string, cond func(*api.Allocation) bool) (*api.Allocation, error) {
	var last string
	for {
		stubs, _, err := a.Client.Jobs().Allocations(jobID, true, nil)
		if err == nil && len(stubs) > 0 {
			alloc, _, err := a.Client.Allocations().Info(stubs[0].ID, nil)
			if err == nil {
				if cond(alloc) {
					return alloc, nil
				}
				last = alloc.ClientStatus
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("job %s: waiting for %s (last client status %q): %w", jobID, what, last, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Terminal is a WaitAlloc condition: the allocation has completed or failed.
func Terminal(a *api.Allocation) bool {
	return a.ClientStatus == api.AllocClientStatusComplete || a.ClientStatus == api.AllocClientStatusFailed ||
		a.ClientStatus == api.AllocClientStatusLost
}

// Running is a WaitAlloc condition: task is running.
func Running(task string) func(*api.Allocation) bool {
	return func(a *api.Allocation) bool {
		ts, ok := a.TaskStates[task]
		return ok && ts.State == "running"
	}
}

// Logs returns the whole stdout or stderr log of a task.
func (a *Agent) Logs(alloc *api.Allocation, task, stream string) (string, error) {
	r, err := a.Client.AllocFS().Cat(alloc, "alloc/logs/"+task+"."+stream+".0", nil)
	if err != nil {
		return "", err
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	return string(b), err
}

// Events returns the task's event messages, oldest first, as `nomad alloc status` shows them.
func Events(alloc *api.Allocation, task string) []string {
	ts, ok := alloc.TaskStates[task]
	if !ok {
		return nil
	}
	var out []string
	for _, e := range ts.Events {
		msg := e.Type
		if e.DisplayMessage != "" {
			msg += ": " + e.DisplayMessage
		}
		out = append(out, msg)
	}
	return out
}
