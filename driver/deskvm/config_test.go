package deskvm

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

func validConfig() *Config {
	return &Config{
		Accelerator:    accelAuto,
		QEMUBinary:     defaultQEMUBinary,
		QEMUImgBinary:  defaultQEMUImgBinary,
		StateDir:       defaultStateDir,
		BootTimeout:    defaultBootTimeout,
		MemoryOverhead: defaultMemoryOverhead,
		ImagePaths:     []string{"/srv/images"},
	}
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
		{"long state dir", func(c *Config) { c.StateDir = "/" + string(make([]byte, 70)) }, `state_dir must be at most 60 bytes`},
		{"bad boot timeout", func(c *Config) { c.BootTimeout = "soon" }, `boot_timeout must be a positive duration such as "2m", got "soon"`},
		{"negative boot timeout", func(c *Config) { c.BootTimeout = "-1s" }, `boot_timeout must be a positive duration`},
		{"negative overhead", func(c *Config) { c.MemoryOverhead = -1 }, `memory_overhead must be zero or more MiB, got -1`},
		{"allowlist entry", func(c *Config) { c.ArgsAllowlist = []string{"cpu"} }, `args_allowlist entries must be QEMU options starting with "-", got "cpu"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
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
	c := validConfig()
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
	pc := validConfig()
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
	pc := validConfig()
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
	c := validConfig()
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
