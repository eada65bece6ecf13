// Command slowdown measures how much a VM whose every vCPU is busy slows the desktop's
// owner, with each contender started the way a user would start it, side by side in one run:
//
//   - deskvm: a real Nomad agent runs a deskvm job (command mode, its VM in the idle CPU class
//     with its cgroup marked idle; owner sensing off, so no cap or pause: the CPU class alone);
//   - Nomad's built-in qemu driver: the same agent runs a qemu job that boots the same kernel
//     and initramfs;
//   - plain QEMU at nice 19: qemu-system-x86_64 started directly under `nice -n 19`, in a cpu
//     cgroup of its own as a user's service would be.
//
// Each VM has as many vCPUs as the machine has cores, each spinning. The owner's workload is
// one process per core, each spinning a fixed count calibrated to about 300 ms, in a cpu
// cgroup of its own as a desktop session's is; its wall time beside each VM is compared with
// its wall time with no VM, measured before and after. Run it with `make bench`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/hashicorp/nomad/helper/uuid"

	"github.com/deskcloud/deskcloud/driver/cloudinit"
	"github.com/deskcloud/deskcloud/driver/guestkit"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/e2e/cluster"
)

// ownerWork is about how long one owner process spins on an idle core.
const ownerWork = 300 * time.Millisecond

func main() {
	runs := flag.Int("runs", 5, "owner runs beside each VM, and before and after without one")
	spinN := flag.Int64("owner-spin", 0, "internal: be one owner process spinning this many rounds once stdin has a byte")
	flag.Parse()
	if *spinN > 0 {
		var b [1]byte
		_, _ = os.Stdin.Read(b[:])
		spin(*spinN)
		return
	}
	if err := run(*runs); err != nil {
		fmt.Fprintln(os.Stderr, "slowdown:", err)
		os.Exit(1)
	}
}

// spinSink keeps the compiler from dropping spin's loop.
var spinSink uint64

// spin is the owner's work. It is not driver/vm's benchmark spin: the owner's slowdown
// beside deskvm depends on the loop (0.95× with this one through a real Nomad, 1.04-1.05×
// with driver/vm's xorshift, 3 runs each), and this is the one the published figures use.
func spin(n int64) {
	x := uint64(1)
	for i := int64(0); i < n; i++ {
		x = x*6364136223846793005 + 1442695040888963407
	}
	spinSink = x
}

func run(runs int) error {
	if vm.DetectCgroupMode("/sys/fs/cgroup") != vm.CgroupV1 {
		return errors.New("needs the cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu for the owner's and nice-19 QEMU's cgroups")
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	kit := filepath.Join(root, ".deps", "guest")
	kernel, initrd, err := guestkit.BootFiles(kit)
	if err != nil {
		return err
	}
	vcpus := runtime.NumCPU()
	busy := busyScript(vcpus)

	dir, err := os.MkdirTemp("", "deskcloud-slowdown-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The qemu driver's and plain QEMU's guests run the same loops from a cloud-init seed
	// (the guest kit's image mode), since neither has a way to hand a guest a command.
	seed := filepath.Join(dir, "seed.iso")
	if err := cloudinit.WriteSeed(seed, []byte("#!/bin/sh\n"+busy+"\n"), []byte("instance-id: slowdown\n")); err != nil {
		return err
	}
	owner, err := cgroup("deskcloud-slowdown-owner")
	if err != nil {
		return err
	}
	defer os.Remove(owner)

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	fmt.Fprintln(os.Stderr, "==> starting a Nomad agent with deskvm and the qemu driver")
	a, stopAgent, err := cluster.StartScratch(ctx, cluster.Options{
		Name: "deskcloud-slowdown", LogLevel: "INFO",
		// deskvm's CPU layer alone: with sensing on, the owner's load would cap and then
		// pause the VM, and the owner would lose nothing at all.
		DeskvmConfig: "    owner {\n      sources        = []\n      forecast_state = \"\"\n    }",
	})
	if err != nil {
		return err
	}
	defer stopAgent()

	n := calibrate()
	times := map[string][]time.Duration{}
	measure := func(name string) error {
		for range runs {
			d, err := runOwner(n, vcpus, owner)
			if err != nil {
				return fmt.Errorf("owner beside %s: %w", name, err)
			}
			times[name] = append(times[name], d)
		}
		return nil
	}
	imageArgs := []string{"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet deskvm.mode=image",
		"-smp", strconv.Itoa(vcpus), "-drive", "file=" + seed + ",if=virtio,format=raw,readonly=on"}

	fmt.Fprintln(os.Stderr, "==> owner alone")
	if err := measure("no VM"); err != nil {
		return err
	}

	contenders := []struct {
		name  string
		start func() (stop func(), err error)
	}{
		{"deskvm", func() (func(), error) {
			return startJob(ctx, a, "deskvm", map[string]any{"command": "/bin/sh", "args": []string{"-c", busy}}, vcpus)
		}},
		{"Nomad's qemu driver", func() (func(), error) {
			return startJob(ctx, a, "qemu", map[string]any{"image_path": filepath.Join(kit, guestkit.TestImageFile), "args": imageArgs}, vcpus)
		}},
		{"plain QEMU at nice 19", func() (func(), error) { return startNice19(ctx, kit, imageArgs) }},
	}
	for _, c := range contenders {
		fmt.Fprintf(os.Stderr, "==> owner beside %s\n", c.name)
		stop, err := c.start()
		if err != nil {
			return err
		}
		err = measure(c.name)
		stop()
		if err != nil {
			return err
		}
	}

	fmt.Fprintln(os.Stderr, "==> owner alone again")
	if err := measure("no VM"); err != nil {
		return err
	}

	base := median(times["no VM"])
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("owner slowdown beside a VM with %d busy vCPUs, each started for real; %d owner processes, %d runs each (no VM: %d, before and after); load average %s; medians:\n\n",
		vcpus, vcpus, runs, 2*runs, strings.Join(strings.Fields(string(load))[:3], " "))
	fmt.Printf("| %-24s | %10s | %8s | %8s | %s |\n", "VM", "owner wall", "min", "max", "slowdown")
	fmt.Printf("|%s|%s|%s|%s|%s|\n", strings.Repeat("-", 26), strings.Repeat("-", 12), strings.Repeat("-", 10), strings.Repeat("-", 10), strings.Repeat("-", 10))
	names := []string{"no VM"}
	for _, c := range contenders {
		names = append(names, c.name)
	}
	for _, name := range names {
		ts := times[name]
		fmt.Printf("| %-24s | %8dms | %6dms | %6dms | %7.2f× |\n", name, median(ts).Milliseconds(),
			slices.Min(ts).Milliseconds(), slices.Max(ts).Milliseconds(), float64(median(ts))/float64(base))
	}
	return nil
}

// busyScript spins every vCPU, in the guest's shell.
func busyScript(vcpus int) string {
	return fmt.Sprintf(`for c in $(seq %d); do (while :; do :; done) & done; wait`, vcpus)
}

// startJob runs a one-task batch job and waits until the task runs and the machine is busy;
// stop deregisters it and waits until its VM has gone.
func startJob(ctx context.Context, a *cluster.Agent, driver string, config map[string]any, vcpus int) (stop func(), err error) {
	id := "slowdown-" + driver + "-" + uuid.Short()
	// deskvm gives a task as many vCPUs as its cpu MHz needs cores; reserving whole cores
	// (resources.cores) would need every core free of the agent's own reservation.
	mhz, err := perCoreMHz(a)
	if err != nil {
		return nil, err
	}
	job := cluster.OneShotJob(id, driver, config, &api.Resources{CPU: pointer(mhz*(vcpus-1) + 1), MemoryMB: pointer(256)})
	if _, _, err := a.Client.Jobs().Register(job, nil); err != nil {
		return nil, err
	}
	stop = func() {
		_, _, _ = a.Client.Jobs().Deregister(id, true, nil)
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = a.WaitAlloc(sctx, id, "the task to stop", cluster.Terminal)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	defer wcancel()
	alloc, err := a.WaitAlloc(wctx, id, "the task to run", func(al *api.Allocation) bool {
		return cluster.Running("t")(al) || cluster.Terminal(al)
	})
	if err == nil && alloc.ClientStatus != api.AllocClientStatusRunning {
		err = fmt.Errorf("allocation %s: %q", alloc.ClientStatus, cluster.Events(alloc, "t"))
	}
	if err != nil {
		stop()
		return nil, fmt.Errorf("%s job: %w", driver, err)
	}
	if err := waitBusy(ctx, vcpus); err != nil {
		stop()
		return nil, fmt.Errorf("%s job: %w", driver, err)
	}
	return stop, nil
}

// perCoreMHz is the node's CPU MHz per core.
func perCoreMHz(a *cluster.Agent) (int, error) {
	id, err := a.NodeID()
	if err != nil {
		return 0, err
	}
	n, _, err := a.Client.Nodes().Info(id, nil)
	if err != nil {
		return 0, err
	}
	mhz, _ := strconv.Atoi(n.Attributes["cpu.totalcompute"])
	cores, _ := strconv.Atoi(n.Attributes["cpu.numcores"])
	if mhz <= 0 || cores <= 0 {
		return 0, fmt.Errorf("node %s reports cpu.totalcompute %q and cpu.numcores %q", id, n.Attributes["cpu.totalcompute"], n.Attributes["cpu.numcores"])
	}
	return mhz / cores, nil
}

// startNice19 starts plain QEMU under nice 19 in a cgroup of its own and waits until the
// machine is busy.
func startNice19(ctx context.Context, kit string, imageArgs []string) (stop func(), err error) {
	cg, err := cgroup("deskcloud-slowdown-nice19")
	if err != nil {
		return nil, err
	}
	disk := filepath.Join(os.TempDir(), "deskcloud-slowdown-"+uuid.Short()+".qcow2")
	if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(kit, guestkit.TestImageFile), disk).CombinedOutput(); err != nil {
		os.Remove(cg)
		return nil, fmt.Errorf("qemu-img: %w: %s", err, out)
	}
	args := append([]string{"-n", "19", "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256", "-serial", "null",
		"-drive", "file=" + disk + ",if=virtio,format=qcow2"}, imageArgs...)
	cmd := exec.Command("nice", args...)
	if err := cmd.Start(); err != nil {
		os.Remove(cg)
		os.Remove(disk)
		return nil, err
	}
	stop = func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		removeCgroup(cg)
		os.Remove(disk)
	}
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		stop()
		return nil, err
	}
	if err := waitBusy(ctx, runtime.NumCPU()); err != nil {
		stop()
		return nil, fmt.Errorf("plain qemu: %w", err)
	}
	return stop, nil
}

// waitBusy waits until the machine's cores have been nearly all busy for a second: the
// guest's loops run.
func waitBusy(ctx context.Context, cores int) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		b0, t0, err := cpuTimes()
		if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.New("the guest's loops never kept the cores busy")
		case <-time.After(time.Second):
		}
		b1, t1, err := cpuTimes()
		if err != nil {
			return err
		}
		if t1 > t0 && float64(b1-b0)/float64(t1-t0) > 0.9 {
			return nil
		}
	}
}

// cpuTimes returns the busy and total jiffies of all cores from /proc/stat.
func cpuTimes() (busy, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, errors.New("unexpected /proc/stat")
	}
	for i, s := range f[1:] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, 0, err
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

// calibrate returns the spin count that takes about ownerWork on one idle core.
func calibrate() int64 {
	const n = 50_000_000
	best := time.Duration(0)
	for range 3 {
		start := time.Now()
		spin(n)
		if d := time.Since(start); best == 0 || d < best {
			best = d
		}
	}
	return int64(float64(n) * float64(ownerWork) / float64(best))
}

// runOwner runs procs owner processes, each spinning n rounds, in cgroup dir, and returns
// the wall time until the last one is done.
func runOwner(n int64, procs int, dir string) (time.Duration, error) {
	var cmds []*exec.Cmd
	var gos []*os.File
	defer func() {
		for _, w := range gos {
			w.Close()
		}
		for _, c := range cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}()
	for range procs {
		r, w, err := os.Pipe()
		if err != nil {
			return 0, err
		}
		cmd := exec.Command(os.Args[0], "-owner-spin", strconv.FormatInt(n, 10))
		cmd.Stdin = r
		err = cmd.Start()
		r.Close()
		if err != nil {
			w.Close()
			return 0, err
		}
		cmds, gos = append(cmds, cmd), append(gos, w)
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	for _, w := range gos {
		_, _ = w.Write([]byte{1})
	}
	for _, c := range cmds {
		if err := c.Wait(); err != nil {
			return 0, err
		}
	}
	d := time.Since(start)
	cmds = nil
	return d, nil
}

// cgroup makes a cpu cgroup of the given name under the v1 hierarchy.
func cgroup(name string) (string, error) {
	dir := filepath.Join("/sys/fs/cgroup/cpu", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	return dir, nil
}

// removeCgroup removes a cgroup once the kernel has let go of its exited processes.
func removeCgroup(dir string) {
	for range 100 {
		if os.Remove(dir) == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func median(xs []time.Duration) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func pointer[T any](v T) *T { return &v }
