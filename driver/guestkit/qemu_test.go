package guestkit

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// qemuBinary is the emulator the driver runs.
const qemuBinary = "qemu-system-x86_64"

// bootTimeout bounds a guest's boot under TCG on a busy 2-core machine.
const bootTimeout = 90 * time.Second

// requireKit skips the test when QEMU or the guest kit is missing.
func requireKit(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(qemuBinary); err != nil {
		t.Skipf("%s not installed (scripts/deps.sh apt installs it): %v", qemuBinary, err)
	}
	if err := Check(); err != nil {
		t.Skipf("no guest kit: %v", err)
	}
}

// vmConfig is one test VM, launched with the driver's command line.
type vmConfig struct {
	mode   string            // deskvm.mode, with -kernel and -initrd
	kernel string            // the kernel to boot; "" is KernelELF()
	shares map[string]string // 9p mount tag -> host directory
	net    bool              // a user-mode NIC
	disk   string            // qcow2 disk booted by the firmware instead of -kernel
	seed   string            // raw seed image on virtio-blk
}

// testVM is a running QEMU.
type testVM struct {
	dir     string
	ctl     string
	stdout  string
	stderr  string
	console string
	started time.Time
	exited  chan struct{}
	waitErr error
	cmd     *exec.Cmd
}

// startVM boots a VM with the driver's QEMU command line under TCG. The VM
// is killed at cleanup if it is still running, and its console log is shown
// when the test failed.
func startVM(t *testing.T, cfg vmConfig) *testVM {
	t.Helper()
	// Socket paths must stay short (108 bytes), so not under t.TempDir.
	dir, err := os.MkdirTemp("", "dvm")
	must.NoError(t, err)
	vm := &testVM{
		dir:     dir,
		ctl:     filepath.Join(dir, "ctl.sock"),
		stdout:  filepath.Join(dir, "stdout"),
		stderr:  filepath.Join(dir, "stderr"),
		console: filepath.Join(dir, "console.log"),
		exited:  make(chan struct{}),
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", "1", "-m", "256",
		"-no-reboot", "-serial", "file:" + vm.console,
		"-device", "virtio-balloon-pci",
		"-device", "virtio-rng-pci",
		"-qmp", "unix:" + filepath.Join(dir, "qmp.sock") + ",server=on,wait=off",
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
	}
	if cfg.kernel == "" {
		cfg.kernel = KernelELF()
	}
	if cfg.disk == "" {
		args = append(args,
			"-kernel", cfg.kernel, "-initrd", Initrd(),
			"-append", "console=ttyS0 panic=-1 quiet deskvm.mode="+cfg.mode,
			"-device", "virtio-serial-pci",
			"-chardev", "socket,id=ctl,path="+vm.ctl+",server=on,wait=off",
			"-device", "virtserialport,chardev=ctl,name=deskvm.ctl",
			"-chardev", "file,id=out,path="+vm.stdout,
			"-device", "virtserialport,chardev=out,name=deskvm.stdout",
			"-chardev", "file,id=err,path="+vm.stderr,
			"-device", "virtserialport,chardev=err,name=deskvm.stderr",
		)
	} else {
		args = append(args,
			"-drive", "if=none,id=disk0,cache=writeback,discard=unmap,format=qcow2,file="+cfg.disk,
			"-device", "virtio-blk-pci,drive=disk0,bootindex=0")
	}
	if cfg.seed != "" {
		args = append(args,
			"-drive", "if=none,id=seed0,readonly=on,format=raw,file="+cfg.seed,
			"-device", "virtio-blk-pci,drive=seed0")
	}
	i := 0
	for tag, path := range cfg.shares {
		id := fmt.Sprintf("fs%d", i)
		i++
		args = append(args,
			"-fsdev", "local,id="+id+",path="+path+",security_model=mapped-xattr",
			"-device", "virtio-9p-pci,fsdev="+id+",mount_tag="+tag)
	}
	if cfg.net {
		args = append(args, "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0")
	}
	vm.cmd = exec.Command(qemuBinary, args...)
	var qemuOut bytes.Buffer
	vm.cmd.Stdout, vm.cmd.Stderr = &qemuOut, &qemuOut
	vm.started = time.Now()
	must.NoError(t, vm.cmd.Start())
	go func() {
		vm.waitErr = vm.cmd.Wait()
		close(vm.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-vm.exited:
		default:
			vm.cmd.Process.Kill()
			<-vm.exited
		}
		// Shown with -v or on failure: the agent logs its boot milestones.
		console, _ := os.ReadFile(vm.console)
		t.Logf("qemu output:\n%s\nconsole log:\n%s", qemuOut.String(), console)
		os.RemoveAll(dir)
	})
	return vm
}

// waitExit waits for QEMU to exit by itself and returns how long it ran.
func (vm *testVM) waitExit(t *testing.T, timeout time.Duration) time.Duration {
	t.Helper()
	select {
	case <-vm.exited:
		must.NoError(t, vm.waitErr, must.Sprint("qemu exit status"))
		return time.Since(vm.started)
	case <-time.After(timeout):
		t.Fatalf("qemu still running after %s, want it to power off by itself", timeout)
		return 0
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, ctx context.Context, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

// fileContains reports whether the file at path contains s.
func fileContains(path, s string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(b), s)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	return string(b)
}
