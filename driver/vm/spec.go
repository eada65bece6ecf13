// Package vm runs and controls one QEMU virtual machine per task: it builds the QEMU command
// line, starts QEMU detached so the VM outlives the process that started it, reattaches to a
// running VM by pid and QMP, and places QEMU in cgroups. It knows nothing of Nomad.
package vm

import (
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// Accelerator is how QEMU executes guest code.
type Accelerator string

const (
	// AccelKVM runs guest code on the CPU through /dev/kvm.
	AccelKVM Accelerator = "kvm"
	// AccelTCG emulates the CPU in software: slow, but works everywhere.
	AccelTCG Accelerator = "tcg"
)

// Guest serial port names; the guest agent finds its ports by these names.
const (
	PortControl = "deskvm.ctl"
	PortStdout  = "deskvm.stdout"
	PortStderr  = "deskvm.stderr"
)

// tcgCacheMiB bounds QEMU's translation cache under TCG; QEMU's default of 1 GiB would make
// every VM's footprint far larger than its guest RAM.
const tcgCacheMiB = 64

// Share is a host directory exported to the guest over virtio-9p under Tag.
type Share struct {
	Tag      string
	HostPath string
	ReadOnly bool
}

// PortForward forwards a host port to a guest port over QEMU user-mode networking.
type PortForward struct {
	HostIP    string
	HostPort  int
	GuestPort int
	UDP       bool
}

// Disk is a disk image attached as the boot disk.
type Disk struct {
	Path   string
	Format string // "qcow2" or "raw"
}

// CommandAppend is the kernel command line of a command-mode guest: deskvm's own kernel and
// initramfs, whose agent runs the task's command. init_on_alloc=0 stops the guest kernel
// zeroing every page it allocates, which Debian's kernels do by default: the balloon
// allocates every page it hands back to the owner, so with zeroing on, handing back 1 GiB
// under TCG took 2.8-3.3 s, and with it off 0.8-1.3 s (BenchmarkBalloon). Zeroing protects
// the guest's processes from each other's stale data, not the host: a command-mode guest
// runs one task, and pages the host takes back come back to any guest zeroed by the host.
const CommandAppend = "console=ttyS0 panic=-1 quiet deskvm.mode=command init_on_alloc=0"

// balloonFeatures are the virtio-balloon device's properties. A checkpoint records them
// (manifest "balloon"): QEMU loads a state saved with a feature negotiated only into a
// device that offers it, and its error then names no property.
const balloonFeatures = "free-page-reporting=on"

// Spec describes one VM. It is everything needed to start the VM and, saved with the task,
// everything needed to find it again after a restart.
type Spec struct {
	// Name identifies the VM on the host (QEMU -name); Attach checks it against the process.
	Name string
	// StateDir holds the VM's private files: logs, disk overlay, seed.
	StateDir string
	// SocketDir holds the QMP and control sockets; unix socket paths are limited to 108 bytes,
	// so this is a short path apart from StateDir.
	SocketDir string

	QEMUBinary  string
	Accelerator Accelerator
	CPUs        int
	MemoryMiB   int

	// Kernel, Initrd and Append boot a kernel directly (command mode).
	Kernel string
	Initrd string
	Append string
	// Disk boots a disk image (image mode).
	Disk *Disk
	// Seed is a cloud-init NoCloud seed image attached read-only, if set.
	Seed string

	Shares []Share
	// Stdout and Stderr receive the guest's stdout and stderr ports (command mode). In image
	// mode the serial console goes to Stdout instead.
	Stdout string
	Stderr string

	// Network gives the guest a user-mode network interface.
	Network bool
	Ports   []PortForward

	// CgroupDirs are cgroup directories QEMU joins right after it starts.
	CgroupDirs []string
	// CgroupMemoryLimitMiB caps QEMU's memory in those cgroups (guest RAM plus QEMU itself).
	CgroupMemoryLimitMiB int
	// CgroupCPUShares is the VM's relative CPU weight (cgroup v1 cpu.shares; converted to
	// cpu.weight on v2), as Nomad gives it for the task's cpu MHz.
	CgroupCPUShares int64

	// ExtraArgs are appended verbatim; the caller has checked them against its allow-list.
	ExtraArgs []string

	// Incoming is the state file of a checkpoint to resume from (see Restore). QEMU then
	// starts with -incoming defer and waits, paused, for the state to be fed in over QMP.
	Incoming string
}

// QMPSocket is the path of the VM's QMP monitor socket.
func (s *Spec) QMPSocket() string { return filepath.Join(s.SocketDir, "qmp.sock") }

// ControlSocket is the path of the socket behind the guest agent's control port.
func (s *Spec) ControlSocket() string { return filepath.Join(s.SocketDir, "ctl.sock") }

// ConsoleLog is where the guest's serial console is written in command mode.
func (s *Spec) ConsoleLog() string { return filepath.Join(s.StateDir, "console.log") }

// QEMULog receives QEMU's own stdout and stderr.
func (s *Spec) QEMULog() string { return filepath.Join(s.StateDir, "qemu.log") }

// PIDFile is where the VM's QEMU pid is recorded.
func (s *Spec) PIDFile() string { return filepath.Join(s.StateDir, "qemu.pid") }

// Validate checks the spec for what would make QEMU fail or misbehave.
func (s *Spec) Validate() error {
	var errs []error
	if s.Name == "" || strings.ContainsAny(s.Name, ", \t\n") {
		errs = append(errs, fmt.Errorf("vm name must be non-empty without commas or spaces, got %q", s.Name))
	}
	if s.StateDir == "" {
		errs = append(errs, errors.New("vm state dir must be set"))
	}
	if n := len(s.QMPSocket()); n > 107 {
		errs = append(errs, fmt.Errorf("socket dir %q is too long for a unix socket path (%d bytes)", s.SocketDir, n))
	}
	switch s.Accelerator {
	case AccelKVM, AccelTCG:
	default:
		errs = append(errs, fmt.Errorf("accelerator must be %q or %q, got %q", AccelKVM, AccelTCG, s.Accelerator))
	}
	if s.CPUs < 1 {
		errs = append(errs, fmt.Errorf("vm needs at least one vCPU, got %d", s.CPUs))
	}
	if s.MemoryMiB < 16 {
		errs = append(errs, fmt.Errorf("vm needs at least 16 MiB of memory, got %d", s.MemoryMiB))
	}
	if (s.Kernel == "") == (s.Disk == nil) {
		errs = append(errs, errors.New("vm boots either a kernel or a disk, not both or neither"))
	}
	for _, p := range []string{s.Kernel, s.Initrd, s.Append, s.Seed, s.Stdout, s.Stderr} {
		if strings.Contains(p, ",") && p != s.Append {
			errs = append(errs, fmt.Errorf("path %q contains a comma, which QEMU cannot take", p))
		}
	}
	for _, sh := range s.Shares {
		if sh.Tag == "" || strings.ContainsAny(sh.Tag, ", ") || strings.Contains(sh.HostPath, ",") {
			errs = append(errs, fmt.Errorf("share %q at %q: tag and path must be non-empty without commas", sh.Tag, sh.HostPath))
		}
	}
	return errors.Join(errs...)
}

// Args builds QEMU's command line (without the binary).
func (s *Spec) Args() []string {
	accel := string(s.Accelerator)
	if s.Accelerator == AccelTCG {
		accel += ",tb-size=" + strconv.Itoa(tcgCacheMiB)
	}
	args := []string{
		"-name", s.Name + ",debug-threads=on",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "q35", "-accel", accel,
		"-cpu", cpuModel(s.Accelerator),
		"-smp", strconv.Itoa(s.CPUs),
		"-m", strconv.Itoa(s.MemoryMiB),
		"-no-reboot",
		"-qmp", "unix:" + s.QMPSocket() + ",server=on,wait=off",
		// Free page reporting (QEMU 5.1+): the guest hands memory it frees back to the host
		// unasked, in 2 MiB and larger chunks some seconds later, so the balloon has to take
		// only memory the guest uses. A guest kernel without it (before 5.7) ignores it.
		// State saved with it negotiated loads only into a device that has it.
		"-device", "virtio-balloon-pci,id=balloon0," + balloonFeatures,
		"-device", "virtio-rng-pci",
		// Deny the guest (and a compromised QEMU) new privileges, new processes and
		// changes to its own scheduling: the owner's desktop does not trust the job.
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
	}
	if s.Kernel != "" {
		args = append(args, "-kernel", s.Kernel)
		if s.Initrd != "" {
			args = append(args, "-initrd", s.Initrd)
		}
		args = append(args, "-append", s.Append)
	}
	if s.Disk != nil {
		args = append(args,
			"-drive", "if=none,id=disk0,cache=writeback,discard=unmap,format="+s.Disk.Format+",file="+s.Disk.Path,
			"-device", "virtio-blk-pci,drive=disk0,bootindex=0")
	}
	if s.Seed != "" {
		args = append(args,
			"-drive", "if=none,id=seed0,readonly=on,format=raw,file="+s.Seed,
			"-device", "virtio-blk-pci,drive=seed0")
	}
	if s.Disk != nil && s.Stdout != "" {
		args = append(args, "-chardev", "file,id=console,path="+s.Stdout, "-serial", "chardev:console")
	} else {
		args = append(args, "-serial", "file:"+s.ConsoleLog())
	}
	if s.Kernel != "" {
		args = append(args,
			"-device", "virtio-serial-pci,id=vser0",
			"-chardev", "socket,id=ctl,path="+s.ControlSocket()+",server=on,wait=off",
			"-device", "virtserialport,chardev=ctl,name="+PortControl)
		if s.Stdout != "" {
			args = append(args, "-chardev", "file,id=out,path="+s.Stdout,
				"-device", "virtserialport,chardev=out,name="+PortStdout)
		}
		if s.Stderr != "" {
			args = append(args, "-chardev", "file,id=err,path="+s.Stderr,
				"-device", "virtserialport,chardev=err,name="+PortStderr)
		}
	}
	for i, sh := range s.Shares {
		id := "fs" + strconv.Itoa(i)
		fsdev := "local,id=" + id + ",path=" + sh.HostPath + ",security_model=mapped-xattr"
		if sh.ReadOnly {
			fsdev += ",readonly=on"
		}
		args = append(args, "-fsdev", fsdev, "-device", "virtio-9p-pci,fsdev="+id+",mount_tag="+sh.Tag)
	}
	if s.Network || len(s.Ports) > 0 {
		netdev := "user,id=net0,restrict=off"
		for _, p := range s.Ports {
			proto := "tcp"
			if p.UDP {
				proto = "udp"
			}
			netdev += fmt.Sprintf(",hostfwd=%s:%s:%d-:%d", proto, p.HostIP, p.HostPort, p.GuestPort)
		}
		args = append(args, "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0")
	}
	if s.Incoming != "" {
		args = append(args, "-incoming", "defer")
	}
	return append(args, s.ExtraArgs...)
}

func cpuModel(a Accelerator) string {
	if a == AccelKVM {
		return "host"
	}
	return "max"
}
