package main

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestctl"
)

// Mtimes of the test trees, distinct and with nanoseconds.
var (
	t0 = time.Date(2024, 1, 2, 3, 4, 5, 600, time.UTC)
	t1 = t0.Add(time.Hour + 7)
	t2 = t0.Add(2*time.Hour + 11)
	t3 = t0.Add(3*time.Hour + 13)
)

// entry is one item of a test tree.
type entry struct {
	path   string // slash-separated, relative to the root
	kind   string // "file", "dir", "link" or "fifo"
	mode   fs.FileMode
	data   string // content of a file, target of a link
	mtime  time.Time
	absent bool // expected to be missing (for expectations only)
}

// makeTree creates entries under root in order, then sets the mtimes of
// the directories deepest first so that creating their entries does not
// change them.
func makeTree(t *testing.T, root string, entries []entry) {
	t.Helper()
	for _, e := range entries {
		p := filepath.Join(root, filepath.FromSlash(e.path))
		switch e.kind {
		case "dir":
			must.NoError(t, os.MkdirAll(p, 0o700))
		case "file":
			must.NoError(t, os.WriteFile(p, []byte(e.data), 0o600))
			must.NoError(t, os.Chmod(p, e.mode))
		case "link":
			must.NoError(t, os.Symlink(e.data, p))
		case "fifo":
			must.NoError(t, unix.Mkfifo(p, 0o644))
		}
		if !e.mtime.IsZero() && e.kind != "dir" {
			must.NoError(t, setMtime(p, e.mtime))
		}
	}
	for i := len(entries) - 1; i >= 0; i-- {
		e := entries[i]
		if e.kind == "dir" {
			p := filepath.Join(root, filepath.FromSlash(e.path))
			must.NoError(t, os.Chmod(p, e.mode))
			if !e.mtime.IsZero() {
				must.NoError(t, setMtime(p, e.mtime))
			}
		}
	}
}

// checkEntry asserts that root holds e as described.
func checkEntry(t *testing.T, root string, e entry) {
	t.Helper()
	p := filepath.Join(root, filepath.FromSlash(e.path))
	fi, err := os.Lstat(p)
	if e.absent {
		must.ErrorIs(t, err, fs.ErrNotExist, must.Sprintf("%s should be missing", e.path))
		return
	}
	must.NoError(t, err)
	switch e.kind {
	case "dir":
		must.True(t, fi.IsDir(), must.Sprintf("%s: want a directory, got %v", e.path, fi.Mode()))
	case "file":
		must.True(t, fi.Mode().IsRegular(), must.Sprintf("%s: want a regular file, got %v", e.path, fi.Mode()))
		b, err := os.ReadFile(p)
		must.NoError(t, err)
		must.Eq(t, e.data, string(b), must.Sprintf("content of %s", e.path))
	case "link":
		must.Eq(t, fs.ModeSymlink, fi.Mode().Type(), must.Sprintf("%s: want a symlink, got %v", e.path, fi.Mode()))
		target, err := os.Readlink(p)
		must.NoError(t, err)
		must.Eq(t, e.data, target, must.Sprintf("target of %s", e.path))
	}
	if e.kind != "link" {
		must.Eq(t, e.mode, fi.Mode()&permBits, must.Sprintf("mode of %s", e.path))
	}
	if !e.mtime.IsZero() {
		must.True(t, e.mtime.Equal(fi.ModTime()), must.Sprintf("mtime of %s: want %v, got %v", e.path, e.mtime, fi.ModTime()))
	}
}

func TestCopyIn(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	makeTree(t, src, []entry{
		{path: ".", kind: "dir", mode: 0o777, mtime: t3},
		{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0},
		{path: "bin", kind: "dir", mode: 0o750, mtime: t2},
		{path: "bin/run.sh", kind: "file", mode: 0o755 | fs.ModeSetuid, data: "#!/bin/sh\n", mtime: t1},
		{path: "ro", kind: "dir", mode: 0o555, mtime: t1},
		{path: "ro/f", kind: "file", mode: 0o444, data: "read only", mtime: t2},
		{path: "link", kind: "link", data: "a.txt", mtime: t1},
		{path: "abs", kind: "link", data: "/etc/passwd"},
		{path: "fifo", kind: "fifo"},
		{path: "logs", kind: "dir", mode: 0o755},
		{path: "logs/app.stdout.0", kind: "file", mode: 0o644, data: "log"},
		{path: "logs2", kind: "dir", mode: 0o755},
		{path: "logs2/x", kind: "file", mode: 0o644, data: "x"},
		{path: "a", kind: "dir", mode: 0o755},
		{path: "a/b", kind: "dir", mode: 0o755},
		{path: "a/b/c", kind: "file", mode: 0o644, data: "c"},
		{path: "a/keep", kind: "file", mode: 0o644, data: "keep"},
		{path: ".deskvm", kind: "dir", mode: 0o700},
		{path: ".deskvm/state", kind: "file", mode: 0o600, data: "state"},
	})
	skip, err := newSkipList([]string{"logs", "a/b/", ".deskvm"})
	must.NoError(t, err)
	rec, err := copyIn(t.Context(), src, dst, skip)
	must.NoError(t, err)

	cases := []entry{
		{path: ".", kind: "dir", mode: 0o777, mtime: t3},
		{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0},
		{path: "bin", kind: "dir", mode: 0o750, mtime: t2},
		{path: "bin/run.sh", kind: "file", mode: 0o755 | fs.ModeSetuid, data: "#!/bin/sh\n", mtime: t1},
		{path: "ro", kind: "dir", mode: 0o555, mtime: t1},
		{path: "ro/f", kind: "file", mode: 0o444, data: "read only", mtime: t2},
		{path: "link", kind: "link", data: "a.txt", mtime: t1},
		{path: "abs", kind: "link", data: "/etc/passwd"},
		{path: "fifo", absent: true},
		{path: "logs", absent: true},
		{path: "logs2/x", kind: "file", mode: 0o644, data: "x"},
		{path: "a/b", absent: true},
		{path: "a/keep", kind: "file", mode: 0o644, data: "keep"},
		{path: ".deskvm", absent: true},
	}
	for _, tc := range cases {
		t.Run(tc.path, func(t *testing.T) {
			checkEntry(t, dst, tc)
			st, ok := rec[tc.path]
			must.Eq(t, !tc.absent, ok, must.Sprintf("record of %s", tc.path))
			if tc.kind == "file" {
				must.Eq(t, int64(len(tc.data)), st.size, must.Sprintf("recorded size of %s", tc.path))
			}
			if !tc.mtime.IsZero() && tc.kind != "link" {
				must.True(t, tc.mtime.Equal(st.mtime), must.Sprintf("recorded mtime of %s: want %v, got %v", tc.path, tc.mtime, st.mtime))
			}
		})
	}
}

func TestSkipList(t *testing.T) {
	cases := []struct {
		name    string
		skip    []string
		err     string
		skipped []string
		kept    []string
	}{
		{name: "names and subtrees", skip: []string{"logs", "a/b", "./.deskvm/"},
			skipped: []string{"logs", "logs/x", "a/b", "a/b/c", ".deskvm"}, kept: []string{"logs2", "a", "a/bc", ".", "x/logs"}},
		{name: "none", kept: []string{"logs", "."}},
		{name: "absolute", skip: []string{"/logs"}, err: `got "/logs"`},
		{name: "outside", skip: []string{"a/../../x"}, err: `got "a/../../x"`},
		{name: "the root", skip: []string{"a/.."}, err: `got "a/.."`},
		{name: "empty", skip: []string{""}, err: `got ""`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := newSkipList(tc.skip)
			if tc.err != "" {
				must.ErrorContains(t, err, tc.err)
				return
			}
			must.NoError(t, err)
			for _, p := range tc.skipped {
				must.True(t, s.has(p), must.Sprintf("%q should be skipped by %q", p, tc.skip))
			}
			for _, p := range tc.kept {
				must.False(t, s.has(p), must.Sprintf("%q should not be skipped by %q", p, tc.skip))
			}
		})
	}
}

// fileID identifies a file's inode and mtime, to show it was left alone.
type fileID struct {
	ino   uint64
	mtime time.Time
}

func idOf(t *testing.T, p string) fileID {
	t.Helper()
	fi, err := os.Lstat(p)
	must.NoError(t, err)
	return fileID{ino: fi.Sys().(*syscall.Stat_t).Ino, mtime: fi.ModTime()}
}

func TestWriteBack(t *testing.T) {
	base := []entry{
		{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0},
		{path: "keep.txt", kind: "file", mode: 0o644, data: "keep", mtime: t0},
		{path: "d", kind: "dir", mode: 0o755, mtime: t1},
		{path: "d/f", kind: "file", mode: 0o644, data: "f", mtime: t0},
		{path: "logs", kind: "dir", mode: 0o755, mtime: t1},
		{path: "logs/app.log", kind: "file", mode: 0o644, data: "log", mtime: t0},
		{path: "s", kind: "link", data: "logs"},
	}
	outside := filepath.Join(t.TempDir(), "outside")
	must.NoError(t, os.WriteFile(outside, []byte("orig"), 0o644))

	cases := []struct {
		name  string
		skip  []string
		guest func(t *testing.T, guest string) // what the command does
		host  func(t *testing.T, host string)  // what the host does meanwhile
		errs  []string                         // substrings of the error; none means no error
		want  []entry                          // the host tree afterwards
		same  []string                         // host files whose inode and mtime must not change
	}{
		{
			name: "new file and directory",
			guest: func(t *testing.T, g string) {
				makeTree(t, g, []entry{
					{path: "new", kind: "dir", mode: 0o750, mtime: t3},
					{path: "new/n.txt", kind: "file", mode: 0o640, data: "new", mtime: t2},
					{path: "d/g", kind: "file", mode: 0o600, data: "g", mtime: t2},
				})
				must.NoError(t, setMtime(filepath.Join(g, "d"), t2))
			},
			want: []entry{
				{path: "new", kind: "dir", mode: 0o750, mtime: t3},
				{path: "new/n.txt", kind: "file", mode: 0o640, data: "new", mtime: t2},
				{path: "d", kind: "dir", mode: 0o755, mtime: t2},
				{path: "d/g", kind: "file", mode: 0o600, data: "g", mtime: t2},
			},
			same: []string{"a.txt", "keep.txt", "d/f"},
		},
		{
			name: "changed file replaced with its mode and mtime",
			guest: func(t *testing.T, g string) {
				p := filepath.Join(g, "a.txt")
				must.NoError(t, os.WriteFile(p, []byte("alpha, longer"), 0o644))
				must.NoError(t, os.Chmod(p, 0o600))
				must.NoError(t, setMtime(p, t3))
				must.NoError(t, os.WriteFile(filepath.Join(g, "d/f"), []byte("F"), 0o644))
				must.NoError(t, setMtime(filepath.Join(g, "d/f"), t3))
			},
			want: []entry{
				{path: "a.txt", kind: "file", mode: 0o600, data: "alpha, longer", mtime: t3},
				{path: "d/f", kind: "file", mode: 0o644, data: "F", mtime: t3},
				{path: "d", kind: "dir", mode: 0o755, mtime: t1}, // the rename into it is undone
			},
			same: []string{"keep.txt"},
		},
		{
			name: "mode change alone",
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.Chmod(filepath.Join(g, "a.txt"), 0o600))
			},
			want: []entry{{path: "a.txt", kind: "file", mode: 0o600, data: "alpha", mtime: t0}},
		},
		{
			name: "directory mode change",
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.Chmod(filepath.Join(g, "d"), 0o700))
			},
			want: []entry{{path: "d", kind: "dir", mode: 0o700, mtime: t1}},
			same: []string{"d/f"},
		},
		{
			name: "unchanged files keep the host's version",
			host: func(t *testing.T, h string) {
				must.NoError(t, os.WriteFile(filepath.Join(h, "a.txt"), []byte("host wrote this"), 0o644))
			},
			want: []entry{{path: "a.txt", kind: "file", mode: 0o644, data: "host wrote this"}},
			same: []string{"a.txt", "keep.txt", "d", "d/f", "s"},
		},
		{
			name: "new and changed symlinks",
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.Symlink("a.txt", filepath.Join(g, "link")))
				must.NoError(t, os.Remove(filepath.Join(g, "s")))
				must.NoError(t, os.Symlink("d", filepath.Join(g, "s")))
			},
			want: []entry{
				{path: "link", kind: "link", data: "a.txt"},
				{path: "s", kind: "link", data: "d"},
			},
		},
		{
			name: "deletions not propagated",
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.Remove(filepath.Join(g, "a.txt")))
				must.NoError(t, os.RemoveAll(filepath.Join(g, "d")))
				must.NoError(t, os.Remove(filepath.Join(g, "s")))
			},
			want: []entry{
				{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0},
				{path: "d/f", kind: "file", mode: 0o644, data: "f", mtime: t0},
				{path: "s", kind: "link", data: "logs"},
			},
			same: []string{"a.txt", "d", "d/f", "s"},
		},
		{
			name: "skipped names never written",
			skip: []string{"logs", "d/f"},
			guest: func(t *testing.T, g string) {
				// Skipped, so missing in the guest: the command makes them.
				makeTree(t, g, []entry{
					{path: "logs", kind: "dir", mode: 0o755},
					{path: "logs/app.log", kind: "file", mode: 0o644, data: "forged"},
					{path: "logs/evil", kind: "file", mode: 0o644, data: "evil"},
					{path: "d/f", kind: "file", mode: 0o644, data: "forged"},
				})
				// Through the guest's own symlink s -> logs.
				must.NoError(t, os.WriteFile(filepath.Join(g, "s", "evil2"), []byte("evil"), 0o644))
			},
			want: []entry{
				{path: "logs/app.log", kind: "file", mode: 0o644, data: "log", mtime: t0},
				{path: "logs/evil", absent: true},
				{path: "logs/evil2", absent: true},
				{path: "d/f", kind: "file", mode: 0o644, data: "f", mtime: t0},
				{path: "s", kind: "link", data: "logs"},
			},
			same: []string{"logs", "logs/app.log", "d/f", "s"},
		},
		{
			name: "guest symlink planted where the host has a directory",
			skip: []string{"logs"},
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.RemoveAll(filepath.Join(g, "d")))
				must.NoError(t, os.Symlink("logs", filepath.Join(g, "d")))
				must.NoError(t, os.WriteFile(filepath.Join(g, "z.txt"), []byte("z"), 0o644))
			},
			errs: []string{"/d: the host has a directory there; refusing to replace it with a symlink"},
			want: []entry{
				{path: "d", kind: "dir", mode: 0o755, mtime: t1},
				{path: "d/f", kind: "file", mode: 0o644, data: "f", mtime: t0},
				{path: "z.txt", kind: "file", mode: 0o644, data: "z"}, // write-back goes on
			},
			same: []string{"d", "d/f"},
		},
		{
			name: "no write through a symlink of the share",
			skip: []string{"logs"},
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.Remove(filepath.Join(g, "s")))
				makeTree(t, g, []entry{
					{path: "s", kind: "dir", mode: 0o755},
					{path: "s/evil", kind: "file", mode: 0o644, data: "evil"},
				})
			},
			errs: []string{"/s: the host has a symlink there, not a directory; refusing to write through it"},
			want: []entry{
				{path: "s", kind: "link", data: "logs"},
				{path: "logs/evil", absent: true},
			},
		},
		{
			name: "a host symlink is replaced, not followed",
			host: func(t *testing.T, h string) {
				must.NoError(t, os.Symlink(outside, filepath.Join(h, "out")))
			},
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.WriteFile(filepath.Join(g, "out"), []byte("evil"), 0o644))
			},
			want: []entry{{path: "out", kind: "file", mode: 0o644, data: "evil"}},
		},
		{
			name: "guest file where the host has a directory",
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.RemoveAll(filepath.Join(g, "d")))
				must.NoError(t, os.WriteFile(filepath.Join(g, "d"), []byte("d"), 0o644))
			},
			errs: []string{"/d: the host has a directory there; refusing to replace it with a regular file"},
			want: []entry{{path: "d/f", kind: "file", mode: 0o644, data: "f", mtime: t0}},
		},
		{
			name: "guest directory where the host has a file",
			guest: func(t *testing.T, g string) {
				must.NoError(t, os.Remove(filepath.Join(g, "a.txt")))
				must.NoError(t, os.MkdirAll(filepath.Join(g, "a.txt", "x"), 0o755))
			},
			errs: []string{"/a.txt: the host has a regular file there, not a directory"},
			want: []entry{{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0}},
			same: []string{"a.txt"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			host, guest := t.TempDir(), t.TempDir()
			makeTree(t, host, base)
			skip, err := newSkipList(tc.skip)
			must.NoError(t, err)
			rec, err := copyIn(t.Context(), host, guest, skip)
			must.NoError(t, err)
			if tc.host != nil {
				tc.host(t, host)
			}
			if tc.guest != nil {
				tc.guest(t, guest)
			}
			ids := map[string]fileID{}
			for _, p := range tc.same {
				ids[p] = idOf(t, filepath.Join(host, p))
			}

			err = writeBack(t.Context(), guest, host, rec, skip)
			if len(tc.errs) == 0 {
				must.NoError(t, err)
			} else {
				must.Error(t, err)
				for _, want := range tc.errs {
					must.StrContains(t, err.Error(), guest+want)
				}
			}
			for _, e := range tc.want {
				checkEntry(t, host, e)
			}
			for _, p := range tc.same {
				must.Eq(t, ids[p], idOf(t, filepath.Join(host, p)), must.Sprintf("%s should be left alone", p))
			}
			b, err := os.ReadFile(outside)
			must.NoError(t, err)
			must.Eq(t, "orig", string(b), must.Sprint("a file outside the share was written"))
			entries, err := os.ReadDir(host)
			must.NoError(t, err)
			for _, e := range entries {
				must.False(t, strings.HasPrefix(e.Name(), tempPrefix), must.Sprintf("temporary file %s left behind", e.Name()))
			}
		})
	}
}

// fakeMounter stands in for the mounts on plain directories: the share
// tag's "mount" is the host directory itself.
type fakeMounter struct {
	host  string
	calls []string
	// failUnmount makes unmounting this directory fail.
	failUnmount string
}

func (f *fakeMounter) mounter() mounter {
	return mounter{
		share: func(tag string, readOnly bool) (string, error) {
			mode := "rw"
			if readOnly {
				mode = "ro"
			}
			f.calls = append(f.calls, "share "+tag+" "+mode)
			return f.host, nil
		},
		memory: func(dir string) error {
			f.calls = append(f.calls, "memory "+dir)
			return nil
		},
		seal: func(dir string) error {
			f.calls = append(f.calls, "seal "+dir)
			return nil
		},
		unmount: func(dir string) error {
			f.calls = append(f.calls, "unmount "+dir)
			if dir == f.failUnmount {
				return &fs.PathError{Op: "unmount", Path: dir, Err: unix.EBUSY}
			}
			return nil
		},
	}
}

func TestDetachedShare(t *testing.T) {
	cases := []struct {
		name     string
		mount    guestctl.Mount
		prepare  func(t *testing.T, hostDir, guestDir string, f *fakeMounter)
		err      string // substring of detach's error
		calls    []string
		finish   []string // calls of finish
		finished string   // what finish writes back to the host's a.txt
	}{
		{
			name:     "read-write",
			mount:    guestctl.Mount{Tag: "alloc", Detached: true},
			calls:    []string{"share alloc ro", "memory GUEST", "unmount HOST"},
			finish:   []string{"share alloc rw", "unmount HOST"},
			finished: "changed",
		},
		{
			name:     "read-only is sealed and not written back",
			mount:    guestctl.Mount{Tag: "local", Detached: true, ReadOnly: true},
			calls:    []string{"share local ro", "memory GUEST", "seal GUEST", "unmount HOST"},
			finished: "alpha",
		},
		{
			name:  "share stays mounted",
			mount: guestctl.Mount{Tag: "alloc", Detached: true},
			prepare: func(t *testing.T, hostDir, guestDir string, f *fakeMounter) {
				f.failUnmount = hostDir
			},
			err:   "share alloc stays mounted after the copy: unmount HOST: device or resource busy",
			calls: []string{"share alloc ro", "memory GUEST", "unmount HOST", "unmount GUEST", "unmount HOST"},
		},
		{
			name:  "failed copy undoes the mounts",
			mount: guestctl.Mount{Tag: "alloc", Detached: true},
			prepare: func(t *testing.T, hostDir, guestDir string, f *fakeMounter) {
				must.NoError(t, os.WriteFile(filepath.Join(guestDir, "a.txt"), nil, 0o644))
			},
			err:   "copy share alloc into GUEST: open GUEST/a.txt: file exists",
			calls: []string{"share alloc ro", "memory GUEST", "unmount GUEST", "unmount HOST"},
		},
		{
			name:  "bad skip mounts nothing",
			mount: guestctl.Mount{Tag: "alloc", Detached: true, Skip: []string{"../etc"}},
			err:   `mount alloc: skip must name a path inside the share, got "../etc"`,
		},
		{
			name:  "tag with a slash",
			mount: guestctl.Mount{Tag: "../x", Detached: true},
			err:   `mount "../x" on "GUEST": need a plain tag and an absolute path`,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			hostDir, guestDir := t.TempDir(), t.TempDir()
			makeTree(t, hostDir, []entry{{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0}})
			f := &fakeMounter{host: hostDir}
			if tc.prepare != nil {
				tc.prepare(t, hostDir, guestDir, f)
			}
			expand := func(s string) string {
				return strings.NewReplacer("HOST", hostDir, "GUEST", guestDir).Replace(s)
			}
			var want []string
			for _, c := range tc.calls {
				want = append(want, expand(c))
			}
			m := tc.mount
			m.Path = guestDir

			d, err := detach(t.Context(), m, f.mounter())
			must.Eq(t, want, f.calls, must.Sprint("mount steps of detach"))
			if tc.err != "" {
				must.ErrorContains(t, err, expand(tc.err))
				return
			}
			must.NoError(t, err)
			checkEntry(t, guestDir, entry{path: "a.txt", kind: "file", mode: 0o644, data: "alpha", mtime: t0})

			if !m.ReadOnly {
				must.NoError(t, os.WriteFile(filepath.Join(guestDir, "a.txt"), []byte("changed"), 0o644))
			}
			g := &guest{mnt: f.mounter(), detached: []*detachedShare{d}}
			f.calls = nil
			must.NoError(t, g.finish(t.Context()))
			want = nil
			for _, c := range tc.finish {
				want = append(want, expand(c))
			}
			must.Eq(t, want, f.calls, must.Sprint("mount steps of finish"))
			checkEntry(t, hostDir, entry{path: "a.txt", kind: "file", mode: 0o644, data: tc.finished})
		})
	}
}

// TestFinishError shows how a failed write-back reaches the exit status.
func TestFinishError(t *testing.T) {
	host, guestDir := t.TempDir(), t.TempDir()
	makeTree(t, host, []entry{
		{path: "d", kind: "dir", mode: 0o755},
		{path: "ok", kind: "file", mode: 0o644, data: "ok"},
	})
	f := &fakeMounter{host: host}
	f.failUnmount = host
	d := &detachedShare{mount: guestctl.Mount{Tag: "alloc", Path: guestDir, Detached: true}, rec: record{}}
	must.NoError(t, os.Symlink("/etc", filepath.Join(guestDir, "d")))
	g := &guest{mnt: f.mounter(), detached: []*detachedShare{d}}

	err := g.finish(t.Context())
	must.EqError(t, err, "copy "+guestDir+" back to the host: write "+guestDir+
		"/d: the host has a directory there; refusing to replace it with a symlink; unmount "+host+": device or resource busy")
	must.Eq(t, []string{"share alloc rw", "unmount " + host}, f.calls)
	must.NoError(t, g.finish(t.Context()), must.Sprint("finish runs once"))
}

func TestFinishHook(t *testing.T) {
	const copyErr = "copy /alloc back to the host: write /alloc/d: refused"
	cases := []struct {
		name   string
		spec   guestctl.Spec
		finish error
		code   int
		signal int
		errMsg string
	}{
		{
			name: "success stays success",
			spec: guestctl.Spec{Command: "true"},
		},
		{
			name:   "zero exit becomes one",
			spec:   guestctl.Spec{Command: "true"},
			finish: errors.New(copyErr),
			code:   1,
			errMsg: copyErr,
		},
		{
			name:   "non-zero exit kept",
			spec:   guestctl.Spec{Command: "/bin/sh", Args: []string{"-c", "exit 3"}},
			finish: errors.New(copyErr),
			code:   3,
			errMsg: copyErr,
		},
		{
			name:   "signal kept",
			spec:   guestctl.Spec{Command: "/bin/sh", Args: []string{"-c", "kill -KILL $$"}},
			finish: errors.New(copyErr),
			code:   128 + 9,
			signal: 9,
			errMsg: copyErr,
		},
		{
			name:   "could not start",
			spec:   guestctl.Spec{Command: "no-such-command-xyz"},
			finish: errors.New(copyErr),
			code:   127,
			errMsg: "no-such-command-xyz: command not found; " + copyErr,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := newTestAgent(t)
			seen := make(chan guestctl.State, 1)
			a.sup.finish = func(ctx context.Context) error {
				st, _ := a.sup.Status(ctx)
				seen <- st.State
				return tc.finish
			}
			c := a.dial(t)
			tc.spec.TaskID = "task"
			must.NoError(t, c.Start(t.Context(), tc.spec))
			st := waitExited(t, c)
			must.NotEq(t, guestctl.StateExited, <-seen, must.Sprint("finish ran after the exit was visible"))
			must.Eq(t, tc.code, st.ExitCode, must.Sprintf("status %+v", st))
			must.Eq(t, tc.signal, st.Signal)
			must.Eq(t, tc.errMsg, st.Error)
		})
	}
}

// TestSignalWhileFinishing shows that the command counts as not running
// while its shares are written back, and Wait waits for the write-back.
func TestSignalWhileFinishing(t *testing.T) {
	a := newTestAgent(t)
	entered, release := make(chan struct{}), make(chan struct{})
	a.sup.finish = func(context.Context) error {
		close(entered)
		<-release
		return nil
	}
	c := a.dial(t)
	ctx := t.Context()
	must.NoError(t, c.Start(ctx, guestctl.Spec{TaskID: "task", Command: "true"}))
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("finish did not run after the command exited")
	}
	st, err := c.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateRunning, st.State, must.Sprint("the exit shows only after finish"))
	must.ErrorIs(t, c.Signal(ctx, syscall.SIGTERM), guestctl.ErrNotRunning)
	must.ErrorIs(t, c.Ack(ctx), guestctl.ErrNotExited)

	close(release)
	st = waitExited(t, c)
	must.Eq(t, 0, st.ExitCode)
	must.Eq(t, "", st.Error)
}
