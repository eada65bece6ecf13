// Command coldstart measures how fast a task starts, side by side in one run:
//
//   - deskvm: a real Nomad agent runs a deskvm job; submitted → guest command running (the
//     task's Started event, which deskvm sends once the guest command runs) and
//     submitted → allocation complete for a command that exits at once;
//   - qemu driver: Nomad's built-in qemu driver boots the same kernel and initramfs, whose
//     agent powers off at once (submitted → allocation complete);
//   - bare QEMU: qemu-system-x86_64 started directly: exec → guest command running (the guest
//     agent answers and starts the command) and exec → exit for the power-off-at-once guest.
//
// It prints medians and ratios to deskvm. Run it with `make bench`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/guestkit"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/e2e/cluster"
	"github.com/hashicorp/nomad/api"
	"github.com/hashicorp/nomad/helper/uuid"
)

func main() {
	runs := flag.Int("runs", 5, "runs of each measurement")
	flag.Parse()
	if err := run(*runs); err != nil {
		fmt.Fprintln(os.Stderr, "coldstart:", err)
		os.Exit(1)
	}
}

type series struct {
	name    string
	samples []time.Duration
}

func (s *series) median() time.Duration {
	if len(s.samples) == 0 {
		return 0
	}
	c := slices.Clone(s.samples)
	slices.Sort(c)
	return c[len(c)/2]
}

func run(runs int) error {
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	kit := filepath.Join(root, ".deps", "guest")
	// Boot the kernel deskvm boots.
	kernel, initrd, err := guestkit.BootFiles(kit)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	fmt.Fprintln(os.Stderr, "==> starting a Nomad agent with deskvm")
	a, stopAgent, err := cluster.StartScratch(ctx, cluster.Options{
		Name: "deskcloud-bench", LogLevel: "INFO",
		// Cold start is measured without yield: the idle CPU class would measure this
		// machine's other load instead.
		DeskvmConfig: "    yield {\n      enabled = false\n    }\n    owner {\n      sources        = []\n      forecast_state = \"\"\n    }",
	})
	if err != nil {
		return err
	}
	defer stopAgent()
	state := a.Options().StateDir
	if err := waitDriver(ctx, a, "qemu"); err != nil {
		return err
	}

	deskRunning := &series{name: "deskvm: submitted → guest command running"}
	deskDone := &series{name: "deskvm: submitted → complete (command exits at once)"}
	qemuDone := &series{name: "qemu driver: submitted → complete (guest powers off at once)"}
	bareRunning := &series{name: "bare QEMU: exec → guest command running"}
	bareDone := &series{name: "bare QEMU: exec → exit (guest powers off at once)"}

	for i := range runs {
		fmt.Fprintf(os.Stderr, "==> run %d of %d\n", i+1, runs)
		r, d, err := deskvmJob(a)
		if err != nil {
			return fmt.Errorf("deskvm job: %w", err)
		}
		deskRunning.samples = append(deskRunning.samples, r)
		deskDone.samples = append(deskDone.samples, d)

		d, err = qemuDriverJob(a, kit, kernel, initrd)
		if err != nil {
			return fmt.Errorf("qemu driver job: %w", err)
		}
		qemuDone.samples = append(qemuDone.samples, d)

		r, err = bareCommand(state, kernel, initrd)
		if err != nil {
			return fmt.Errorf("bare qemu command: %w", err)
		}
		bareRunning.samples = append(bareRunning.samples, r)
		d, err = bareProbe(kernel, initrd)
		if err != nil {
			return fmt.Errorf("bare qemu probe: %w", err)
		}
		bareDone.samples = append(bareDone.samples, d)
	}

	accel := "tcg"
	if id, err := a.NodeID(); err == nil {
		if n, _, err := a.Client.Nodes().Info(id, nil); err == nil {
			accel = n.Attributes["driver.deskvm.accelerator"]
		}
	}
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("cold start, %d runs each, accelerator %s, kernel %s, load average %s, medians:\n\n",
		runs, accel, filepath.Base(kernel), strings.Join(strings.Fields(string(load))[:3], " "))
	fmt.Printf("| %-62s | %8s | %s |\n", "measure", "median", "vs deskvm")
	fmt.Printf("|%s|%s|%s|\n", strings.Repeat("-", 64), strings.Repeat("-", 10), strings.Repeat("-", 11))
	row := func(s *series, base *series) {
		ratio := float64(s.median()) / float64(base.median())
		fmt.Printf("| %-62s | %7.2fs | %8.2f× |\n", s.name, s.median().Seconds(), ratio)
	}
	row(deskRunning, deskRunning)
	row(bareRunning, deskRunning)
	row(deskDone, deskDone)
	row(qemuDone, deskDone)
	row(bareDone, deskDone)
	return nil
}

func waitDriver(ctx context.Context, a *cluster.Agent, name string) error {
	for {
		id, err := a.NodeID()
		if err == nil {
			if n, _, err := a.Client.Nodes().Info(id, nil); err == nil {
				if d, ok := n.Drivers[name]; ok && d.Healthy {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("driver %s never became healthy: %w", name, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func batchJob(id, driver string, config map[string]any) *api.Job {
	return cluster.OneShotJob(id, driver, config, &api.Resources{CPU: pointer(1000), MemoryMB: pointer(256)})
}

func pointer[T any](v T) *T { return &v }

// submit registers job and waits until it is complete, returning the time from submission to
// the task's Started event and to completion.
func submit(a *cluster.Agent, job *api.Job) (started, done time.Duration, err error) {
	t0 := time.Now()
	if _, _, err := a.Client.Jobs().Register(job, nil); err != nil {
		return 0, 0, err
	}
	defer a.Client.Jobs().Deregister(*job.ID, true, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	alloc, err := a.WaitAlloc(ctx, *job.ID, "completion", cluster.Terminal)
	if err != nil {
		return 0, 0, err
	}
	if alloc.ClientStatus != api.AllocClientStatusComplete {
		return 0, 0, fmt.Errorf("allocation %s: %q", alloc.ClientStatus, cluster.Events(alloc, "t"))
	}
	ts := alloc.TaskStates["t"]
	for _, e := range ts.Events {
		if e.Type == api.TaskStarted {
			started = time.Unix(0, e.Time).Sub(t0)
		}
	}
	return started, ts.FinishedAt.Sub(t0), nil
}

func deskvmJob(a *cluster.Agent) (running, done time.Duration, err error) {
	return submit(a, batchJob("bench-deskvm-"+uuid.Short(), "deskvm", map[string]any{"command": "/bin/true"}))
}

func qemuDriverJob(a *cluster.Agent, kit, kernel, initrd string) (time.Duration, error) {
	_, done, err := submit(a, batchJob("bench-qemu-"+uuid.Short(), "qemu", map[string]any{
		"image_path": filepath.Join(kit, guestkit.TestImageFile),
		"args": []string{"-kernel", kernel, "-initrd", initrd, "-append",
			"console=ttyS0 panic=-1 quiet deskvm.mode=probe", "-no-reboot"},
	}))
	return done, err
}

// bareCommand starts QEMU directly the way deskvm does, and the guest command over guestctl.
func bareCommand(state, kernel, initrd string) (time.Duration, error) {
	dir, err := os.MkdirTemp("", "deskcloud-bench-vm-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	spec := vm.Spec{
		Name: "deskvm-bench-" + uuid.Short(), StateDir: dir, SocketDir: filepath.Join(state, "bare"),
		QEMUBinary: "qemu-system-x86_64", Accelerator: vm.AccelTCG, CPUs: 1, MemoryMiB: 256,
		Kernel: kernel, Initrd: initrd, Append: vm.CommandAppend,
		Stdout: os.DevNull, Stderr: os.DevNull,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	m, err := vm.Start(ctx, spec)
	if err != nil {
		return 0, err
	}
	defer func() { _ = m.Kill(); _ = m.Wait(ctx); _ = m.Close(); _ = m.Cleanup() }()
	g, err := guestctl.Dial(ctx, spec.ControlSocket())
	if err != nil {
		return 0, err
	}
	defer g.Close()
	if err := g.Start(ctx, guestctl.Spec{TaskID: "bench", Command: "/bin/true"}); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// bareProbe boots the guest kit in probe mode (power off at once) with a plain QEMU command.
func bareProbe(kernel, initrd string) (time.Duration, error) {
	t0 := time.Now()
	out, err := exec.Command("qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet deskvm.mode=probe",
		"-serial", "null").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%w: %s", err, out)
	}
	return time.Since(t0), nil
}
