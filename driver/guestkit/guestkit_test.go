package guestkit

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/driver/cloudinit"
	"github.com/deskcloud/deskcloud/driver/guestctl"
)

func TestDir(t *testing.T) {
	t.Run("env", func(t *testing.T) {
		t.Setenv(EnvDir, "/opt/kit")
		must.Eq(t, "/opt/kit", Dir())
		must.Eq(t, "/opt/kit/vmlinuz", Kernel())
		must.Eq(t, "/opt/kit/vmlinux", KernelELF())
		must.Eq(t, "/opt/kit/initramfs.cpio.gz", Initrd())
		must.Eq(t, "/opt/kit/test-image.qcow2", TestImage())
	})
	t.Run("source tree", func(t *testing.T) {
		t.Setenv(EnvDir, "")
		wd, err := os.Getwd()
		must.NoError(t, err)
		root := filepath.Dir(filepath.Dir(wd)) // driver/guestkit -> repository root
		must.Eq(t, filepath.Join(root, ".deps", "guest"), Dir())
	})
	t.Run("check names what is missing", func(t *testing.T) {
		t.Setenv(EnvDir, t.TempDir())
		must.ErrorContains(t, Check(), "scripts/deps.sh guest")
	})
}

func TestBootFiles(t *testing.T) {
	dir := t.TempDir()
	touch := func(name string) {
		t.Helper()
		must.NoError(t, os.WriteFile(filepath.Join(dir, name), nil, 0o644))
	}
	_, _, err := BootFiles(dir)
	must.ErrorContains(t, err, "has no initramfs.cpio.gz")
	touch(InitrdFile)
	_, _, err = BootFiles(dir)
	must.ErrorContains(t, err, "has neither vmlinux nor vmlinuz")
	touch(KernelFile)
	kernel, initrd, err := BootFiles(dir)
	must.NoError(t, err)
	must.Eq(t, filepath.Join(dir, KernelFile), kernel)
	must.Eq(t, filepath.Join(dir, InitrdFile), initrd)
	touch(KernelELFFile)
	kernel, _, err = BootFiles(dir)
	must.NoError(t, err)
	must.Eq(t, filepath.Join(dir, KernelELFFile), kernel, must.Sprint("the uncompressed kernel first"))
}

// runScript is the task of the command-mode test, on a 9p share: it proves
// stdout, stderr, the environment, the working directory and a TERM trap.
const runScript = `#!/bin/sh
echo "stdout-line GREETING=[$GREETING] HOME=[$HOME] PWD=$(pwd)"
echo "stderr-line" >&2
env | sort > /share/env.txt
trap 'echo got-term; exit 3' TERM
echo ready > /share/ready
while :; do sleep 0.1; done
`

// TestCommandMode boots one VM and drives the whole command-mode protocol
// against it, in order: handshake, start, exec, a host reconnect while the
// command runs, a signal whose exit happens while no host is connected, the
// exit status after reconnecting, and the ack that powers the VM off.
func TestCommandMode(t *testing.T) {
	requireKit(t)
	t.Parallel()
	ctx := t.Context()
	share := t.TempDir()
	must.NoError(t, os.WriteFile(filepath.Join(share, "run.sh"), []byte(runScript), 0o755))
	vm := startVM(t, vmConfig{mode: "command", shares: map[string]string{"local": share}})

	c, err := guestctl.Dial(ctx, vm.ctl)
	must.NoError(t, err)
	t.Logf("agent answered %s after qemu started", time.Since(vm.started).Round(time.Millisecond))

	info, err := c.Info(ctx)
	must.NoError(t, err)
	must.StrHasPrefix(t, "6.", info.Kernel, must.Sprint("guest kernel"))
	must.Greater(t, 100, info.MemTotalMiB, must.Sprint("guest memory"))
	st, err := c.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateWaiting, st.State)

	spec := guestctl.Spec{
		TaskID:   "task-1",
		Command:  "./run.sh",
		Env:      []string{"GREETING=hello world", "FOO=bar"},
		Dir:      "/share",
		Hostname: "task-1-vm",
		Mounts:   []guestctl.Mount{{Tag: "local", Path: "/share"}},
	}
	startAt := time.Now()
	must.NoError(t, c.Start(ctx, spec))
	must.NoError(t, c.Start(ctx, spec), must.Sprint("the same task again is a no-op"))
	other := spec
	other.TaskID = "task-2"
	must.ErrorIs(t, c.Start(ctx, other), guestctl.ErrAlreadyStarted)

	eventually(t, ctx, 30*time.Second, "the script's ready file on the 9p share", func() bool {
		return fileContains(filepath.Join(share, "ready"), "ready")
	})
	t.Logf("command ran %s after Start (%s after qemu started)",
		time.Since(startAt).Round(time.Millisecond), time.Since(vm.started).Round(time.Millisecond))
	st, err = c.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateRunning, st.State)
	must.Positive(t, st.Pid)

	eventually(t, ctx, 10*time.Second, "stdout and stderr in their files", func() bool {
		return fileContains(vm.stdout, "stdout-line") && fileContains(vm.stderr, "stderr-line")
	})
	must.StrContains(t, readFile(t, vm.stdout), "stdout-line GREETING=[hello world] HOME=[] PWD=/share")
	must.Eq(t, "stderr-line\n", readFile(t, vm.stderr))
	env := strings.Fields(readFile(t, filepath.Join(share, "env.txt")))
	for _, want := range []string{"FOO=bar", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"} {
		must.SliceContains(t, env, want, must.Sprintf("environment %v", env))
	}
	for _, kv := range env {
		must.False(t, strings.HasPrefix(kv, "TERM=") || strings.HasPrefix(kv, "HOME="),
			must.Sprintf("the command's environment must be exactly the spec's, found %s", kv))
	}

	t.Run("exec", func(t *testing.T) {
		cases := []struct {
			name    string
			req     guestctl.ExecRequest
			stdin   string
			code    int
			stdout  string // substring
			stderr  string // substring
			noStdin bool
		}{
			{name: "echo", req: guestctl.ExecRequest{Command: []string{"echo", "hi"}}, stdout: "hi\n"},
			{name: "echo with tty", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "tty; echo hi"}, TTY: true}, stdout: "hi\r\n"},
			{name: "stdin reaches eof", req: guestctl.ExecRequest{Command: []string{"cat"}}, stdin: "abc\n", stdout: "abc\n"},
			{name: "task env and dir", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "echo $FOO $(pwd) $(hostname)"}}, stdout: "bar /share task-1-vm\n"},
			{name: "exit code", req: guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", "echo oops >&2; exit 5"}}, code: 5, stderr: "oops"},
			{name: "not found", req: guestctl.ExecRequest{Command: []string{"no-such-command"}}, code: 127, stderr: "command not found"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				var stdout, stderr bytes.Buffer
				code, err := c.Exec(ctx, tc.req, guestctl.ExecIO{Stdin: strings.NewReader(tc.stdin), Stdout: &stdout, Stderr: &stderr})
				must.NoError(t, err)
				must.Eq(t, tc.code, code, must.Sprintf("stdout %q stderr %q", stdout.String(), stderr.String()))
				must.StrContains(t, stdout.String(), tc.stdout)
				must.StrContains(t, stderr.String(), tc.stderr)
				if tc.req.TTY {
					must.StrContains(t, stdout.String(), "/dev/pts/")
				}
			})
		}
	})

	t.Run("reconnect while running", func(t *testing.T) {
		must.NoError(t, c.Close())
		c, err = guestctl.Dial(ctx, vm.ctl)
		must.NoError(t, err)
		st, err := c.Status(ctx)
		must.NoError(t, err)
		must.Eq(t, guestctl.StateRunning, st.State)
		must.ErrorIs(t, c.Ack(ctx), guestctl.ErrNotExited, must.Sprint("ack while running"))
	})

	t.Run("exit while the host is away", func(t *testing.T) {
		must.NoError(t, c.Signal(ctx, syscall.SIGTERM))
		must.NoError(t, c.Close())
		eventually(t, ctx, 30*time.Second, "got-term on stdout", func() bool { return fileContains(vm.stdout, "got-term") })
		c, err = guestctl.Dial(ctx, vm.ctl)
		must.NoError(t, err)
		st, err := c.Wait(ctx)
		must.NoError(t, err)
		must.Eq(t, guestctl.StateExited, st.State)
		must.Eq(t, 3, st.ExitCode, must.Sprintf("status %+v", st))
		must.Zero(t, st.Signal)
		must.ErrorIs(t, c.Signal(ctx, syscall.SIGTERM), guestctl.ErrNotRunning)
	})

	must.NoError(t, c.Ack(ctx))
	vm.waitExit(t, 30*time.Second)
	must.False(t, fileContains(vm.console, "Kernel panic"))
}

// TestCommandNotFound boots a VM whose command does not exist, with a
// network: the exit status is 127 with the reason, and the network,
// hostname and resolver are configured.
func TestCommandNotFound(t *testing.T) {
	requireKit(t)
	t.Parallel()
	ctx := t.Context()
	vm := startVM(t, vmConfig{mode: "command", net: true})
	c, err := guestctl.Dial(ctx, vm.ctl)
	must.NoError(t, err)
	defer c.Close()

	must.NoError(t, c.Start(ctx, guestctl.Spec{
		TaskID:   "missing",
		Command:  "/no/such/program",
		Hostname: "netvm",
		Network:  &guestctl.Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: "10.0.2.3"},
	}))
	st, err := c.Wait(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateExited, st.State)
	must.Eq(t, 127, st.ExitCode)
	must.StrContains(t, st.Error, "/no/such/program: no such file or directory")
	eventually(t, ctx, 10*time.Second, "the reason on the stderr port", func() bool {
		return fileContains(vm.stderr, "/no/such/program: no such file or directory")
	})

	var out bytes.Buffer
	code, err := c.Exec(ctx, guestctl.ExecRequest{Command: []string{"/bin/sh", "-c",
		"hostname; ip -4 addr show; ip route; cat /etc/resolv.conf"}}, guestctl.ExecIO{Stdout: &out, Stderr: &out})
	must.NoError(t, err)
	must.Zero(t, code, must.Sprint(out.String()))
	for _, want := range []string{"netvm", "inet 10.0.2.15/24", "default via 10.0.2.2", "nameserver 10.0.2.3"} {
		must.StrContains(t, out.String(), want)
	}

	must.NoError(t, c.Ack(ctx))
	vm.waitExit(t, 30*time.Second)
}

// TestProbeMode checks that the probe guest powers off by itself, which is
// how the driver tells that an accelerator works, with both kernels of the
// kit.
func TestProbeMode(t *testing.T) {
	requireKit(t)
	t.Parallel()
	cases := []struct {
		name   string
		kernel string
	}{
		{"vmlinuz", Kernel()},
		{"vmlinux", KernelELF()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vm := startVM(t, vmConfig{mode: "probe", kernel: tc.kernel})
			took := vm.waitExit(t, bootTimeout)
			t.Logf("probe guest (%s) powered off %s after qemu started", tc.name, took.Round(time.Millisecond))
			must.StrContains(t, readFile(t, vm.console), "reboot: Power down")
		})
	}
}

// TestImageMode boots the test disk image through a qcow2 overlay with a
// NoCloud seed, as the driver's image mode does, and looks for the
// user-data's marker on the console.
func TestImageMode(t *testing.T) {
	requireKit(t)
	t.Parallel()
	dir := t.TempDir()
	overlay := filepath.Join(dir, "overlay.qcow2")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", TestImage(), "-F", "qcow2", overlay).CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	seed := filepath.Join(dir, "seed.iso")
	must.NoError(t, cloudinit.WriteSeed(seed,
		[]byte("#!/bin/sh\necho deskvm-marker-$((6*7))\nexit 4\n"),
		[]byte("instance-id: image-test\nlocal-hostname: image-test\n")))

	vm := startVM(t, vmConfig{disk: overlay, seed: seed})
	took := vm.waitExit(t, bootTimeout)
	t.Logf("image guest ran its user-data and powered off %s after qemu started", took.Round(time.Millisecond))
	console := readFile(t, vm.console)
	must.StrContains(t, console, "deskvm-marker-42")
	must.StrContains(t, console, "deskvm-image: user-data exited 4")
	must.StrNotContains(t, console, "Kernel panic")
}
