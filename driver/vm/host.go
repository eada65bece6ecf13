package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

var qemuVersionRe = regexp.MustCompile(`version (\d+\.\d+(?:\.\d+)?)`)

// QEMUVersion returns the version of the QEMU binary, e.g. "7.2.19".
func QEMUVersion(ctx context.Context, binary string) (string, error) {
	out, err := exec.CommandContext(ctx, binary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("run %s --version: %w", binary, err)
	}
	m := qemuVersionRe.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("%s --version printed no version: %q", binary, firstLine(out))
	}
	return string(m[1]), nil
}

// ProbeAccelerator tells whether accel really runs guests on this host by booting kernel and
// initrd with "deskvm.mode=probe", which makes the guest agent power off at once. On some
// hosts /dev/kvm exists but a KVM guest hangs; only a boot tells.
func ProbeAccelerator(ctx context.Context, binary, kernel, initrd string, accel Accelerator, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "deskvm-probe-")
	if err != nil {
		return fmt.Errorf("probe %s: %w", accel, err)
	}
	defer os.RemoveAll(dir)
	accelArg := string(accel)
	if accel == AccelTCG {
		accelArg += ",tb-size=16"
	}
	cmd := exec.CommandContext(ctx, binary,
		"-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35",
		"-accel", accelArg, "-cpu", cpuModel(accel), "-m", "128", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet deskvm.mode=probe",
		"-serial", "file:"+filepath.Join(dir, "console.log"))
	// A probe guest must not outlive a plugin killed mid-probe: a hung KVM guest would spin
	// forever. (Task VMs are the opposite: they are started to outlive the plugin.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return fmt.Errorf("probe %s: guest did not power off within %s", accel, timeout)
	}
	if err != nil {
		return fmt.Errorf("probe %s: %w: %s", accel, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ImageInfo is what qemu-img tells of a disk image.
type ImageInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	BackingFile string `json:"backing-filename"`
}

// InspectImage runs qemu-img info on path.
func InspectImage(ctx context.Context, qemuImg, path string) (ImageInfo, error) {
	out, err := exec.CommandContext(ctx, qemuImg, "info", "--output=json", "--force-share", path).Output()
	if err != nil {
		var msg string
		if ee, ok := err.(*exec.ExitError); ok {
			msg = strings.TrimSpace(string(ee.Stderr))
		}
		return ImageInfo{}, fmt.Errorf("inspect image %q: %w: %s", path, err, msg)
	}
	var info ImageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return ImageInfo{}, fmt.Errorf("inspect image %q: decode qemu-img output: %w", path, err)
	}
	return info, nil
}

// CreateOverlay creates a qcow2 copy-on-write overlay over base so that the VM never writes
// the base image.
func CreateOverlay(ctx context.Context, qemuImg, base, baseFormat, overlay string) error {
	out, err := exec.CommandContext(ctx, qemuImg, "create", "-q", "-f", "qcow2",
		"-b", base, "-F", baseFormat, overlay).CombinedOutput()
	if err != nil {
		return fmt.Errorf("create overlay over %q: %w: %s", base, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}
