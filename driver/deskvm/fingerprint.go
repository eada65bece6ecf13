package deskvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestkit"
	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/atomicfile"
	"github.com/hashicorp/nomad/plugins/drivers"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"
)

const (
	// kvmProbeTimeout bounds the KVM probe boot: a working KVM powers the probe guest off in
	// well under a second; a broken one hangs.
	kvmProbeTimeout = 10 * time.Second
	// tcgProbeTimeout bounds the TCG probe boot, which takes a few seconds.
	tcgProbeTimeout = 90 * time.Second
)

type probeState int

const (
	probePending probeState = iota
	probeDone
)

// hostInfo is what the driver found out about its node by probing.
type hostInfo struct {
	probe       probeState
	err         error // why this node cannot run VMs; nil when it can
	accel       vm.Accelerator
	qemuVersion string
	kernel      string
	initrd      string
}

// probeWait bounds how long StartTask waits for the accelerator probe. A restarted agent may
// place a task before its new plugin has probed (the node still shows the driver healthy from
// before), and the probe takes seconds: the task waits rather than fail.
const probeWait = time.Minute

// waitProbe returns the host info once the probe is done, or as it is after max.
func (d *Driver) waitProbe(max time.Duration) hostInfo {
	deadline := time.Now().Add(max)
	for {
		host := d.hostInfo()
		if host.probe != probePending || !time.Now().Before(deadline) {
			return host
		}
		select {
		case <-d.ctx.Done():
			return host
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (d *Driver) hostInfo() hostInfo {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.host
}

// probeHost finds QEMU, the guest kit and a working accelerator. It boots real probe VMs, so
// it runs in the background while the first fingerprints say it is under way.
func (d *Driver) probeHost(ctx context.Context, c *Config) (info hostInfo) {
	info.probe = probeDone
	defer func() {
		if info.err != nil {
			d.logger.Error("deskvm cannot run vms on this node", "error", info.err)
		} else {
			d.logger.Info("host probed", "accelerator", string(info.accel), "qemu_version", info.qemuVersion)
		}
	}()
	var err error
	if info.qemuVersion, err = vm.QEMUVersion(ctx, c.QEMUBinary); err != nil {
		info.err = fmt.Errorf("qemu_binary: %w", err)
		return info
	}
	if info.kernel, info.initrd, err = guestKit(c); err != nil {
		info.err = err
		return info
	}
	cacheKey := probeCacheKey(c, info)
	if accel, ok := loadProbeCache(c.StateDir, cacheKey); ok {
		info.accel = accel
		return info
	}
	defer func() {
		if info.err == nil {
			if err := saveProbeCache(c.StateDir, cacheKey, info.accel); err != nil {
				d.logger.Warn("accelerator probe not cached; the next plugin start probes again", "error", err)
			}
		}
	}()
	probe := func(a vm.Accelerator, timeout time.Duration) error {
		return vm.ProbeAccelerator(ctx, c.QEMUBinary, info.kernel, info.initrd, a, timeout)
	}
	switch c.Accelerator {
	case accelKVM:
		if err := probe(vm.AccelKVM, kvmProbeTimeout); err != nil {
			info.err = fmt.Errorf("accelerator = %q but a KVM guest does not boot here: %w", accelKVM, err)
			return info
		}
		info.accel = vm.AccelKVM
	case accelTCG:
		if err := probe(vm.AccelTCG, tcgProbeTimeout); err != nil {
			info.err = fmt.Errorf("a TCG guest does not boot: %w", err)
			return info
		}
		info.accel = vm.AccelTCG
	default:
		if kvmOpenable() {
			if err := probe(vm.AccelKVM, kvmProbeTimeout); err == nil {
				info.accel = vm.AccelKVM
				return info
			} else {
				d.logger.Warn("/dev/kvm is there but a KVM guest does not boot; using TCG software emulation", "error", err)
			}
		}
		if err := probe(vm.AccelTCG, tcgProbeTimeout); err != nil {
			info.err = fmt.Errorf("no accelerator boots a guest: %w", err)
			return info
		}
		info.accel = vm.AccelTCG
	}
	return info
}

// probeCacheFile holds the last successful probe's result in state_dir, which is normally on
// tmpfs: a plugin restart reuses it at once, a host reboot probes again.
const probeCacheFile = "accelerator-probe.json"

type probeCache struct {
	Key         string         `json:"key"`
	Accelerator vm.Accelerator `json:"accelerator"`
}

// probeCacheKey changes whenever anything the probe depends on changes.
func probeCacheKey(c *Config, info hostInfo) string {
	stamp := func(p string) string {
		fi, err := os.Stat(p)
		if err != nil {
			return p
		}
		return fmt.Sprintf("%s@%d/%d", p, fi.Size(), fi.ModTime().UnixNano())
	}
	return strings.Join([]string{c.Accelerator, c.QEMUBinary, info.qemuVersion, stamp(info.kernel), stamp(info.initrd)}, "|")
}

func loadProbeCache(dir, key string) (vm.Accelerator, bool) {
	b, err := os.ReadFile(filepath.Join(dir, probeCacheFile))
	if err != nil {
		return "", false
	}
	var pc probeCache
	if json.Unmarshal(b, &pc) != nil || pc.Key != key {
		return "", false
	}
	switch pc.Accelerator {
	case vm.AccelKVM, vm.AccelTCG:
		return pc.Accelerator, true
	}
	return "", false
}

func saveProbeCache(dir, key string, accel vm.Accelerator) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(probeCache{Key: key, Accelerator: accel})
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, probeCacheFile), b, 0o600)
}

func kvmOpenable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// guestKit returns the kernel and initrd for command-mode VMs: the plugin config's, or the
// guest kit's from $DESKVM_GUEST_DIR, from .deps/guest beside a source checkout the plugin
// was built in, or from /usr/share/deskvm/guest.
func guestKit(c *Config) (kernel, initrd string, err error) {
	if c.Kernel != "" && c.Initrd != "" {
		return c.Kernel, c.Initrd, nil
	}
	var dirs []string
	if d := os.Getenv("DESKVM_GUEST_DIR"); d != "" {
		dirs = append(dirs, d)
	}
	if exe, err := os.Executable(); err == nil {
		// bin/plugins/nomad-driver-deskvm in a checkout: the kit is at .deps/guest.
		dirs = append(dirs, filepath.Join(filepath.Dir(exe), "..", "..", ".deps", "guest"))
	}
	dirs = append(dirs, "/usr/share/deskvm/guest")
	for _, dir := range dirs {
		k, i, err := guestkit.BootFiles(dir)
		if err != nil {
			continue
		}
		if c.Kernel != "" {
			k = c.Kernel
		}
		if c.Initrd != "" {
			i = c.Initrd
		}
		return k, i, nil
	}
	return "", "", fmt.Errorf("kernel and initrd are not set and no guest kit was found in %q (run make deps, or set kernel and initrd)", dirs)
}

// Fingerprint sends the driver's health and node attributes: at once, when the host probe
// ends, and then every fingerprintPeriod.
func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go func() {
		defer close(ch)
		timer := time.NewTimer(0)
		defer timer.Stop()
		probeTick := time.NewTicker(250 * time.Millisecond)
		defer probeTick.Stop()
		last := probePending
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			case <-timer.C:
				timer.Reset(fingerprintPeriod)
			case <-d.ownerChanged():
				// The owner's state moved: tell the scheduler now, not a period later.
			case <-probeTick.C:
				// Report the probe's end at once rather than up to a period later.
				if last == probeDone || d.hostInfo().probe == probePending {
					continue
				}
			}
			fp := d.buildFingerprint()
			last = d.hostInfo().probe
			select {
			case ch <- fp:
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

func (d *Driver) buildFingerprint() *drivers.Fingerprint {
	if d.pluginConfig() == nil {
		return &drivers.Fingerprint{Health: drivers.HealthStateUndetected, HealthDescription: "waiting for the plugin config"}
	}
	host := d.hostInfo()
	switch {
	case host.probe == probePending:
		return &drivers.Fingerprint{Health: drivers.HealthStateUndetected, HealthDescription: "probing the accelerator by booting a guest"}
	case host.err != nil:
		var health drivers.HealthState = drivers.HealthStateUnhealthy
		if errors.Is(host.err, os.ErrNotExist) {
			health = drivers.HealthStateUndetected
		}
		return &drivers.Fingerprint{Health: health, HealthDescription: host.err.Error()}
	}
	attrs := map[string]*pstructs.Attribute{
		"driver.deskvm":              pstructs.NewBoolAttribute(true),
		"driver.deskvm.version":      pstructs.NewStringAttribute(PluginVersion),
		"driver.deskvm.accelerator":  pstructs.NewStringAttribute(string(host.accel)),
		"driver.deskvm.qemu_version": pstructs.NewStringAttribute(host.qemuVersion),
	}
	if sensor := d.sensor(); sensor != nil {
		// Coarse owner state and forecast only: raw activity never leaves the desktop.
		now := time.Now()
		for k, v := range sensor.attributes(now) {
			attrs["driver.deskvm."+k] = pstructs.NewStringAttribute(v)
		}
		d.mu.RLock()
		hp := d.harvest
		d.mu.RUnlock()
		if hp != nil {
			if a, ok := sensor.advice(now, *hp); ok {
				attrs["driver.deskvm.harvest.advice"] = pstructs.NewStringAttribute(a)
			}
		}
	}
	return &drivers.Fingerprint{
		Health:            drivers.HealthStateHealthy,
		HealthDescription: drivers.DriverHealthy,
		Attributes:        attrs,
	}
}
