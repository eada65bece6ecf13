package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestctl"
)

// Names of the virtio-serial ports the host gives the VM.
const (
	portControl = "deskvm.ctl"
	portStdout  = "deskvm.stdout"
	portStderr  = "deskvm.stderr"
)

// portPoll is how often the agent looks for a port to appear and for the
// host to connect to the control port. The kernel offers no event for the
// latter (poll(2) reports POLLHUP for as long as the host is away), so the
// agent polls.
const portPoll = 50 * time.Millisecond

// ninePOptions are the mount options of every 9p share; msize is the
// largest QEMU accepts, and cache=mmap lets programs mmap shared files
// while the host's view stays coherent.
const ninePOptions = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap"

// runCommand serves the host until the host acknowledges the command's exit.
func runCommand(ctx context.Context, log *slog.Logger) {
	r := newReaper()
	go r.run(ctx)
	sup := newSupervisor(log, r)
	sup.bootedAt = bootTime()
	g := &guest{log: log, mnt: systemMounter()}
	sup.setup = g.setup
	sup.finish = g.finish
	sup.stdio = g.stdio
	acked := make(chan struct{})
	var once sync.Once
	sup.powerOff = func() { once.Do(func() { close(acked) }) }

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go serveControl(ctx, log, sup)
	<-acked
}

// serveControl serves guestctl sessions on the control port for the agent's
// life. The port stays open throughout: closing it would discard what the
// host has already sent. The host drops its side whenever the driver
// restarts; guestctl finds each new connection by its sync marker.
func serveControl(ctx context.Context, log *slog.Logger, h guestctl.Handler) {
	var f *os.File
	for f == nil {
		path, err := waitPort(ctx, portControl)
		if err != nil {
			return
		}
		f, err = os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			log.Warn("open control port", "path", path, "error", err)
			if sleep(ctx, portPoll) != nil {
				return
			}
		}
	}
	defer f.Close()
	err := guestctl.ServePort(ctx, f, h, guestctl.PortConfig{
		AwaitHost: func(ctx context.Context) error { return waitHost(ctx, f) },
		Session: func(started bool, err error) {
			if started {
				log.Info("host connected", "uptime", uptime())
			} else {
				log.Info("host disconnected", "error", err)
			}
		},
	})
	log.Info("control port closed", "error", err)
}

// waitHost waits until the host side of a virtio port is connected, which
// poll(2) shows as POLLHUP going away.
func waitHost(ctx context.Context, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	for {
		var hup bool
		rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, 0); err == nil {
				hup = fds[0].Revents&unix.POLLHUP != 0
			}
		})
		if !hup {
			return nil
		}
		if err := sleep(ctx, portPoll); err != nil {
			return err
		}
	}
}

// waitPort waits for the virtio-serial port called name and returns its
// device path.
func waitPort(ctx context.Context, name string) (string, error) {
	for {
		if p, ok := findPort("/sys/class/virtio-ports", name); ok {
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
		}
		if err := sleep(ctx, portPoll); err != nil {
			return "", fmt.Errorf("wait for port %s: %w", name, err)
		}
	}
}

// findPort looks up a virtio-serial port by name under sysDir
// (/sys/class/virtio-ports) and returns its /dev path.
func findPort(sysDir, name string) (string, bool) {
	entries, err := os.ReadDir(sysDir)
	if err != nil {
		return "", false
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sysDir, e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + e.Name(), true
		}
	}
	return "", false
}

// sleep waits for d or ctx.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// guest configures the VM for a task.
type guest struct {
	log *slog.Logger
	mnt mounter

	mu       sync.Mutex
	mounted  map[string]bool
	detached []*detachedShare // in the order of the Spec's mounts
	netDone  bool
	stdout   int
	stderr   int
	opened   bool
}

// stdioWait bounds the wait for the stdio ports, which the host always
// creates with the control port: by the time Start arrives they exist.
const stdioWait = 5 * time.Second

// stdio opens the stdout and stderr ports once, blocking and write-only. A
// port that does not exist falls back to the console.
func (g *guest) stdio(ctx context.Context) (int, int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.opened {
		return g.stdout, g.stderr, nil
	}
	var fds [2]int
	for i, name := range []string{portStdout, portStderr} {
		wctx, cancel := context.WithTimeout(ctx, stdioWait)
		p, err := waitPort(wctx, name)
		cancel()
		if err != nil {
			g.log.Warn("no stdio port, using the console", "port", name)
			p = "/dev/console"
		}
		fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
		if err != nil {
			return 0, 0, fmt.Errorf("open %s port %s: %w", name, p, err)
		}
		fds[i] = fd
	}
	g.stdout, g.stderr, g.opened = fds[0], fds[1], true
	return g.stdout, g.stderr, nil
}

// setup mounts the shares (or, for detached ones, copies them into memory),
// sets the hostname and configures the network. It can run again after a
// failure: what is done is not redone.
func (g *guest) setup(ctx context.Context, s guestctl.Spec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.mounted == nil {
		g.mounted = make(map[string]bool)
	}
	for _, m := range s.Mounts {
		if g.mounted[m.Path] {
			continue
		}
		if m.Detached {
			d, err := detach(ctx, m, g.mnt)
			if err != nil {
				return err
			}
			g.detached = append(g.detached, d)
			g.log.Info("share detached", "tag", m.Tag, "path", m.Path, "entries", len(d.rec))
		} else if err := mount9p(m); err != nil {
			return err
		}
		g.mounted[m.Path] = true
	}
	if s.Hostname != "" {
		if err := unix.Sethostname([]byte(s.Hostname)); err != nil {
			return fmt.Errorf("set hostname %q: %w", s.Hostname, err)
		}
		os.WriteFile("/etc/hostname", []byte(s.Hostname+"\n"), 0o644)
		os.WriteFile("/etc/hosts", []byte("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t"+s.Hostname+"\n"), 0o644)
	}
	if !g.netDone {
		if err := configureNetwork(ctx, s.Network); err != nil {
			return err
		}
		g.netDone = true
	}
	return nil
}

// finish writes the detached shares that are not read-only back to the
// host once the command has ended. It goes on past a share that fails, and
// runs once: what the command's leftovers write afterwards stays in the
// guest.
func (g *guest) finish(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	var errs errorList
	for _, d := range g.detached {
		if d.mount.ReadOnly {
			continue
		}
		if err := d.writeBack(ctx, g.mnt); err != nil {
			errs.add(fmt.Errorf("copy %s back to the host: %w", d.mount.Path, err))
		}
	}
	g.detached = nil
	return errs.err()
}

func mount9p(m guestctl.Mount) error {
	if m.Tag == "" || !filepath.IsAbs(m.Path) {
		return fmt.Errorf("mount %q on %q: need a tag and an absolute path", m.Tag, m.Path)
	}
	if err := os.MkdirAll(m.Path, 0o755); err != nil {
		return fmt.Errorf("mount %s: create %s: %w", m.Tag, m.Path, err)
	}
	var flags uintptr
	if m.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(m.Tag, m.Path, "9p", flags, ninePOptions); err != nil {
		return fmt.Errorf("mount 9p share %s on %s: %w", m.Tag, m.Path, err)
	}
	return nil
}

// configureNetwork brings lo up and, when n is set, gives the first other
// interface a static address, a default route and a resolver.
func configureNetwork(ctx context.Context, n *guestctl.Network) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	if n == nil {
		return nil
	}
	addr, err := netlink.ParseAddr(n.Address)
	if err != nil {
		return fmt.Errorf("network address %q: %w", n.Address, err)
	}
	link, err := firstNIC(ctx)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("set address %s on %s: %w", n.Address, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring %s up: %w", name, err)
	}
	if n.Gateway != "" {
		gw := net.ParseIP(n.Gateway)
		if gw == nil {
			return fmt.Errorf("network gateway %q is not an IP address", n.Gateway)
		}
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("add default route via %s: %w", n.Gateway, err)
		}
	}
	if n.DNS != "" {
		if err := os.WriteFile("/etc/resolv.conf", []byte("nameserver "+n.DNS+"\n"), 0o644); err != nil {
			return fmt.Errorf("write resolv.conf: %w", err)
		}
	}
	return nil
}

// nicWait bounds the wait for the NIC to appear after its driver loaded.
const nicWait = 5 * time.Second

// firstNIC returns the first non-loopback network interface, waiting a
// little for the driver to register it.
func firstNIC(ctx context.Context) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, nicWait)
	defer cancel()
	for {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, fmt.Errorf("list network interfaces: %w", err)
		}
		for _, l := range links {
			if l.Attrs().Flags&net.FlagLoopback == 0 && l.Type() == "device" {
				return l, nil
			}
		}
		if sleep(ctx, portPoll) != nil {
			return nil, errors.New("the spec asks for a network but the VM has no network interface")
		}
	}
}
