// Package deskvm is the Nomad task driver that runs each task in a QEMU VM. It speaks to VMs
// only through the Hypervisor interface; package vm and package guestctl do the VM work.
package deskvm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/drivers/fsisolation"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
)

const (
	// PluginName is the driver name jobs use: driver = "deskvm".
	PluginName = "deskvm"
	// PluginVersion is this driver's version, reported as driver.deskvm.version.
	PluginVersion = "0.1.0"

	// fingerprintPeriod is how often the driver re-fingerprints.
	fingerprintPeriod = 30 * time.Second
	// taskHandleVersion is the version of taskState this driver writes and reads.
	taskHandleVersion = 1
)

var (
	pluginInfo = &base.PluginInfoResponse{
		Type:              base.PluginTypeDriver,
		PluginApiVersions: []string{drivers.ApiVersion010},
		PluginVersion:     PluginVersion,
		Name:              PluginName,
	}

	capabilities = &drivers.Capabilities{
		SendSignals: true,
		Exec:        true,
		// The guest sees the task dir at /local, /secrets and /alloc, like an image-based
		// driver, so Nomad sets NOMAD_TASK_DIR and friends to those paths.
		FSIsolation:       fsisolation.Image,
		NetIsolationModes: []drivers.NetIsolationMode{drivers.NetIsolationModeHost},
		MountConfigs:      drivers.MountConfigSupportNone,
	}
)

var _ drivers.DriverPlugin = (*Driver)(nil)

// Driver is the deskvm task driver.
type Driver struct {
	eventer *eventer.Eventer
	hv      Hypervisor
	probe   func(context.Context, *Config) hostInfo // finds QEMU, the guest kit and an accelerator
	tasks   *taskStore
	ctx     context.Context // ends when the plugin shuts down
	cancel  context.CancelFunc
	logger  hclog.Logger

	mu     sync.RWMutex // guards what SetConfig and the accelerator probe set
	config *Config
	policy yield.Policy // the node's yield policy, from config
	// owner senses the desktop's owner. It starts with the first fingerprint, task or
	// recovery after SetConfig, not at SetConfig: Nomad also starts a plugin only to check
	// its config, and that instance must not read the owner's devices, take a replay pipe's
	// samples or write the forecast's state.
	owner *ownerSensor
	// harvest is the harvest block's forecast policy; nil when it is off.
	harvest *harvest.Forecast
	// ckey signs the checkpoints this driver makes and checks those it restores.
	ckey    *checkpointKey
	compute cpustats.Compute
	host    hostInfo
}

// NewDriver returns a deskvm driver that runs real QEMU VMs.
func NewDriver(logger hclog.Logger) *Driver {
	return newDriver(logger, qemuHypervisor{})
}

func newDriver(logger hclog.Logger, hv Hypervisor) *Driver {
	ctx, cancel := context.WithCancel(context.Background())
	logger = logger.Named(PluginName)
	d := &Driver{
		eventer: eventer.NewEventer(ctx, logger),
		hv:      hv,
		tasks:   newTaskStore(),
		ctx:     ctx,
		cancel:  cancel,
		logger:  logger,
		host:    hostInfo{probe: probePending},
	}
	d.probe = d.probeHost
	return d
}

// PluginInfo describes the plugin to Nomad.
func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) { return pluginInfo, nil }

// ConfigSchema returns the plugin config's schema.
func (d *Driver) ConfigSchema() (*hclspec.Spec, error) { return configSpec, nil }

// SetConfig takes the plugin config, validates it, and starts probing the host.
func (d *Driver) SetConfig(cfg *base.Config) error {
	var c Config
	if len(cfg.PluginConfig) != 0 {
		if err := base.MsgPackDecode(cfg.PluginConfig, &c); err != nil {
			return fmt.Errorf("decode deskvm plugin config: %w", err)
		}
	}
	if err := c.validate(); err != nil {
		return fmt.Errorf("invalid deskvm plugin config: %w", err)
	}
	policy, err := c.yieldPolicy()
	if err != nil {
		return fmt.Errorf("invalid deskvm plugin config: %w", err)
	}
	var compute cpustats.Compute
	if cfg.AgentConfig != nil {
		compute = cfg.AgentConfig.Compute()
	}
	var hp *harvest.Forecast
	if c.Harvest.Enabled {
		f, err := c.Harvest.policy()
		if err != nil {
			return fmt.Errorf("invalid deskvm plugin config: %w", err)
		}
		hp = &f
	}
	d.mu.Lock()
	d.config = &c
	d.policy = policy
	d.harvest = hp
	d.ckey = newCheckpointKey(c.CheckpointKeyFile)
	d.compute = compute
	d.mu.Unlock()
	go func() {
		info := d.probe(d.ctx, &c)
		d.mu.Lock()
		d.host = info
		d.mu.Unlock()
	}()
	return nil
}

// sensor returns the owner sensor, starting it the first time once the driver has its
// config; nil before SetConfig.
func (d *Driver) sensor() *ownerSensor {
	d.mu.RLock()
	sensor, c, policy := d.owner, d.config, d.policy
	d.mu.RUnlock()
	if sensor != nil || c == nil {
		return sensor
	}
	d.mu.Lock()
	start := d.owner == nil
	if start {
		d.owner = newOwnerSensor(d.logger, c, ownerPolicy{thresholds: policy.Owner, lowWaterMiB: policy.MemoryLowWaterMiB})
	}
	sensor = d.owner
	d.mu.Unlock()
	if start {
		go sensor.run(d.ctx, c)
	}
	return sensor
}

func (d *Driver) pluginConfig() *Config {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.config
}

// TaskConfigSchema returns the task config's schema.
func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error) { return taskConfigSpec, nil }

// Capabilities tells Nomad what the driver supports.
func (d *Driver) Capabilities() (*drivers.Capabilities, error) { return capabilities, nil }

// RecoverTask finds a task's VM again after a restart of the plugin or the Nomad agent. It
// checks the real VM (pid and QMP) rather than assuming it runs. A task that was waiting on
// disk waits again, or finds the VM that came up from its checkpoint.
func (d *Driver) RecoverTask(handle *drivers.TaskHandle) error {
	if handle == nil {
		return errors.New("recover task: handle is nil")
	}
	if _, ok := d.tasks.Get(handle.Config.ID); ok {
		return nil
	}
	var st taskState
	if err := handle.GetDriverState(&st); err != nil {
		return fmt.Errorf("recover task %s: decode driver state: %w", handle.Config.ID, err)
	}
	// The driver state's copy of the task config has lost the task's driver config (Nomad's
	// TaskConfig does not encode it there); Nomad's own copy has it, and checkpoints are
	// signed for it (taskIdentity).
	st.TaskConfig = handle.Config
	if st.WaitingOn != "" {
		return d.recoverWaiting(handle, st)
	}
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	m, err := d.hv.Attach(ctx, st.Spec, st.PID)
	if err != nil {
		return fmt.Errorf("recover task %s: %w", handle.Config.ID, err)
	}
	h := d.newHandle(st.TaskConfig, st.Mode, st.Spec, m, time.Unix(0, st.StartedAt))
	d.tasks.Set(handle.Config.ID, h)
	go h.run(d.ctx)
	if st.Yield {
		d.startYield(h, st.Preemption, vmInfo(ctx, m, st.Spec.MemoryMiB), true)
	}
	d.logger.Info("recovered task", "task_id", handle.Config.ID, "vm", st.Spec.Name, "pid", st.PID)
	return nil
}

// startYield runs the task's yield loop under the node's policy narrowed to the task's
// preemption mode, which StartTask has validated.
func (d *Driver) startYield(h *taskHandle, preemption string, start yield.VMInfo, announce bool) {
	sensor := d.sensor()
	d.mu.RLock()
	policy, hp := d.policy, d.harvest
	d.mu.RUnlock()
	p, err := policy.ForTask(preemption)
	if err != nil || sensor == nil {
		h.events("yield off for this task: "+fmt.Sprint(err), nil)
		return
	}
	d.excludeVMs()
	go func() {
		h.runYield(d.ctx, sensor, p, hp, start, announce)
		<-h.doneCh
		d.excludeVMs()
	}()
}

// excludeVMs tells owner sensing which processes are this driver's VMs.
func (d *Driver) excludeVMs() {
	d.mu.RLock()
	sensor := d.owner
	d.mu.RUnlock()
	if sensor == nil {
		return
	}
	var pids []int
	var cgroups []string
	for _, h := range d.tasks.All() {
		m := h.currentMachine()
		if m == nil || !h.isRunning() {
			continue // a task waiting on disk has no VM
		}
		// Each VM once: by the cgroup that counts its CPU in nanoseconds where it has one,
		// otherwise by its pid, whose /proc figures run in 10 ms ticks.
		if dir := accountingCgroup(h.spec.CgroupDirs); dir != "" {
			cgroups = append(cgroups, dir)
		} else {
			pids = append(pids, m.PID())
		}
	}
	sensor.exclude(pids, cgroups)
}

func (d *Driver) newHandle(cfg *drivers.TaskConfig, mode string, spec vm.Spec, m Machine, started time.Time) *taskHandle {
	d.mu.RLock()
	compute := d.compute
	d.mu.RUnlock()
	return &taskHandle{
		taskConfig: cfg,
		ckey:       d.checkpointKey(),
		mode:       mode,
		spec:       spec,
		machine:    m,
		startedAt:  started,
		logger:     d.logger.With("task_id", cfg.ID, "vm", spec.Name),
		events:     func(msg string, ann map[string]string) { d.emit(cfg, msg, ann) },
		doneCh:     make(chan struct{}),
		state:      drivers.TaskStateRunning,
		stats:      newStatsTracker(compute),
	}
}

func (d *Driver) emit(cfg *drivers.TaskConfig, msg string, ann map[string]string) {
	err := d.eventer.EmitEvent(&drivers.TaskEvent{
		TaskID:      cfg.ID,
		TaskName:    cfg.Name,
		AllocID:     cfg.AllocID,
		Timestamp:   time.Now(),
		Message:     msg,
		Annotations: ann,
	})
	if err != nil {
		d.logger.Warn("emit task event", "task_id", cfg.ID, "error", err)
	}
}

// WaitTask returns a channel that yields the task's exit result once it ends.
func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		select {
		case <-h.doneCh:
			ch <- h.status().ExitResult
		case <-ctx.Done():
		case <-d.ctx.Done():
		}
	}()
	return ch, nil
}

// StopTask stops the task: signal (or SIGTERM), then SIGKILL after timeout; an image-mode
// VM gets an ACPI power-down instead of the signal. A task that yields by checkpoint is
// checkpointed instead, so that its replacement resumes it (drain.go).
func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if d.checkpointsOnStop(h) && h.checkpointForStop() {
		return nil
	}
	return h.stop(timeout, signal)
}

// DestroyTask forgets the task; with force, a running VM is killed first. A task waiting on
// disk has no VM to lose: its wait ends, with or without force, and its checkpoint stays.
func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if h.endWait(killedResult()) {
		if err := h.awaitWaitEnd(); err != nil {
			return err
		}
	}
	if h.isRunning() {
		if !force {
			return fmt.Errorf("cannot destroy running task %s", taskID)
		}
		if err := h.kill(); err != nil {
			return err
		}
		if !h.waitDone(10 * time.Second) {
			return fmt.Errorf("vm %s did not exit after kill", h.spec.Name)
		}
	}
	_ = os.RemoveAll(h.spec.SocketDir)
	removeOwnCgroups(h.spec.CgroupDirs)
	d.tasks.Delete(taskID)
	return nil
}

// accountingCgroup is the one of a task's cgroup dirs that counts its CPU time, or "".
func accountingCgroup(dirs []string) string {
	for _, dir := range dirs {
		if _, _, ok := owner.CgroupCounter(dir); ok {
			return dir
		}
	}
	return ""
}

// removeOwnCgroups removes the task's cgroups that Nomad does not: on cgroup v1, a yielding
// task's own cpu cgroup (cgroupDirs), and the cpuacct dir where cpuacct is mounted apart
// from cpu (Nomad removes the controllers it manages). A cgroup dir is removed with rmdir
// once no process is in it.
func removeOwnCgroups(dirs []string) {
	acct := filepath.Join(cgroupRoot, "cpuacct") + string(filepath.Separator)
	cpu := filepath.Join(cgroupRoot, "cpu", ownCPUPrefix)
	for _, dir := range dirs {
		if strings.HasPrefix(dir, acct) || strings.HasPrefix(dir, cpu) {
			_ = os.Remove(dir)
		}
	}
}

// InspectTask returns the task's status.
func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h.status(), nil
}

// TaskEvents streams the driver's task events.
func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

// SignalTask sends a signal to the guest command.
func (d *Driver) SignalTask(taskID string, signal string) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	sig, err := parseSignal(signal)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	return h.signal(ctx, sig)
}

// Shutdown stops following tasks; their VMs keep running for the next driver to recover.
func (d *Driver) Shutdown() {
	d.cancel()
	for _, h := range d.tasks.All() {
		if g := h.currentGuest(); g != nil {
			_ = g.Close()
		}
		if m := h.currentMachine(); m != nil {
			_ = m.Close()
		}
	}
}

// vmName names a task's VM after its task id, which is unique per task run on a node.
func vmName(taskID string) string {
	sum := sha256.Sum256([]byte(taskID))
	return "deskvm-" + hex.EncodeToString(sum[:])[:16]
}

// socketDir is the VM's short socket dir under the plugin's state_dir.
func socketDir(stateDir, name string) string {
	return filepath.Join(stateDir, name)
}

// ownerActive reports whether the desktop's owner is active now.
func (d *Driver) ownerActive() bool {
	d.mu.RLock()
	sensor := d.owner
	d.mu.RUnlock()
	return sensor != nil && sensor.active()
}

// ownerChanged is signalled when the owner's state changes; nil (never ready) before the
// sensor starts.
func (d *Driver) ownerChanged() <-chan struct{} {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.owner == nil {
		return nil
	}
	return d.owner.changed
}
