package deskvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/driver/cloudinit"
	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// cgroupRoot is where the host's cgroup filesystem is mounted.
const cgroupRoot = "/sys/fs/cgroup"

// StartTask boots the task's VM. In command mode it returns once the guest command runs, so
// a command that cannot start, or a guest that cannot boot, fails the start with the cause.
// A task with a checkpoint resumes from it; while the owner is active (and yield is on) it
// starts waiting on disk instead, with no VM, and resumes once the owner has left.
func (d *Driver) StartTask(cfg *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	if _, ok := d.tasks.Get(cfg.ID); ok {
		return nil, nil, fmt.Errorf("task %s is already started", cfg.ID)
	}
	pc := d.pluginConfig()
	if pc == nil {
		return nil, nil, errors.New("deskvm is not configured yet")
	}
	d.sensor() // a checkpointed task resumes only when the owner allows
	host := d.waitProbe(probeWait)
	switch {
	case host.probe == probePending:
		return nil, nil, structs.NewRecoverableError(errors.New("deskvm is still probing this host's accelerator"), true)
	case host.err != nil:
		return nil, nil, fmt.Errorf("deskvm cannot run vms on this node: %w", host.err)
	}

	var tc TaskConfig
	if err := cfg.DecodeDriverConfig(&tc); err != nil {
		return nil, nil, fmt.Errorf("decode deskvm task config: %w", err)
	}
	d.mu.RLock()
	compute := d.compute
	d.mu.RUnlock()
	spec, err := buildSpec(cfg, &tc, pc, host, compute)
	if err != nil {
		return nil, nil, err
	}

	ctx, cancel := context.WithTimeout(d.ctx, pc.bootTimeout())
	defer cancel()
	mode := modeCommand
	if tc.Image != "" {
		mode = modeImage
		if err := prepareImage(ctx, pc, &tc, spec); err != nil {
			return nil, nil, err
		}
	}

	d.mu.RLock()
	policy := d.policy
	d.mu.RUnlock()
	taskPolicy, err := policy.ForTask(tc.Preemption)
	if err != nil {
		return nil, nil, fmt.Errorf("invalid deskvm task config: %w", err)
	}
	yielding := pc.Yield.Enabled
	detach := yielding && taskPolicy.Preemption == yield.ModeCheckpoint

	var m Machine
	resumed := ""
	if dir := d.trustedCheckpoint(cfg); dir != "" {
		if yielding && d.ownerActive() {
			// Restored now, the VM would hold the guest's memory on the owner's desktop,
			// paused, until the owner left: it waits on disk instead.
			return d.startWaiting(cfg, mode, spec, tc.Preemption, guestSpec(cfg, &tc, spec, detach), dir)
		}
		m, err = d.hv.Restore(ctx, spec, dir)
		if err != nil {
			d.checkpointFailed(cfg, dir, err)
			m = nil
		} else {
			resumed = dir
			spec = m.Spec()
		}
	}
	if m == nil {
		m, err = d.hv.Launch(ctx, spec)
		if err != nil {
			return nil, nil, fmt.Errorf("start vm %s: %w", spec.Name, err)
		}
	}
	h := d.newHandle(cfg, mode, spec, m, time.Now())
	fail := func(err error) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
		_ = m.Kill()
		<-m.Done()
		_ = m.Close()
		_ = m.Cleanup()
		return nil, nil, fmt.Errorf("start vm %s: %w", spec.Name, err)
	}
	start := yield.VMInfo{MemoryMiB: spec.MemoryMiB}
	switch {
	case resumed != "":
		// The run loop connects to the guest agent once the VM runs: a paused guest cannot
		// answer.
		if err := m.Resume(ctx); err != nil {
			return fail(err)
		}
		d.emit(cfg, "resumed from checkpoint", map[string]string{"checkpoint": filepath.Base(resumed)})
		keep := ""
		if mode == modeImage {
			keep = resumed // the restored VM runs its disk from there
		}
		removeCheckpoints(cfg, keep)
	case mode == modeCommand:
		g, err := startCommand(ctx, m, guestSpec(cfg, &tc, spec, detach))
		if err != nil {
			return fail(err)
		}
		h.guest = g
	}

	handle := drivers.NewTaskHandle(taskHandleVersion)
	handle.Config = cfg
	st := taskState{TaskConfig: cfg, Mode: mode, Spec: spec, PID: m.PID(), StartedAt: h.startedAt.UnixNano(),
		Yield: yielding, Preemption: tc.Preemption}
	if err := handle.SetDriverState(&st); err != nil {
		_ = m.Kill()
		return nil, nil, fmt.Errorf("encode driver state: %w", err)
	}
	d.tasks.Set(cfg.ID, h)
	go h.run(d.ctx)
	if yielding {
		d.startYield(h, tc.Preemption, start, resumed == "")
	}
	d.logger.Info("started task", "task_id", cfg.ID, "vm", spec.Name, "pid", m.PID(), "mode", mode,
		"accelerator", string(spec.Accelerator))
	return handle, nil, nil
}

// startCommand waits for the guest agent to boot and starts the command. A VM that dies on
// the way fails with its cause, never a hang.
func startCommand(ctx context.Context, m Machine, gs guestctl.Spec) (Guest, error) {
	ctx, cancel := untilExit(ctx, m)
	defer cancel()
	g, err := m.Guest(ctx)
	if err == nil {
		err = g.Start(ctx, gs)
		if err != nil {
			_ = g.Close()
		}
	}
	if err == nil {
		return g, nil
	}
	select {
	case <-m.Done():
		if f := m.Failure(); f != "" {
			return nil, errors.New(f)
		}
		return nil, errors.New("the vm exited while booting")
	default:
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return nil, fmt.Errorf("the guest agent did not answer within boot_timeout (console: %s): %w", m.ConsoleTail(5), err)
	}
	return nil, err
}

// buildSpec turns a task into a VM spec, checking everything that can be checked without
// starting anything. Every error names the attribute at fault.
func buildSpec(cfg *drivers.TaskConfig, tc *TaskConfig, pc *Config, host hostInfo, compute cpustats.Compute) (vm.Spec, error) {
	if err := tc.validate(pc); err != nil {
		return vm.Spec{}, fmt.Errorf("invalid deskvm task config: %w", err)
	}
	var errs []error
	res := taskResources(cfg)
	cpus, err := guestCPUs(res.cores, res.cpuMHz, compute)
	if err != nil {
		errs = append(errs, err)
	}
	minMem := minCommandMemoryMiB
	if tc.Image != "" {
		minMem = minImageMemoryMiB
	}
	if res.memoryMiB < minMem {
		errs = append(errs, fmt.Errorf("resources.memory must be at least %d MiB for the guest to boot, got %d", minMem, res.memoryMiB))
	}
	ports, err := portForwards(tc.Ports, cfg)
	if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return vm.Spec{}, fmt.Errorf("invalid deskvm task: %w", err)
	}

	name := vmName(cfg.ID)
	spec := vm.Spec{
		Name:        name,
		StateDir:    filepath.Join(cfg.TaskDir().Dir, "deskvm"),
		SocketDir:   socketDir(pc.StateDir, name),
		QEMUBinary:  pc.QEMUBinary,
		Accelerator: host.accel,
		CPUs:        cpus,
		MemoryMiB:   res.memoryMiB,
		Stdout:      orDevNull(cfg.StdoutPath),
		Stderr:      orDevNull(cfg.StderrPath),
		Network:     tc.Network == networkUser || len(ports) > 0,
		Ports:       ports,
		ExtraArgs:   slices.Clone(tc.QEMUArgs),
	}
	limit := res.memoryMaxMiB
	if limit < res.memoryMiB {
		limit = res.memoryMiB
	}
	spec.CgroupMemoryLimitMiB = limit + pc.MemoryOverhead
	spec.CgroupDirs = cgroupDirs(vm.DetectCgroupMode(cgroupRoot), cfg, pc.Yield.Enabled)
	if cfg.Resources != nil && cfg.Resources.LinuxResources != nil {
		spec.CgroupCPUShares = cfg.Resources.LinuxResources.CPUShares
	}
	if tc.Image != "" {
		// prepareImage creates these two before the VM starts.
		spec.Disk = &vm.Disk{Path: filepath.Join(spec.StateDir, "overlay.qcow2"), Format: "qcow2"}
		spec.Seed = filepath.Join(spec.StateDir, "seed.iso")
		spec.Stderr = "" // the serial console is the task's stdout
	}
	if tc.Command != "" {
		td := cfg.TaskDir()
		spec.Kernel, spec.Initrd, spec.Append = host.kernel, host.initrd, vm.CommandAppend
		spec.Shares = []vm.Share{
			{Tag: "local", HostPath: td.LocalDir},
			{Tag: "secrets", HostPath: td.SecretsDir},
			{Tag: "alloc", HostPath: td.SharedAllocDir},
		}
	}
	if err := spec.Validate(); err != nil {
		return vm.Spec{}, fmt.Errorf("invalid deskvm task: %w", err)
	}
	return spec, nil
}

// prepareImage checks the task's image and creates the overlay and seed that spec names.
func prepareImage(ctx context.Context, pc *Config, tc *TaskConfig, spec vm.Spec) error {
	if _, err := os.Stat(tc.Image); err != nil {
		return fmt.Errorf("image %q cannot be read: %w", tc.Image, err)
	}
	info, err := vm.InspectImage(ctx, pc.QEMUImgBinary, tc.Image)
	if err != nil {
		return err
	}
	if info.Format != "qcow2" && info.Format != "raw" {
		return fmt.Errorf("image %q has format %q; deskvm boots qcow2 or raw images", tc.Image, info.Format)
	}
	if err := os.MkdirAll(spec.StateDir, 0o700); err != nil {
		return fmt.Errorf("create vm state dir: %w", err)
	}
	if err := vm.CreateOverlay(ctx, pc.QEMUImgBinary, tc.Image, info.Format, spec.Disk.Path); err != nil {
		return err
	}
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", spec.Name, spec.Name)
	if err := cloudinit.WriteSeed(spec.Seed, []byte(tc.UserData), []byte(meta)); err != nil {
		return fmt.Errorf("write cloud-init seed: %w", err)
	}
	return nil
}

// guestSpec is what the guest agent runs in command mode.
//
// With detach, the agent copies the shares into the guest and unmounts them before the
// command starts, writing back what the command wrote when it ends: QEMU cannot save a VM
// whose guest has a 9p share mounted, and a checkpointed task must be saved. The task's
// checkpoints (local/.deskvm) and Nomad's logs (alloc/logs) stay on the host.
func guestSpec(cfg *drivers.TaskConfig, tc *TaskConfig, spec vm.Spec, detach bool) guestctl.Spec {
	gs := guestctl.Spec{
		TaskID:   cfg.ID,
		Command:  tc.Command,
		Args:     tc.Args,
		Env:      cfg.EnvList(),
		Dir:      tc.WorkDir,
		Hostname: hostname(cfg),
		Mounts: []guestctl.Mount{
			{Tag: "local", Path: "/local"},
			{Tag: "secrets", Path: "/secrets"},
			{Tag: "alloc", Path: "/alloc"},
		},
	}
	if detach {
		gs.Mounts[0].Skip = []string{checkpointRoot}
		gs.Mounts[2].Skip = []string{"logs"}
		for i := range gs.Mounts {
			gs.Mounts[i].Detached = true
		}
	}
	if spec.Network {
		gs.Network = &guestctl.Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: "10.0.2.3"}
	}
	return gs
}

func hostname(cfg *drivers.TaskConfig) string {
	id := cfg.AllocID
	if len(id) > 8 {
		id = id[:8]
	}
	if id == "" {
		return "deskvm"
	}
	return "deskvm-" + id
}

func orDevNull(p string) string {
	if p == "" {
		return os.DevNull
	}
	return p
}

// resources is what a task asks for, in the units the VM needs.
type resources struct {
	cores        int
	cpuMHz       int64
	memoryMiB    int
	memoryMaxMiB int
}

func taskResources(cfg *drivers.TaskConfig) resources {
	var r resources
	if cfg.Resources == nil || cfg.Resources.NomadResources == nil {
		return r
	}
	nr := cfg.Resources.NomadResources
	r.cores = len(nr.Cpu.ReservedCores)
	r.cpuMHz = nr.Cpu.CpuShares
	r.memoryMiB = int(nr.Memory.MemoryMB)
	r.memoryMaxMiB = int(nr.Memory.MemoryMaxMB)
	return r
}

// guestCPUs is the vCPU count: the task's reserved cores, or else its cpu MHz over the
// node's MHz per core, rounded up.
func guestCPUs(cores int, cpuMHz int64, compute cpustats.Compute) (int, error) {
	switch {
	case cores < 0:
		return 0, fmt.Errorf("resources.cores must be positive, got %d", cores)
	case cores > 0:
		return cores, nil
	case cpuMHz <= 0:
		return 0, fmt.Errorf("resources.cores or resources.cpu must be positive, got cores = 0 and cpu = %d", cpuMHz)
	}
	perCore := int64(0)
	if compute.NumCores > 0 {
		perCore = int64(compute.TotalCompute) / int64(compute.NumCores)
	}
	if perCore <= 0 {
		return 1, nil
	}
	n := int((cpuMHz + perCore - 1) / perCore)
	if compute.NumCores > 0 && n > compute.NumCores {
		n = compute.NumCores
	}
	return max(n, 1), nil
}

// portForwards maps the task's port labels to the allocation's host ports.
func portForwards(labels []string, cfg *drivers.TaskConfig) ([]vm.PortForward, error) {
	if len(labels) == 0 {
		return nil, nil
	}
	var alloc structs.AllocatedPorts
	if cfg.Resources != nil && cfg.Resources.Ports != nil {
		alloc = *cfg.Resources.Ports
	}
	var out []vm.PortForward
	var errs []error
	for _, l := range labels {
		p, ok := alloc.Get(l)
		if !ok {
			errs = append(errs, fmt.Errorf("ports entry %q is not a port label of the group's network block", l))
			continue
		}
		guest := p.To
		if guest <= 0 {
			guest = p.Value
		}
		out = append(out, vm.PortForward{HostIP: p.HostIP, HostPort: p.Value, GuestPort: guest})
	}
	return out, errors.Join(errs...)
}

// cgroupDirs are the task's cgroups that QEMU joins. Nomad creates them before StartTask and
// removes them after the task; without them (a test harness) QEMU stays where it is.
//
// On cgroup v1, a task that yields to the owner gets a cpu cgroup of its own at the root of
// the cpu hierarchy (ownCPUPrefix + its scope), beside the owner's session, rather than
// Nomad's under "nomad". cpu.idle makes a cgroup idle only against its siblings: under
// "nomad", whose weight counts in full against the owner's, a busy idle VM still took a
// third of the CPU from an owner's 2-core workload (1.18-1.6x slowdown through a real
// Nomad, scripts/slowdown); beside the owner it takes none. Memory, cpuset and freezer stay
// Nomad's.
func cgroupDirs(mode vm.CgroupMode, cfg *drivers.TaskConfig, yields bool) []string {
	if cfg.Resources == nil || cfg.Resources.LinuxResources == nil || cfg.Resources.LinuxResources.CpusetCgroupPath == "" {
		return nil
	}
	cpuset := cfg.Resources.LinuxResources.CpusetCgroupPath
	switch mode {
	case vm.CgroupV2:
		return []string{cpuset}
	case vm.CgroupV1:
		scope := cfg.AllocID + "." + cfg.Name
		dirs := []string{cpuset}
		cpuSame := sameMount(filepath.Join(cgroupRoot, "cpu"), filepath.Join(cgroupRoot, "cpuacct"))
		for _, iface := range []string{"cpu", "cpuacct", "memory", "freezer"} {
			if iface == "cpuacct" && cpuSame {
				continue
			}
			dir := filepath.Join(cgroupRoot, iface, "nomad", scope)
			if iface == "cpu" && yields {
				dir = filepath.Join(cgroupRoot, iface, ownCPUPrefix+scope)
			}
			dirs = append(dirs, dir)
		}
		return dirs
	}
	return nil
}

// ownCPUPrefix starts the name of a yielding task's own cpu cgroup (cgroup v1).
const ownCPUPrefix = "deskvm."

// sameMount tells whether two cgroup v1 controller paths are one hierarchy (cpu,cpuacct).
func sameMount(a, b string) bool {
	ra, errA := filepath.EvalSymlinks(a)
	rb, errB := filepath.EvalSymlinks(b)
	return errA == nil && errB == nil && strings.EqualFold(ra, rb)
}
