package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Image mode is a NoCloud client just big enough for the kit's test disk
// image: it proves that the driver booted the user's image and attached a
// seed the guest could read.
const (
	seedLabel = "cidata"
	seedDir   = "/run/cidata"
	// seedWait bounds the search for the seed disk; AHCI probing under TCG
	// takes seconds.
	seedWait = 30 * time.Second
	seedPoll = 100 * time.Millisecond
)

// runImage runs the seed's user-data script with its output on the console
// and prints a line the host can look for.
func runImage(ctx context.Context, log *slog.Logger) {
	code, err := runUserData(ctx, log)
	if err != nil {
		fmt.Fprintf(os.Stdout, "deskvm-image: %v\n", err)
		return
	}
	fmt.Fprintf(os.Stdout, "deskvm-image: user-data exited %d\n", code)
}

func runUserData(ctx context.Context, log *slog.Logger) (int, error) {
	sctx, cancel := context.WithTimeout(ctx, seedWait)
	dev, fstype, err := findSeed(sctx, "/sys/class/block")
	cancel()
	if err != nil {
		return 0, err
	}
	log.Info("found seed", "device", dev, "fstype", fstype)
	if err := os.MkdirAll(seedDir, 0o755); err != nil {
		return 0, err
	}
	if err := unix.Mount(dev, seedDir, fstype, unix.MS_RDONLY, ""); err != nil {
		return 0, fmt.Errorf("mount seed %s (%s): %w", dev, fstype, err)
	}
	data, err := os.ReadFile(filepath.Join(seedDir, "user-data"))
	if err != nil {
		return 0, fmt.Errorf("read user-data: %w", err)
	}
	if !bytes.HasPrefix(data, []byte("#!")) {
		return 0, errors.New("user-data is not a script, nothing to run")
	}
	script := "/run/user-data"
	if err := os.WriteFile(script, data, 0o700); err != nil {
		return 0, fmt.Errorf("write user-data script: %w", err)
	}

	r := newReaper()
	rctx, stop := context.WithCancel(ctx)
	defer stop()
	go r.run(rctx)
	devnull, err := os.Open("/dev/null")
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	pid, ch, err := r.start([]string{script}, withDefaultPath(nil), "/",
		[]uintptr{devnull.Fd(), os.Stdout.Fd(), os.Stderr.Fd()}, &syscall.SysProcAttr{Setsid: true})
	if err != nil {
		return 0, fmt.Errorf("run user-data: %w", err)
	}
	log.Info("user-data started", "pid", pid)
	code, _ := exitStatus(<-ch)
	return code, nil
}

// findSeed scans the block devices under sysDir until one carries an
// ISO9660 or FAT filesystem labelled cidata, and returns its device path
// and filesystem type.
func findSeed(ctx context.Context, sysDir string) (string, string, error) {
	for {
		entries, _ := os.ReadDir(sysDir)
		for _, e := range entries {
			dev := "/dev/" + e.Name()
			f, err := os.Open(dev)
			if err != nil {
				continue
			}
			fstype, label := volumeLabel(f)
			f.Close()
			if fstype != "" && strings.EqualFold(label, seedLabel) {
				return dev, fstype, nil
			}
		}
		if err := sleep(ctx, seedPoll); err != nil {
			return "", "", fmt.Errorf("no block device with a filesystem labelled %s", seedLabel)
		}
	}
}

// volumeLabel identifies an ISO9660 or FAT filesystem and returns its mount
// type and label, or "" when it is neither.
func volumeLabel(r io.ReaderAt) (fstype, label string) {
	// ISO9660: the primary volume descriptor is sector 16 of 2048 bytes.
	pvd := make([]byte, 2048)
	if _, err := r.ReadAt(pvd, 16*2048); err == nil && pvd[0] == 1 && string(pvd[1:6]) == "CD001" {
		return "iso9660", strings.TrimRight(string(pvd[40:72]), " \x00")
	}
	bs := make([]byte, 512)
	if _, err := r.ReadAt(bs, 0); err != nil || bs[510] != 0x55 || bs[511] != 0xaa {
		return "", ""
	}
	switch {
	case bs[66] == 0x29 && string(bs[82:87]) == "FAT32":
		return "vfat", strings.TrimRight(string(bs[71:82]), " \x00")
	case bs[38] == 0x29 && (string(bs[54:59]) == "FAT12" || string(bs[54:59]) == "FAT16"):
		return "vfat", strings.TrimRight(string(bs[43:54]), " \x00")
	}
	return "", ""
}
