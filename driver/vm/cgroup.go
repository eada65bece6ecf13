package vm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// CgroupMode is which cgroup hierarchy a host runs.
type CgroupMode int

const (
	// CgroupNone means no usable cgroup filesystem.
	CgroupNone CgroupMode = iota
	// CgroupV1 is the legacy per-controller hierarchy (or hybrid: v1 with a v2 tree beside it).
	CgroupV1
	// CgroupV2 is the unified hierarchy.
	CgroupV2
)

// DetectCgroupMode tells which hierarchy is mounted at root (normally /sys/fs/cgroup), the way
// Nomad decides: a cgroup2 filesystem there is v2; anything else with a cpu controller is v1.
func DetectCgroupMode(root string) CgroupMode {
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return CgroupNone
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		return CgroupV2
	}
	if _, err := os.Stat(filepath.Join(root, "cpu")); err == nil {
		return CgroupV1
	}
	return CgroupNone
}

// joinCgroups moves pid into every dir and applies the memory limit where a dir has a memory
// controller. A dir that does not exist is created: Nomad normally creates the task's cgroups
// before StartTask, but a driver test harness may not.
func joinCgroups(pid int, dirs []string, memoryLimitMiB int, cpuShares int64) error {
	var errs []error
	for _, dir := range dirs {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			errs = append(errs, fmt.Errorf("create cgroup %s: %w", dir, err))
			continue
		}
		if memoryLimitMiB > 0 {
			limit := strconv.FormatInt(int64(memoryLimitMiB)<<20, 10)
			for _, f := range []string{"memory.max", "memory.limit_in_bytes"} {
				p := filepath.Join(dir, f)
				if _, err := os.Stat(p); err == nil {
					if err := os.WriteFile(p, []byte(limit), 0o644); err != nil {
						errs = append(errs, fmt.Errorf("set %s: %w", p, err))
					}
				}
			}
		}
		if cpuShares > 0 {
			for f, v := range map[string]int64{"cpu.shares": cpuShares, "cpu.weight": sharesToWeight(cpuShares)} {
				p := filepath.Join(dir, f)
				if _, err := os.Stat(p); err == nil {
					if err := os.WriteFile(p, []byte(strconv.FormatInt(v, 10)), 0o644); err != nil {
						errs = append(errs, fmt.Errorf("set %s: %w", p, err))
					}
				}
			}
		}
		p := filepath.Join(dir, "cgroup.procs")
		if err := os.WriteFile(p, []byte(strconv.Itoa(pid)), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("join %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// sharesToWeight converts cgroup v1 cpu.shares [2, 262144] to v2 cpu.weight [1, 10000], the
// way runc and systemd do.
func sharesToWeight(shares int64) int64 {
	shares = min(max(shares, 2), 262144)
	return 1 + ((shares-2)*9999)/262142
}
