// Package guestkit locates the guest kit that scripts/guestkit.sh builds:
// the kernel, the initramfs whose /init is the guest agent, and a small
// bootable disk image for image mode. Its tests boot the kit in QEMU.
package guestkit

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// EnvDir names the environment variable that overrides the kit directory.
const EnvDir = "DESKVM_GUEST_DIR"

// File names inside the kit directory.
const (
	KernelFile    = "vmlinuz"
	KernelELFFile = "vmlinux"
	InitrdFile    = "initramfs.cpio.gz"
	TestImageFile = "test-image.qcow2"
	ManifestFile  = "MANIFEST"
)

// Dir is the kit directory: $DESKVM_GUEST_DIR when set, else .deps/guest in
// the source tree that holds the working directory (found by walking up to
// go.mod). It is "" when neither applies.
func Dir() string {
	if d := os.Getenv(EnvDir); d != "" {
		return d
	}
	wd, err := os.Getwd()
	if err != nil {
		return ""
	}
	for d := wd; ; {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Join(d, ".deps", "guest")
		}
		parent := filepath.Dir(d)
		if parent == d {
			return ""
		}
		d = parent
	}
}

// Kernel is the path of the kit's kernel, or "" when Dir is unknown.
func Kernel() string { return inDir(KernelFile) }

// KernelELF is the path of the same kernel uncompressed, an ELF with a PVH
// entry point, or "" when Dir is unknown. QEMU's -kernel boots it directly:
// under TCG that skips seconds of in-guest decompression per boot, for about
// 60 MiB more on disk. Use it with the same -initrd and -append.
func KernelELF() string { return inDir(KernelELFFile) }

// Initrd is the path of the kit's initramfs, or "" when Dir is unknown.
func Initrd() string { return inDir(InitrdFile) }

// TestImage is the path of the kit's bootable test disk image (qcow2), or ""
// when Dir is unknown.
func TestImage() string { return inDir(TestImageFile) }

// BootFiles returns the kernel and initramfs that deskvm boots from the kit in dir: the
// uncompressed kernel (KernelELFFile) when the kit has it, since under TCG it boots seconds
// sooner, else the compressed one. It fails when dir holds no initramfs or neither kernel.
func BootFiles(dir string) (kernel, initrd string, err error) {
	initrd = filepath.Join(dir, InitrdFile)
	if !isFile(initrd) {
		return "", "", fmt.Errorf("guest kit in %s has no %s", dir, InitrdFile)
	}
	for _, name := range []string{KernelELFFile, KernelFile} {
		if k := filepath.Join(dir, name); isFile(k) {
			return k, initrd, nil
		}
	}
	return "", "", fmt.Errorf("guest kit in %s has neither %s nor %s", dir, KernelELFFile, KernelFile)
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir()
}

func inDir(name string) string {
	d := Dir()
	if d == "" {
		return ""
	}
	return filepath.Join(d, name)
}

// Check reports which kit files are missing, naming the command that builds
// them; nil means the kit is complete.
func Check() error {
	d := Dir()
	if d == "" {
		return fmt.Errorf("guest kit not found: set %s or work inside the source tree", EnvDir)
	}
	var errs []error
	for _, f := range []string{KernelFile, KernelELFFile, InitrdFile, TestImageFile} {
		if _, err := os.Stat(filepath.Join(d, f)); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("guest kit in %s is incomplete (build it with scripts/deps.sh guest): %w", d, errors.Join(errs...))
	}
	return nil
}
