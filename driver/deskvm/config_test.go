package deskvm

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/harvest"
	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

// defaultConfig decodes a plugin config block through the plugin's hclspec, as Nomad does,
// so that tests run on the spec's own defaults.
func defaultConfig(t *testing.T, hcl string) *Config {
	t.Helper()
	var c Config
	hclutils.NewConfigParser(configSpec).ParseHCL(t, "config {\n"+hcl+"\n}", &c)
	return &c
}

func validConfig(t *testing.T) *Config {
	c := defaultConfig(t, `image_paths = ["/srv/images"]`)
	return c
}

func TestConfigSpec_Defaults(t *testing.T) {
	c := defaultConfig(t, "")
	must.NoError(t, c.validate())
	must.Eq(t, defaultStateDir, c.StateDir)
	must.Eq(t, defaultCheckpointKey, c.CheckpointKeyFile)
	must.True(t, c.Yield.Enabled)
	p, err := c.yieldPolicy()
	must.NoError(t, err)
	must.Eq(t, yield.DefaultPolicy(), p, must.Sprint("the yield block's defaults must be yield.DefaultPolicy"))
	must.Eq(t, []string{sourceProc, sourceInput, sourceLogind}, c.Owner.Sources)
	must.Eq(t, 1.0, c.Owner.ReplaySpeed)
	must.True(t, c.Harvest.Enabled)
	hp, err := c.Harvest.policy()
	must.NoError(t, err)
	must.Eq(t, harvest.DefaultForecast(), hp, must.Sprint("the harvest block's defaults must be harvest.DefaultForecast"))

	c = defaultConfig(t, `yield {
  suspend_after = "5s"
  cpu_cap_step {
    load_above = 0.2
    percent    = 40
  }
}
owner {
  sources = ["proc"]
}
harvest {
  shrink_above      = 0.05
  floor_start_below = "0.1"
  drain_above       = "0.2"
}`)
	must.NoError(t, c.validate())
	hp, err = c.Harvest.policy()
	must.NoError(t, err)
	must.Eq(t, 0.05, hp.ShrinkAbove)
	must.Eq(t, 0.1, hp.FloorStartBelow)
	must.Eq(t, 0.2, hp.DrainAbove)
	must.Eq(t, harvest.DefaultForecast().Lead, hp.Lead, must.Sprint("harvest keys left out keep their defaults"))
	p, err = c.yieldPolicy()
	must.NoError(t, err)
	must.Eq(t, 5*time.Second, p.SuspendAfter)
	must.Eq(t, []yield.CapStep{{LoadAbove: 0.2, Percent: 40}}, p.CPUCapSteps)
	must.Eq(t, yield.DefaultPolicy().ResumeAfter, p.ResumeAfter, must.Sprint("keys left out keep their defaults"))
}

func TestConfig_Validate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(c *Config)
		want   string // substring of the error; "" means valid
	}{
		{"defaults", func(c *Config) {}, ""},
		{"unknown accelerator", func(c *Config) { c.Accelerator = "hyperv" }, `accelerator must be one of "auto", "kvm" or "tcg", got "hyperv"`},
		{"relative image path", func(c *Config) { c.ImagePaths = []string{"images"} }, `image_paths entries must be absolute paths, got "images"`},
		{"missing kernel", func(c *Config) { c.Kernel = "/no/such/vmlinuz" }, `kernel "/no/such/vmlinuz" cannot be read`},
		{"relative initrd", func(c *Config) { c.Initrd = "initrd.gz" }, `initrd must be an absolute path, got "initrd.gz"`},
		{"empty qemu binary", func(c *Config) { c.QEMUBinary = "" }, `qemu_binary must not be empty`},
		{"relative state dir", func(c *Config) { c.StateDir = "run" }, `state_dir must be an absolute path, got "run"`},
		{"relative checkpoint key", func(c *Config) { c.CheckpointKeyFile = "checkpoint.key" }, `checkpoint_key_file must be an absolute path or empty, got "checkpoint.key"`},
		{"long state dir", func(c *Config) { c.StateDir = "/" + string(make([]byte, 70)) }, `state_dir must be at most 60 bytes`},
		{"bad boot timeout", func(c *Config) { c.BootTimeout = "soon" }, `boot_timeout must be a positive duration such as "2m", got "soon"`},
		{"negative boot timeout", func(c *Config) { c.BootTimeout = "-1s" }, `boot_timeout must be a positive duration`},
		{"negative overhead", func(c *Config) { c.MemoryOverhead = -1 }, `memory_overhead must be zero or more MiB, got -1`},
		{"allowlist entry", func(c *Config) { c.ArgsAllowlist = []string{"cpu"} }, `args_allowlist entries must be QEMU options starting with "-", got "cpu"`},
		{"yield duration", func(c *Config) { c.Yield.SuspendAfter = "soon" }, `yield: suspend_after must be a duration such as "30s" or "2m", got "soon"`},
		{"yield threshold", func(c *Config) { c.Yield.CPUBusyAbove = "1.5" }, `yield: cpu_busy_above must be a load from 0 to 1, got "1.5"`},
		{"yield preemption", func(c *Config) { c.Yield.Preemption = "hibernate" }, `preemption`},
		{"owner source", func(c *Config) { c.Owner.Sources = []string{"webcam"} }, `owner.sources entries must be "proc", "input" or "logind", got "webcam"`},
		{"owner replay file", func(c *Config) { c.Owner.ReplayFile = "trace.csv" }, `owner.replay_file must be an absolute path, got "trace.csv"`},
		{"owner replay speed", func(c *Config) { c.Owner.ReplaySpeed = -2 }, `owner.replay_speed must be zero or more, got "-2"`},
		{"owner cpu interval", func(c *Config) { c.Owner.CPUInterval = "1ms" }, `owner.cpu_interval must be a duration from 10ms to 10s, got "1ms"`},
		{"owner forecast state", func(c *Config) { c.Owner.ForecastState = "model" }, `owner.forecast_state must be an absolute path, got "model"`},
		{"harvest lead", func(c *Config) { c.Harvest.Lead = "soon" }, `harvest.lead must be a duration such as "10m", got "soon"`},
		{"harvest probability", func(c *Config) { c.Harvest.ShrinkAbove = "often" }, `harvest.shrink_above must be a probability from 0 to 1, got "often"`},
		{"harvest drain", func(c *Config) { c.Harvest.DrainAbove = "2" }, `harvest.drain_above must be a probability from 0 to 1 or "never", got "2"`},
		{"harvest order", func(c *Config) { c.Harvest.StartBelow, c.Harvest.ShrinkAbove = "0.1", "0.05" }, `harvest.shrink_above must be at least harvest.start_below`},
		{"harvest floor start", func(c *Config) { c.Harvest.FloorStartBelow = "sometimes" }, `harvest.floor_start_below must be a probability from 0 to 1, got "sometimes"`},
		{"harvest floor start order", func(c *Config) { c.Harvest.StartBelow, c.Harvest.FloorStartBelow = "0.1", "0.05" }, `harvest.floor_start_below must be at least harvest.start_below (0.1) and at most 1, got 0.05`},
		{"harvest floor start above drain", func(c *Config) { c.Harvest.FloorStartBelow, c.Harvest.DrainAbove = "0.3", "0.2" }, `harvest.floor_start_below must be at most harvest.drain_above (0.2), got 0.3`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig(t)
			tc.mutate(c)
			err := c.validate()
			if tc.want == "" {
				must.NoError(t, err)
				return
			}
			must.ErrorContains(t, err, tc.want)
		})
	}
}

func TestConfig_ValidateCollectsEveryError(t *testing.T) {
	c := validConfig(t)
	c.Accelerator = "xen"
	c.BootTimeout = "x"
	err := c.validate()
	must.ErrorContains(t, err, `accelerator`)
	must.ErrorContains(t, err, `boot_timeout`)
}

func TestTaskConfig_Validate(t *testing.T) {
	images := t.TempDir()
	inside := filepath.Join(images, "app.qcow2")
	must.NoError(t, os.WriteFile(inside, nil, 0o644))
	outsideLink := filepath.Join(images, "escape.qcow2")
	must.NoError(t, os.Symlink("/etc/passwd", outsideLink))
	pc := validConfig(t)
	pc.ImagePaths = []string{images}
	pc.ArgsAllowlist = []string{"-cpu"}

	cases := []struct {
		name string
		tc   TaskConfig
		want string
	}{
		{"command", TaskConfig{Command: "/local/pi.sh"}, ""},
		{"image", TaskConfig{Image: inside, UserData: "#!/bin/sh\n"}, ""},
		{"neither command nor image", TaskConfig{}, "one of command or image must be set, got neither"},
		{"both command and image", TaskConfig{Command: "/bin/true", Image: inside}, `only one of command or image may be set, got command "/bin/true" and image "` + inside + `"`},
		{"image outside image_paths", TaskConfig{Image: "/etc/passwd"}, `image must be under one of image_paths ["` + images + `"], got "/etc/passwd"`},
		{"image escaping by dot-dot", TaskConfig{Image: images + "/../etc/passwd"}, `image must be under one of image_paths`},
		{"image escaping by symlink", TaskConfig{Image: outsideLink}, `image must be under one of image_paths`},
		{"relative image", TaskConfig{Image: "app.qcow2"}, `image must be an absolute path, got "app.qcow2"`},
		{"args with image", TaskConfig{Image: inside, Args: []string{"x"}}, `args are for command mode`},
		{"user_data with command", TaskConfig{Command: "/bin/true", UserData: "x"}, `user_data is for image mode`},
		{"relative work_dir", TaskConfig{Command: "/bin/true", WorkDir: "local"}, `work_dir must be an absolute path inside the guest, got "local"`},
		{"unknown network", TaskConfig{Command: "/bin/true", Network: "bridge"}, `network must be "none" or "user", got "bridge"`},
		{"ports without network", TaskConfig{Command: "/bin/true", Network: "none", Ports: []string{"http"}}, `ports ["http"] need network = "user"`},
		{"allowed qemu arg", TaskConfig{Command: "/bin/true", QEMUArgs: []string{"-cpu", "max"}}, ""},
		{"qemu arg not allowed", TaskConfig{Command: "/bin/true", QEMUArgs: []string{"-device", "vfio-pci"}}, `qemu_args option "-device" is not in the plugin's args_allowlist ["-cpu"]`},
		{"preemption", TaskConfig{Command: "/bin/true", Preemption: "suspend"}, ""},
		{"unknown preemption", TaskConfig{Command: "/bin/true", Preemption: "hibernate"}, `preemption must be one of the node's preemption_modes ["checkpoint" "suspend" "restart"], got "hibernate"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.tc.validate(pc)
			if tc.want == "" {
				must.NoError(t, err)
				return
			}
			must.ErrorContains(t, err, tc.want)
		})
	}
}

func TestGuestCPUs(t *testing.T) {
	compute := cpustats.Compute{TotalCompute: 4000, NumCores: 2}
	cases := []struct {
		name  string
		cores int
		mhz   int64
		want  int
		err   string
	}{
		{"reserved cores", 2, 0, 2, ""},
		{"mhz rounds up", 0, 2100, 2, ""},
		{"small mhz is one vcpu", 0, 100, 1, ""},
		{"mhz capped at host cores", 0, 100000, 2, ""},
		{"zero cores and cpu", 0, 0, 0, "resources.cores or resources.cpu must be positive, got cores = 0 and cpu = 0"},
		{"negative cpu", 0, -5, 0, "got cores = 0 and cpu = -5"},
		{"negative cores", -1, 0, 0, "resources.cores must be positive, got -1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := guestCPUs(tc.cores, tc.mhz, compute)
			if tc.err != "" {
				must.ErrorContains(t, err, tc.err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

func TestBuildSpec(t *testing.T) {
	pc := validConfig(t)
	pc.StateDir = "/run/deskvm"
	host := hostInfo{probe: probeDone, accel: "tcg", kernel: "/k", initrd: "/i"}
	mk := func(mem int64, tc TaskConfig) (*drivers.TaskConfig, *TaskConfig) {
		id := uuid.Generate()
		return &drivers.TaskConfig{
			ID: id + "/pi/1", AllocID: id, Name: "pi", AllocDir: "/var/lib/nomad/alloc/" + id,
			Resources: &drivers.Resources{NomadResources: &structs.AllocatedTaskResources{
				Cpu:    structs.AllocatedCpuResources{ReservedCores: []uint16{0, 1}},
				Memory: structs.AllocatedMemoryResources{MemoryMB: mem},
			}},
		}, &tc
	}

	t.Run("command mode", func(t *testing.T) {
		cfg, tc := mk(512, TaskConfig{Command: "/local/pi.sh", Args: []string{"100000"}})
		spec, err := buildSpec(cfg, tc, pc, host, cpustats.Compute{})
		must.NoError(t, err)
		must.Eq(t, 2, spec.CPUs)
		must.Eq(t, 512, spec.MemoryMiB)
		must.Eq(t, 512+defaultMemoryOverhead, spec.CgroupMemoryLimitMiB)
		must.Eq(t, "/k", spec.Kernel)
		must.Len(t, 3, spec.Shares)
		must.False(t, spec.Network)
		must.SliceContains(t, spec.Args(), "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	})
	t.Run("memory too small for the kernel", func(t *testing.T) {
		cfg, tc := mk(64, TaskConfig{Command: "/bin/true"})
		_, err := buildSpec(cfg, tc, pc, host, cpustats.Compute{})
		must.ErrorContains(t, err, "resources.memory must be at least 128 MiB for the guest to boot, got 64")
	})
	t.Run("unknown port label", func(t *testing.T) {
		cfg, tc := mk(256, TaskConfig{Command: "/bin/true", Network: "user", Ports: []string{"http"}})
		_, err := buildSpec(cfg, tc, pc, host, cpustats.Compute{})
		must.ErrorContains(t, err, `ports entry "http" is not a port label of the group's network block`)
	})
	t.Run("ports forwarded", func(t *testing.T) {
		cfg, tc := mk(256, TaskConfig{Command: "/bin/true", Network: "user", Ports: []string{"http"}})
		cfg.Resources.Ports = &structs.AllocatedPorts{{Label: "http", Value: 25000, To: 8080, HostIP: "127.0.0.1"}}
		spec, err := buildSpec(cfg, tc, pc, host, cpustats.Compute{})
		must.NoError(t, err)
		must.True(t, spec.Network)
		must.SliceContains(t, spec.Args(), "user,id=net0,restrict=off,hostfwd=tcp:127.0.0.1:25000-:8080")
	})
}

func TestProbeCache(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	must.NoError(t, os.WriteFile(kernel, []byte("k"), 0o644))
	c := validConfig(t)
	info := hostInfo{qemuVersion: "7.2.22", kernel: kernel, initrd: kernel}
	key := probeCacheKey(c, info)

	_, ok := loadProbeCache(dir, key)
	must.False(t, ok, must.Sprint("an empty state dir has no cached probe"))
	must.NoError(t, saveProbeCache(dir, key, "tcg"))
	accel, ok := loadProbeCache(dir, key)
	must.True(t, ok)
	must.Eq(t, "tcg", string(accel))

	// A new kernel, QEMU or accelerator setting invalidates the cache.
	must.NoError(t, os.WriteFile(kernel, []byte("new kernel"), 0o644))
	_, ok = loadProbeCache(dir, probeCacheKey(c, info))
	must.False(t, ok, must.Sprint("a changed kernel must be probed again"))
	c.Accelerator = accelKVM
	_, ok = loadProbeCache(dir, probeCacheKey(c, info))
	must.False(t, ok, must.Sprint("a changed accelerator setting must be probed again"))
}
