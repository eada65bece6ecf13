package deskvm

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/deskcloud/deskcloud/internal/yield"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
)

// Defaults of the plugin config, in one place; the hclspec below spells the same values.
const (
	defaultQEMUBinary    = "qemu-system-x86_64"
	defaultQEMUImgBinary = "qemu-img"
	defaultStateDir      = "/run/deskvm"
	// defaultCheckpointKey is where the node's checkpoint key lives (created on first use).
	defaultCheckpointKey  = "/var/lib/deskvm/checkpoint.key"
	defaultBootTimeout    = "2m"
	defaultMemoryOverhead = 192 // MiB of QEMU's own memory on top of guest RAM, for the cgroup limit

	// minCommandMemoryMiB is the least guest RAM the guest kit boots in: the kernel plus the
	// unpacked initramfs, with room for a small command.
	minCommandMemoryMiB = 128
	// minImageMemoryMiB is the least guest RAM an image-mode VM gets.
	minImageMemoryMiB = 64
)

// Accelerator settings of the plugin config.
const (
	accelAuto = "auto"
	accelKVM  = "kvm"
	accelTCG  = "tcg"
)

// Network modes of the task config.
const (
	networkNone = "none"
	networkUser = "user"
)

var (
	// configSpec is the plugin config, from the agent's plugin "nomad-driver-deskvm" block.
	configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
		"image_paths":     hclspec.NewAttr("image_paths", "list(string)", false),
		"kernel":          hclspec.NewAttr("kernel", "string", false),
		"initrd":          hclspec.NewAttr("initrd", "string", false),
		"accelerator":     hclspec.NewDefault(hclspec.NewAttr("accelerator", "string", false), hclspec.NewLiteral(`"auto"`)),
		"qemu_binary":     hclspec.NewDefault(hclspec.NewAttr("qemu_binary", "string", false), hclspec.NewLiteral(`"qemu-system-x86_64"`)),
		"qemu_img_binary": hclspec.NewDefault(hclspec.NewAttr("qemu_img_binary", "string", false), hclspec.NewLiteral(`"qemu-img"`)),
		"args_allowlist":  hclspec.NewAttr("args_allowlist", "list(string)", false),
		"state_dir":       hclspec.NewDefault(hclspec.NewAttr("state_dir", "string", false), hclspec.NewLiteral(`"/run/deskvm"`)),
		"boot_timeout":    hclspec.NewDefault(hclspec.NewAttr("boot_timeout", "string", false), hclspec.NewLiteral(`"2m"`)),
		"memory_overhead": hclspec.NewDefault(hclspec.NewAttr("memory_overhead", "number", false), hclspec.NewLiteral("192")),
		"checkpoint_key_file": hclspec.NewDefault(hclspec.NewAttr("checkpoint_key_file", "string", false),
			hclspec.NewLiteral(`"/var/lib/deskvm/checkpoint.key"`)),
		"yield":   yieldSpec,
		"owner":   ownerSpec,
		"harvest": harvestSpec,
	})

	// taskConfigSpec is the task config, from a task's config block.
	taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
		"command":    hclspec.NewAttr("command", "string", false),
		"args":       hclspec.NewAttr("args", "list(string)", false),
		"work_dir":   hclspec.NewAttr("work_dir", "string", false),
		"image":      hclspec.NewAttr("image", "string", false),
		"user_data":  hclspec.NewAttr("user_data", "string", false),
		"network":    hclspec.NewDefault(hclspec.NewAttr("network", "string", false), hclspec.NewLiteral(`"none"`)),
		"ports":      hclspec.NewAttr("ports", "list(string)", false),
		"qemu_args":  hclspec.NewAttr("qemu_args", "list(string)", false),
		"preemption": hclspec.NewAttr("preemption", "string", false),
	})
)

// Config is the plugin config.
type Config struct {
	// ImagePaths are the directories under which task images may live; none means image mode
	// is off on this node.
	ImagePaths []string `codec:"image_paths"`
	// Kernel and Initrd boot command-mode VMs; empty means the guest kit's.
	Kernel string `codec:"kernel"`
	Initrd string `codec:"initrd"`
	// Accelerator is "auto" (KVM when a probe boot works, else TCG), "kvm" or "tcg".
	Accelerator   string `codec:"accelerator"`
	QEMUBinary    string `codec:"qemu_binary"`
	QEMUImgBinary string `codec:"qemu_img_binary"`
	// ArgsAllowlist lists the raw QEMU arguments a task's qemu_args may use.
	ArgsAllowlist []string `codec:"args_allowlist"`
	// StateDir holds the VMs' sockets; it must be a short path (unix sockets are limited to
	// 108 bytes).
	StateDir string `codec:"state_dir"`
	// BootTimeout bounds the time from QEMU's start to the guest command running.
	BootTimeout string `codec:"boot_timeout"`
	// MemoryOverhead is QEMU's own memory in MiB, added to guest RAM for the cgroup limit.
	MemoryOverhead int `codec:"memory_overhead"`
	// CheckpointKeyFile holds the key that signs checkpoints: a checkpoint is restored only
	// if a deskvm with the same key made it for the same task. Created (random, mode 0600)
	// if missing; give every node the same file to resume checkpoints on any of them. ""
	// keeps a random key in the plugin's memory, so checkpoints do not outlive the plugin.
	CheckpointKeyFile string `codec:"checkpoint_key_file"`
	// Yield is the node's yield policy: how VMs give the desktop back to its owner.
	Yield yield.Config `codec:"yield"`
	// Owner says how the owner is sensed.
	Owner OwnerConfig `codec:"owner"`
	// Harvest is the forecast-driven layer: memory handed back ahead of the owner, and the
	// advice to the scheduler.
	Harvest HarvestConfig `codec:"harvest"`
}

// bootTimeout returns BootTimeout parsed; validate has checked it.
func (c *Config) bootTimeout() time.Duration {
	d, _ := time.ParseDuration(c.BootTimeout)
	return d
}

// validate checks the plugin config; each error names the attribute and quotes the value.
func (c *Config) validate() error {
	var errs []error
	switch c.Accelerator {
	case accelAuto, accelKVM, accelTCG:
	default:
		errs = append(errs, fmt.Errorf("accelerator must be one of %q, %q or %q, got %q", accelAuto, accelKVM, accelTCG, c.Accelerator))
	}
	for _, p := range c.ImagePaths {
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("image_paths entries must be absolute paths, got %q", p))
		}
	}
	for key, p := range map[string]string{"kernel": c.Kernel, "initrd": c.Initrd} {
		if p == "" {
			continue
		}
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s must be an absolute path, got %q", key, p))
		} else if _, err := os.Stat(p); err != nil {
			errs = append(errs, fmt.Errorf("%s %q cannot be read: %w", key, p, err))
		}
	}
	if c.QEMUBinary == "" {
		errs = append(errs, errors.New(`qemu_binary must not be empty`))
	}
	if c.QEMUImgBinary == "" {
		errs = append(errs, errors.New(`qemu_img_binary must not be empty`))
	}
	if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("state_dir must be an absolute path, got %q", c.StateDir))
	} else if len(c.StateDir) > 60 {
		errs = append(errs, fmt.Errorf("state_dir must be at most 60 bytes long to leave room for socket names, got %q", c.StateDir))
	}
	if c.CheckpointKeyFile != "" && !filepath.IsAbs(c.CheckpointKeyFile) {
		errs = append(errs, fmt.Errorf("checkpoint_key_file must be an absolute path or empty, got %q", c.CheckpointKeyFile))
	}
	if d, err := time.ParseDuration(c.BootTimeout); err != nil || d <= 0 {
		errs = append(errs, fmt.Errorf("boot_timeout must be a positive duration such as \"2m\", got %q", c.BootTimeout))
	}
	if c.MemoryOverhead < 0 {
		errs = append(errs, fmt.Errorf("memory_overhead must be zero or more MiB, got %d", c.MemoryOverhead))
	}
	for _, a := range c.ArgsAllowlist {
		if !strings.HasPrefix(a, "-") {
			errs = append(errs, fmt.Errorf("args_allowlist entries must be QEMU options starting with \"-\", got %q", a))
		}
	}
	if _, err := c.yieldPolicy(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Owner.validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.Harvest.policy(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// TaskConfig is the task config.
type TaskConfig struct {
	// Command runs inside a fresh guest-kit VM (command mode).
	Command string   `codec:"command"`
	Args    []string `codec:"args"`
	// WorkDir is the command's working directory inside the guest.
	WorkDir string `codec:"work_dir"`
	// Image boots a disk image through a copy-on-write overlay (image mode).
	Image string `codec:"image"`
	// UserData is the cloud-init user data for image mode.
	UserData string `codec:"user_data"`
	// Network is "none" (default) or "user"; ports imply "user".
	Network string `codec:"network"`
	// Ports are the labels of the group's network ports to forward into the guest.
	Ports []string `codec:"ports"`
	// QEMUArgs are raw QEMU arguments; each must be allowed by the plugin's args_allowlist.
	QEMUArgs []string `codec:"qemu_args"`
	// Preemption is what happens once pausing is not enough for the owner: "checkpoint",
	// "suspend" or "restart"; empty takes the node's yield.preemption.
	Preemption string `codec:"preemption"`
}

// validate checks the task config against the plugin config; each error names the attribute
// and quotes the value. Checks that need the file system (image existence and format) are in
// the driver, which also owns qemu-img.
func (tc *TaskConfig) validate(c *Config) error {
	var errs []error
	switch {
	case tc.Command == "" && tc.Image == "":
		errs = append(errs, errors.New(`one of command or image must be set, got neither`))
	case tc.Command != "" && tc.Image != "":
		errs = append(errs, fmt.Errorf("only one of command or image may be set, got command %q and image %q", tc.Command, tc.Image))
	}
	if tc.Image != "" {
		if err := imageAllowed(tc.Image, c.ImagePaths); err != nil {
			errs = append(errs, err)
		}
		if len(tc.Args) > 0 {
			errs = append(errs, fmt.Errorf("args are for command mode, got %q with image %q", tc.Args, tc.Image))
		}
	}
	if tc.Command != "" && tc.UserData != "" {
		errs = append(errs, errors.New("user_data is for image mode, got it with command "+fmt.Sprintf("%q", tc.Command)))
	}
	if tc.WorkDir != "" && !strings.HasPrefix(tc.WorkDir, "/") {
		errs = append(errs, fmt.Errorf("work_dir must be an absolute path inside the guest, got %q", tc.WorkDir))
	}
	switch tc.Network {
	case "", networkNone, networkUser:
	default:
		errs = append(errs, fmt.Errorf("network must be %q or %q, got %q", networkNone, networkUser, tc.Network))
	}
	if tc.Network == networkNone && len(tc.Ports) > 0 {
		errs = append(errs, fmt.Errorf("ports %q need network = %q, got network = %q", tc.Ports, networkUser, tc.Network))
	}
	if err := argsAllowed(tc.QEMUArgs, c.ArgsAllowlist); err != nil {
		errs = append(errs, err)
	}
	if p, err := c.yieldPolicy(); err == nil {
		if _, err := p.ForTask(tc.Preemption); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// imageAllowed checks that image is an absolute, clean path under one of paths.
func imageAllowed(image string, paths []string) error {
	if !filepath.IsAbs(image) {
		return fmt.Errorf("image must be an absolute path, got %q", image)
	}
	clean := filepath.Clean(image)
	if len(paths) == 0 {
		return fmt.Errorf("image %q is not allowed: the plugin config sets no image_paths", image)
	}
	resolved, err := filepath.EvalSymlinks(clean)
	if err != nil {
		resolved = clean // existence is checked later with a clearer message
	}
	for _, p := range paths {
		if pathUnder(clean, p) && pathUnder(resolved, p) {
			return nil
		}
	}
	return fmt.Errorf("image must be under one of image_paths %q, got %q", paths, image)
}

func pathUnder(path, dir string) bool {
	rel, err := filepath.Rel(filepath.Clean(dir), path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && rel != "."
}

// argsAllowed checks raw QEMU arguments against the allow-list: every option (an argument
// starting with "-") must be listed; its value follows it.
func argsAllowed(args, allow []string) error {
	var errs []error
	for i, a := range args {
		if !strings.HasPrefix(a, "-") {
			if i == 0 {
				errs = append(errs, fmt.Errorf("qemu_args must start with an option, got %q", a))
			}
			continue
		}
		if !slices.Contains(allow, a) {
			errs = append(errs, fmt.Errorf("qemu_args option %q is not in the plugin's args_allowlist %q", a, allow))
		}
	}
	return errors.Join(errs...)
}

// Owner sensing sources of the plugin config's owner block.
const (
	sourceProc   = "proc"
	sourceInput  = "input"
	sourceLogind = "logind"
)

// blockAttr is one attribute of a config block with its default, as HCL.
type blockAttr struct {
	key, typ, def string
}

// blockSpec spells a block whose attributes all have defaults: the attributes' own defaults
// apply to a block that is given, and the same values as one literal to a block left out.
func blockSpec(name string, attrs []blockAttr, extra map[string]*hclspec.Spec) *hclspec.Spec {
	obj := map[string]*hclspec.Spec{}
	lines := []string{"{"}
	for _, a := range attrs {
		if a.def == "" {
			obj[a.key] = hclspec.NewAttr(a.key, a.typ, false)
			continue
		}
		obj[a.key] = hclspec.NewDefault(hclspec.NewAttr(a.key, a.typ, false), hclspec.NewLiteral(a.def))
		lines = append(lines, "  "+a.key+" = "+a.def)
	}
	for k, v := range extra {
		obj[k] = v
	}
	lines = append(lines, "}")
	return hclspec.NewDefault(hclspec.NewBlock(name, false, hclspec.NewObject(obj)), hclspec.NewLiteral(strings.Join(lines, "\n")))
}

var (
	// yieldSpec is the plugin config's yield block; its defaults are yield.DefaultConfig's.
	yieldSpec = newYieldSpec(yield.DefaultConfig())

	// ownerSpec is the plugin config's owner block.
	ownerSpec = blockSpec("owner", []blockAttr{
		{"sources", "list(string)", `["proc", "input", "logind"]`},
		{"replay_file", "string", ""},
		{"replay_speed", "number", "1"},
		{"cpu_interval", "string", `"25ms"`},
		{"forecast_state", "string", `"/var/lib/deskvm/forecast.model"`},
		{"forecast_pool", "string", ""},
	}, nil)
)

// newYieldSpec spells the yield block with c's values as its defaults, so the defaults live
// in one place (internal/yield). No cpu_cap_step block means the default steps.
func newYieldSpec(c yield.Config) *hclspec.Spec {
	q := strconv.Quote
	modes := make([]string, len(c.PreemptionModes))
	for i, m := range c.PreemptionModes {
		modes[i] = q(m)
	}
	return blockSpec("yield", []blockAttr{
		{"enabled", "bool", "true"},
		{"cpu_idle_below", "string", q(c.CPUIdleBelow)},
		{"cpu_busy_above", "string", q(c.CPUBusyAbove)},
		{"load_window", "string", q(c.LoadWindow)},
		{"input_active_within", "string", q(c.InputActiveWithin)},
		{"away_after", "string", q(c.AwayAfter)},
		{"locked_is_away", "bool", strconv.FormatBool(c.LockedIsAway)},
		{"settle_after", "string", q(c.SettleAfter)},
		{"cap_window", "string", q(c.CapWindow)},
		{"cap_recover_after", "string", q(c.CapRecoverAfter)},
		{"memory_low_water", "number", strconv.Itoa(c.MemoryLowWater)},
		{"memory_high_water", "number", strconv.Itoa(c.MemoryHighWater)},
		{"memory_recover_after", "string", q(c.MemoryRecoverAfter)},
		{"memory_floor", "number", strconv.Itoa(c.MemoryFloor)},
		{"memory_shortfall_after", "string", q(c.MemoryShortfallAfter)},
		{"suspend_after", "string", q(c.SuspendAfter)},
		{"resume_after", "string", q(c.ResumeAfter)},
		{"checkpoint_after", "string", q(c.CheckpointAfter)},
		{"preemption", "string", q(c.Preemption)},
		{"preemption_modes", "list(string)", "[" + strings.Join(modes, ", ") + "]"},
	}, map[string]*hclspec.Spec{
		"cpu_cap_step": hclspec.NewBlockList("cpu_cap_step", hclspec.NewObject(map[string]*hclspec.Spec{
			"load_above": hclspec.NewAttr("load_above", "string", true),
			"percent":    hclspec.NewAttr("percent", "number", true),
		})),
	})
}

// yieldPolicy returns the yield block as a validated policy.
func (c *Config) yieldPolicy() (yield.Policy, error) {
	p, err := c.Yield.Policy()
	if err != nil {
		return p, fmt.Errorf("yield: %w", err)
	}
	return p, nil
}

// OwnerConfig is the plugin config's owner block: how the desktop's owner is sensed.
type OwnerConfig struct {
	// Sources are the live sources: "proc" (CPU and memory), "input" (/dev/input) and
	// "logind" (idle and lock hints over D-Bus). Empty senses nothing live.
	Sources []string `codec:"sources"`
	// ReplayFile, when set, is a trace of owner samples (see internal/owner) played as one
	// more source, shifted to start when its first row is read; a named pipe works too, for
	// tests and demos that drive the owner as they go.
	ReplayFile string `codec:"replay_file"`
	// ReplaySpeed is trace time per unit of real time; 0 plays as fast as it is read.
	ReplaySpeed float64 `codec:"replay_speed"`
	// CPUInterval is how often the proc source samples the owner's CPU.
	CPUInterval string `codec:"cpu_interval"`
	// ForecastState is where this desktop's forecast model persists; empty keeps it in
	// memory only.
	ForecastState string `codec:"forecast_state"`
	// ForecastPool is a pool prior for a desktop with no history yet; empty uses the
	// built-in one.
	ForecastPool string `codec:"forecast_pool"`
}

// cpuInterval returns CPUInterval parsed; validate has checked it.
func (o OwnerConfig) cpuInterval() time.Duration {
	d, _ := time.ParseDuration(o.CPUInterval)
	return d
}

// validate checks the owner block; each error names the attribute and quotes the value.
func (o OwnerConfig) validate() error {
	var errs []error
	for _, s := range o.Sources {
		switch s {
		case sourceProc, sourceInput, sourceLogind:
		default:
			errs = append(errs, fmt.Errorf("owner.sources entries must be %q, %q or %q, got %q", sourceProc, sourceInput, sourceLogind, s))
		}
	}
	if o.ReplayFile != "" && !filepath.IsAbs(o.ReplayFile) {
		errs = append(errs, fmt.Errorf("owner.replay_file must be an absolute path, got %q", o.ReplayFile))
	}
	if !(o.ReplaySpeed >= 0) || math.IsInf(o.ReplaySpeed, 0) {
		errs = append(errs, fmt.Errorf("owner.replay_speed must be zero or more, got %q", strconv.FormatFloat(o.ReplaySpeed, 'g', -1, 64)))
	}
	if d, err := time.ParseDuration(o.CPUInterval); err != nil || d < 10*time.Millisecond || d > 10*time.Second {
		errs = append(errs, fmt.Errorf("owner.cpu_interval must be a duration from 10ms to 10s, got %q", o.CPUInterval))
	}
	for key, p := range map[string]string{"owner.forecast_state": o.ForecastState, "owner.forecast_pool": o.ForecastPool} {
		if p != "" && !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s must be an absolute path, got %q", key, p))
		}
	}
	return errors.Join(errs...)
}
