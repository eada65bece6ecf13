// Command guestagent is PID 1 of the deskvm guest kit's initramfs. It mounts
// the pseudo filesystems, loads the kernel modules it needs and then, by the
// kernel command line's deskvm.mode:
//
//   - probe: powers off at once (the host's "does this accelerator boot" test);
//   - command (the default): serves the guestctl protocol on the virtio-serial
//     port deskvm.ctl and runs the task's command, its stdout and stderr on
//     the ports deskvm.stdout and deskvm.stderr;
//   - image: acts as a tiny NoCloud client for the test disk image: runs the
//     user-data script of a "cidata" seed disk and powers off.
//
// Build it static: CGO_ENABLED=0 go build -trimpath -ldflags "-s -w".
package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestkit/kmod"
)

// version is the agent's version, set at kit build time with
// -ldflags "-X main.version=...".
var version = "dev"

// Kernel command line values of deskvm.mode.
const (
	modeProbe   = "probe"
	modeCommand = "command"
	modeImage   = "image"
)

func main() {
	// /proc first: the mode is on the command line, and probe mode must
	// power off before doing anything else.
	mountFS("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	cmdline, _ := os.ReadFile("/proc/cmdline")
	mode := bootParam(string(cmdline), "deskvm.mode", modeCommand)
	if mode == modeProbe {
		unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey && len(groups) == 0 {
				return slog.Attr{} // the console log has the kernel's clock
			}
			return a
		},
	})).With("agent", "deskvm")

	// As PID 1 the kernel delivers a signal to us only if we handle it, and
	// Go would exit on SIGTERM, SIGINT or SIGHUP: that would panic the
	// kernel. Handling them (rather than ignoring them) keeps the children's
	// dispositions at their defaults.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGUSR1, unix.SIGUSR2, unix.SIGPIPE)
	go func() {
		for s := range sigs {
			log.Info("ignoring signal to pid 1", "signal", s.String())
		}
	}()

	if err := setupRoot(); err != nil {
		log.Error("mount pseudo filesystems", "error", err)
	}
	log.Info("agent started", "version", version, "mode", mode, "uptime", uptime())

	ctx := context.Background()
	switch mode {
	case modeImage:
		loadModules(log, kmod.ImageModules)
		runImage(ctx, log)
	case modeCommand:
		loadModules(log, kmod.CommandModules)
		runCommand(ctx, log)
	default:
		log.Error("unknown deskvm.mode, powering off", "mode", mode)
	}
	powerOff(log)
}

// bootParam returns the value of key=value on a kernel command line, or def.
func bootParam(cmdline, key, def string) string {
	for _, f := range strings.Fields(cmdline) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			return v
		}
	}
	return def
}

// setupRoot mounts what a Linux userland expects and the initramfs lacks.
func setupRoot() error {
	type mnt struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}
	var errs []error
	for _, m := range []mnt{
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	} {
		if err := mountFS(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			errs = append(errs, err)
		}
	}
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		os.Symlink(target, link)
	}
	if len(errs) > 0 {
		return fmt.Errorf("%v", errs)
	}
	return nil
}

// mountFS creates dst and mounts on it.
func mountFS(src, dst, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("create mount point %s: %w", dst, err)
	}
	if err := unix.Mount(src, dst, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, dst, err)
	}
	return nil
}

// loadModules loads the modules named with their dependencies, in order, as
// modules.dep of the running kernel lists them.
func loadModules(log *slog.Logger, names []string) {
	start := time.Now()
	var uts unix.Utsname
	unix.Uname(&uts)
	dir := "/lib/modules/" + string(bytes.TrimRight(uts.Release[:], "\x00"))
	f, err := os.Open(dir + "/modules.dep")
	if err != nil {
		log.Error("no kernel modules", "error", err)
		return
	}
	mods, err := kmod.ParseDep(f)
	f.Close()
	if err != nil {
		log.Error("read modules.dep", "error", err)
		return
	}
	order, missing, err := kmod.LoadOrder(mods, names)
	if err != nil {
		log.Error("resolve modules", "error", err)
		return
	}
	loaded := 0
	for _, m := range order {
		if err := loadModule(dir + "/" + m.Path); err != nil {
			log.Error("load module", "module", m.Name, "error", err)
			continue
		}
		loaded++
	}
	log.Info("modules loaded", "count", loaded, "not_shipped", strings.Join(missing, ","),
		"took", time.Since(start).Round(time.Millisecond).String())
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if err == unix.EEXIST {
		return nil
	}
	return err
}

// uptime is the seconds since the kernel booted, for the log.
func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	f, _, _ := strings.Cut(string(b), " ")
	return f + "s"
}

// bootTime is when the kernel booted, by the guest's clock.
func bootTime() time.Time {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return time.Time{}
	}
	f, _, _ := strings.Cut(string(b), " ")
	s, err := strconv.ParseFloat(f, 64)
	if err != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(s * float64(time.Second))).Round(time.Millisecond)
}

// powerOff syncs and powers the VM off; QEMU runs with -no-reboot, so it
// exits. PID 1 must never return, so a failure leaves the agent parked.
func powerOff(log *slog.Logger) {
	log.Info("powering off", "uptime", uptime())
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	log.Error("power off failed", "error", err)
	select {}
}
