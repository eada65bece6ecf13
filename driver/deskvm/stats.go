package deskvm

import (
	"context"
	"fmt"
	"runtime"
	"time"

	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/client/lib/numalib/hw"
	cstructs "github.com/hashicorp/nomad/client/structs"
	"github.com/shirou/gopsutil/v3/cpu"
	"github.com/shirou/gopsutil/v3/process"
)

// statsTracker turns QEMU's CPU times into Nomad's percent and ticks.
type statsTracker struct {
	total, user, system *cpustats.Tracker
}

func newStatsTracker(c cpustats.Compute) *statsTracker {
	if c.NumCores <= 0 || c.TotalCompute <= 0 {
		// Without the agent's topology (older agents, test harnesses) ticks would be 0/0.
		c = hostCompute()
	}
	return &statsTracker{total: cpustats.New(c), user: cpustats.New(c), system: cpustats.New(c)}
}

// hostCompute measures the host's cores and MHz the way Nomad's fingerprint would.
func hostCompute() cpustats.Compute {
	cores := runtime.NumCPU()
	mhz := 1000.0
	if infos, err := cpu.Info(); err == nil && len(infos) > 0 && infos[0].Mhz > 0 {
		mhz = infos[0].Mhz
	}
	return cpustats.Compute{TotalCompute: hw.MHz(float64(cores) * mhz), NumCores: cores}
}

// usage measures the VM's QEMU process: its CPU (all vCPUs and QEMU's own threads) and its
// resident memory (guest RAM the guest has touched, plus QEMU).
func (h *taskHandle) usage() (*cstructs.TaskResourceUsage, error) {
	m := h.currentMachine()
	if m == nil {
		return waitingUsage(), nil
	}
	p, err := process.NewProcess(int32(m.PID()))
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", h.spec.Name, err)
	}
	times, err := p.Times()
	if err != nil {
		return nil, fmt.Errorf("vm %s cpu times: %w", h.spec.Name, err)
	}
	mem, err := p.MemoryInfo()
	if err != nil {
		return nil, fmt.Errorf("vm %s memory: %w", h.spec.Name, err)
	}
	const nanos = float64(time.Second)
	h.mu.Lock()
	total := h.stats.total.Percent((times.User + times.System) * nanos)
	user := h.stats.user.Percent(times.User * nanos)
	system := h.stats.system.Percent(times.System * nanos)
	ticks := h.stats.total.TicksConsumed(total)
	h.mu.Unlock()
	now := time.Now()
	return &cstructs.TaskResourceUsage{
		ResourceUsage: &cstructs.ResourceUsage{
			CpuStats: &cstructs.CpuStats{
				Percent:    total,
				UserMode:   user,
				SystemMode: system,
				TotalTicks: ticks,
				Measured:   []string{"Percent", "User Mode", "System Mode", "Total Ticks"},
			},
			MemoryStats: &cstructs.MemoryStats{
				RSS:      mem.RSS,
				Usage:    mem.RSS,
				Measured: []string{"RSS", "Usage"},
			},
		},
		Timestamp: now.UnixNano(),
	}, nil
}

// TaskStats streams the VM's resource usage every interval until ctx ends or the task does.
func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *cstructs.TaskResourceUsage, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, nil
	}
	ch := make(chan *cstructs.TaskResourceUsage)
	go func() {
		defer close(ch)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if u, err := h.usage(); err == nil {
				select {
				case ch <- u:
				case <-ctx.Done():
					return
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-h.doneCh:
				return
			case <-t.C:
			}
		}
	}()
	return ch, nil
}

// waitingUsage is the usage of a task waiting on disk: no VM, so no CPU and no memory.
func waitingUsage() *cstructs.TaskResourceUsage {
	return &cstructs.TaskResourceUsage{
		ResourceUsage: &cstructs.ResourceUsage{
			CpuStats: &cstructs.CpuStats{
				Measured: []string{"Percent", "User Mode", "System Mode", "Total Ticks"},
			},
			MemoryStats: &cstructs.MemoryStats{
				Measured: []string{"RSS", "Usage"},
			},
		},
		Timestamp: time.Now().UnixNano(),
	}
}
