// Command devctl starts and stops the single-machine deskcloud of `make dev`: a Nomad agent
// (server and client) with the deskvm plugin, state in .dev/, and the hello job.
//
//	go run ./scripts/devctl up    # start (or reuse) the agent and run jobs/hello.nomad.hcl
//	go run ./scripts/devctl down  # stop the jobs and the agent
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/e2e/cluster"
	"github.com/hashicorp/nomad/api"
)

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "up" && os.Args[1] != "down") {
		fmt.Fprintln(os.Stderr, "usage: devctl up|down")
		os.Exit(2)
	}
	var err error
	if os.Args[1] == "up" {
		err = up()
	} else {
		err = down()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "devctl:", err)
		os.Exit(1)
	}
}

func options() (cluster.Options, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return cluster.Options{}, err
	}
	return cluster.Defaults(cluster.Options{
		Name:     "deskcloud-dev",
		Dir:      filepath.Join(root, ".dev"),
		HTTPPort: 4646, RPCPort: 4647, SerfPort: 4648,
		LogLevel: "INFO",
		// Yield is on, sensing the owner's keyboard, mouse and screen lock. CPU sensing
		// ("proc") is left out here: on a build or CI machine every compile is the
		// "owner", and the demo job would spend its life capped. Add it on a desktop.
		DeskvmConfig: fmt.Sprintf("    owner {\n      sources        = [\"input\", \"logind\"]\n      forecast_state = %q\n    }",
			filepath.Join(root, ".dev", "forecast.model")),
	})
}

func up() error {
	o, err := options()
	if err != nil {
		return err
	}
	a, err := cluster.Attach(o)
	if err == nil && a.Healthy() {
		fmt.Printf("==> reusing the Nomad agent already running (pid %d)\n", a.PID())
	} else {
		fmt.Println("==> starting a Nomad agent (server and client) with the deskvm plugin")
		if a, err = cluster.Start(o); err != nil {
			return err
		}
	}
	fmt.Println("==> waiting for the node and deskvm (deskvm probes the accelerator by booting a guest)")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := a.WaitReady(ctx); err != nil {
		return err
	}
	root, _ := cluster.RepoRoot()
	jobFile := filepath.Join(root, "jobs", "hello.nomad.hcl")
	// Nomad does not run an unchanged batch job again: purge the last run first.
	if _, _, err := a.Client.Jobs().Deregister("hello", true, nil); err != nil {
		return fmt.Errorf("purge the previous hello job: %w", err)
	}
	fmt.Println("==> running jobs/hello.nomad.hcl")
	job, err := a.RunJobFile(jobFile, nil)
	if err != nil {
		return err
	}
	started := time.Now()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Registering a new version makes a new allocation; wait for one newer than this run.
	alloc, err := a.WaitAlloc(ctx, *job.ID, "the hello allocation to finish", func(al *api.Allocation) bool {
		return time.Unix(0, al.CreateTime).After(started.Add(-time.Second)) && cluster.Terminal(al)
	})
	if err != nil {
		return err
	}
	out, _ := a.Logs(alloc, "pi", "stdout")
	fmt.Printf("==> allocation %s %s in %s; its output:\n", alloc.ID[:8], alloc.ClientStatus, time.Since(started).Round(100*time.Millisecond))
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		fmt.Println("    " + l)
	}
	fmt.Printf("\nNomad UI:  %s/ui\nCLI:       export NOMAD_ADDR=%s; .deps/bin/nomad status\nStop with: make dev-stop\n", o.Address(), o.Address())
	if alloc.ClientStatus != api.AllocClientStatusComplete {
		return fmt.Errorf("hello job %s; events: %q", alloc.ClientStatus, cluster.Events(alloc, "pi"))
	}
	return nil
}

func down() error {
	o, err := options()
	if err != nil {
		return err
	}
	a, err := cluster.Attach(o)
	if err != nil {
		fmt.Println("==> no dev agent is running")
		return nil
	}
	if a.Healthy() {
		jobs, _, err := a.Client.Jobs().List(nil)
		if err == nil {
			for _, j := range jobs {
				if j.Status == "dead" {
					continue
				}
				fmt.Printf("==> stopping job %s\n", j.ID)
				if _, _, err := a.Client.Jobs().Deregister(j.ID, false, nil); err != nil {
					return fmt.Errorf("stop job %s: %w", j.ID, err)
				}
			}
			waitJobsStopped(a)
		}
	}
	fmt.Printf("==> stopping the Nomad agent (pid %d)\n", a.PID())
	if err := a.Stop(30 * time.Second); err != nil {
		return err
	}
	if err := os.Remove(o.PIDPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// waitJobsStopped waits a while for every allocation to stop, so VMs are not left behind.
func waitJobsStopped(a *cluster.Agent) {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		allocs, _, err := a.Client.Allocations().List(nil)
		if err != nil {
			return
		}
		running := 0
		for _, al := range allocs {
			if al.ClientStatus == api.AllocClientStatusRunning || al.ClientStatus == api.AllocClientStatusPending {
				running++
			}
		}
		if running == 0 {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}
