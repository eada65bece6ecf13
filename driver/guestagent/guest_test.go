package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/driver/cloudinit"
)

func TestBootParam(t *testing.T) {
	cases := []struct {
		cmdline, want string
	}{
		{"console=ttyS0 panic=-1 quiet deskvm.mode=probe\n", "probe"},
		{"deskvm.mode=image console=ttyS0", "image"},
		{"console=ttyS0 quiet", "command"},
		{"xdeskvm.mode=probe deskvm.mode", "command"},
	}
	for _, tc := range cases {
		must.Eq(t, tc.want, bootParam(tc.cmdline, "deskvm.mode", "command"), must.Sprintf("cmdline %q", tc.cmdline))
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	must.NoError(t, os.Mkdir(bin, 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(bin, "tool"), []byte("#!/bin/sh\n"), 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(bin, "data"), []byte("x"), 0o644))
	must.NoError(t, os.Mkdir(filepath.Join(bin, "sub"), 0o755))

	cases := []struct {
		name, cmd, path string
		want            string // path found
		code            int    // start error code when not found
	}{
		{name: "on PATH", cmd: "tool", path: bin, want: filepath.Join(bin, "tool")},
		{name: "relative PATH entry", cmd: "tool", path: "bin", want: filepath.Join(dir, "bin", "tool")},
		{name: "relative to dir", cmd: "./bin/tool", want: filepath.Join(dir, "bin", "tool")},
		{name: "absolute", cmd: filepath.Join(bin, "tool"), want: filepath.Join(bin, "tool")},
		{name: "not on PATH", cmd: "nope", path: bin, code: 127},
		{name: "no such file", cmd: "./nope", code: 127},
		{name: "not executable on PATH", cmd: "data", path: bin, code: 126},
		{name: "not executable path", cmd: "bin/data", code: 126},
		{name: "directory", cmd: "./bin/sub", code: 126},
		{name: "directory on PATH is skipped", cmd: "sub", path: bin, code: 127},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := lookPath(tc.cmd, tc.path, dir)
			if tc.code != 0 {
				var se *startError
				must.True(t, errors.As(err, &se), must.Sprintf("want a start error, got %v", err))
				must.Eq(t, tc.code, se.code, must.Sprint(se.Error()))
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

func TestEnv(t *testing.T) {
	must.Eq(t, []string{"A=1", "PATH=" + defaultPath}, withDefaultPath([]string{"A=1"}))
	must.Eq(t, []string{"PATH=/x"}, withDefaultPath([]string{"PATH=/x"}))
	must.Eq(t, []string{"PATH=" + defaultPath}, withDefaultPath(nil))
	must.Eq(t, "2", envValue([]string{"K=1", "K=2", "KK=3"}, "K"))
	must.Eq(t, "", envValue([]string{"KK=3"}, "K"))
}

func TestParseMeminfo(t *testing.T) {
	total, avail := parseMeminfo(strings.NewReader("MemTotal:         250000 kB\nMemFree:  1000 kB\nMemAvailable:     204800 kB\n"))
	must.Eq(t, 244, total)
	must.Eq(t, 200, avail)
}

func TestFindPort(t *testing.T) {
	sys := t.TempDir()
	for port, name := range map[string]string{"vport1p1": "deskvm.ctl\n", "vport1p2": "deskvm.stdout\n", "vport2p1": ""} {
		must.NoError(t, os.Mkdir(filepath.Join(sys, port), 0o755))
		must.NoError(t, os.WriteFile(filepath.Join(sys, port, "name"), []byte(name), 0o444))
	}
	p, ok := findPort(sys, "deskvm.stdout")
	must.True(t, ok)
	must.Eq(t, "/dev/vport1p2", p)
	_, ok = findPort(sys, "deskvm.stderr")
	must.False(t, ok)
}

func TestVolumeLabel(t *testing.T) {
	dir := t.TempDir()
	iso := filepath.Join(dir, "seed.iso")
	must.NoError(t, cloudinit.WriteSeed(iso, []byte("#!/bin/sh\n"), nil))

	cases := []struct {
		name   string
		image  func(t *testing.T) string
		fstype string
		label  string
	}{
		{name: "iso9660 seed", image: func(*testing.T) string { return iso }, fstype: "iso9660", label: "cidata"},
		{name: "fat16", image: func(t *testing.T) string { return mkfsVfat(t, dir, "16", "CIDATA") }, fstype: "vfat", label: "CIDATA"},
		{name: "fat32", image: func(t *testing.T) string { return mkfsVfat(t, dir, "32", "cidata") }, fstype: "vfat", label: "cidata"},
		{name: "zeros", image: func(t *testing.T) string {
			p := filepath.Join(dir, "zeros")
			must.NoError(t, os.WriteFile(p, make([]byte, 64<<10), 0o644))
			return p
		}},
		{name: "short", image: func(t *testing.T) string {
			p := filepath.Join(dir, "short")
			must.NoError(t, os.WriteFile(p, []byte("tiny"), 0o644))
			return p
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.Open(tc.image(t))
			must.NoError(t, err)
			defer f.Close()
			fstype, label := volumeLabel(f)
			must.Eq(t, tc.fstype, fstype)
			must.Eq(t, tc.label, label)
		})
	}
}

// mkfsVfat makes a FAT image with dosfstools, or skips.
func mkfsVfat(t *testing.T, dir, bits, label string) string {
	t.Helper()
	mkfs, err := exec.LookPath("mkfs.vfat")
	if err != nil {
		t.Skip("mkfs.vfat not installed (dosfstools, scripts/deps.sh apt)")
	}
	p := filepath.Join(dir, "fat"+bits)
	out, err := exec.Command(mkfs, "-C", "-F", bits, "-n", label, p, "40000").CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	return p
}

func TestFindSeed(t *testing.T) {
	// No device carries the label: findSeed gives up when its context ends.
	sys := t.TempDir()
	must.NoError(t, os.Mkdir(filepath.Join(sys, "no-such-device-xyz"), 0o755))
	ctx, cancel := context.WithTimeout(t.Context(), 150*time.Millisecond)
	defer cancel()
	_, _, err := findSeed(ctx, sys)
	must.ErrorContains(t, err, "no block device with a filesystem labelled cidata")
}

func TestWithDefaultPathCopies(t *testing.T) {
	in := make([]string, 1, 4)
	in[0] = "A=1"
	out := withDefaultPath(in)
	out[0] = "B=2"
	must.Eq(t, "A=1", in[0], must.Sprint("withDefaultPath must not write into its input"))
}
