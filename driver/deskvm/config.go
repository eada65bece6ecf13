package deskvm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"
)

// Defaults of the plugin config, in one place; the hclspec below spells the same values.
const (
	defaultQEMUBinary     = "qemu-system-x86_64"
	defaultQEMUImgBinary  = "qemu-img"
	defaultStateDir       = "/run/deskvm"
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
	})

	// taskConfigSpec is the task config, from a task's config block.
	taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
		"command":   hclspec.NewAttr("command", "string", false),
		"args":      hclspec.NewAttr("args", "list(string)", false),
		"work_dir":  hclspec.NewAttr("work_dir", "string", false),
		"image":     hclspec.NewAttr("image", "string", false),
		"user_data": hclspec.NewAttr("user_data", "string", false),
		"network":   hclspec.NewDefault(hclspec.NewAttr("network", "string", false), hclspec.NewLiteral(`"none"`)),
		"ports":     hclspec.NewAttr("ports", "list(string)", false),
		"qemu_args": hclspec.NewAttr("qemu_args", "list(string)", false),
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
