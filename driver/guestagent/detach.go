package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/driver/guestctl"
)

// A detached share (guestctl.Mount.Detached) lives in a tmpfs while the
// command runs, because QEMU cannot save a VM whose guest has a 9p share
// mounted. The share itself is mounted only for two short spells: at a
// staging directory to copy it in before the command starts, and again to
// write back what the command changed after it has ended.

// shareStaging is where the agent mounts a detached share's 9p export, one
// directory per tag, while it copies the share in or back.
const shareStaging = "/run/deskvm/share"

// mounter performs the mount steps of detached shares. They are functions
// so that tests can run the copy steps on plain directories.
type mounter struct {
	// share mounts the 9p share tag and returns the directory it is on.
	share func(tag string, readOnly bool) (string, error)
	// memory mounts an empty tmpfs on dir, creating dir if need be.
	memory func(dir string) error
	// seal makes the tmpfs on dir read-only.
	seal func(dir string) error
	// unmount unmounts dir.
	unmount func(dir string) error
}

// systemMounter mounts for real, as the agent in the VM does.
func systemMounter() mounter {
	return mounter{
		share: func(tag string, readOnly bool) (string, error) {
			dir := filepath.Join(shareStaging, tag)
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return "", fmt.Errorf("create staging directory %s: %w", dir, err)
			}
			flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
			if readOnly {
				flags |= unix.MS_RDONLY
			}
			if err := unix.Mount(tag, dir, "9p", flags, ninePOptions); err != nil {
				return "", fmt.Errorf("mount 9p share %s on %s: %w", tag, dir, err)
			}
			return dir, nil
		},
		memory: func(dir string) error {
			// No nosuid or noexec: the share was mounted without them, and
			// tasks run programs from it.
			return mountFS("tmpfs", dir, "tmpfs", 0, "mode=0755")
		},
		seal: func(dir string) error {
			if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				return fmt.Errorf("remount %s read-only: %w", dir, err)
			}
			return nil
		},
		unmount: func(dir string) error {
			if err := unix.Unmount(dir, 0); err != nil {
				return fmt.Errorf("unmount %s: %w", dir, err)
			}
			return nil
		},
	}
}

// detachedShare is a detached share between copy-in and write-back.
type detachedShare struct {
	mount guestctl.Mount
	skip  skipList
	rec   record
}

// detach copies the share m into a tmpfs at m.Path and unmounts the share.
// On failure it undoes its mounts, so that it can run again.
func detach(ctx context.Context, m guestctl.Mount, mnt mounter) (_ *detachedShare, err error) {
	if m.Tag == "" || strings.ContainsRune(m.Tag, '/') || m.Tag == "." || m.Tag == ".." || !filepath.IsAbs(m.Path) {
		return nil, fmt.Errorf("mount %q on %q: need a plain tag and an absolute path", m.Tag, m.Path)
	}
	skip, err := newSkipList(m.Skip)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", m.Tag, err)
	}
	stage, err := mnt.share(m.Tag, true)
	if err != nil {
		return nil, err
	}
	staged := true
	defer func() {
		if err != nil && staged {
			mnt.unmount(stage)
		}
	}()
	if err := mnt.memory(m.Path); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			mnt.unmount(m.Path)
		}
	}()
	rec, err := copyIn(ctx, stage, m.Path, skip)
	if err != nil {
		return nil, fmt.Errorf("copy share %s into %s: %w", m.Tag, m.Path, err)
	}
	if m.ReadOnly {
		if err := mnt.seal(m.Path); err != nil {
			return nil, err
		}
	}
	// A plain unmount, not a lazy one: a share that stays mounted would
	// keep the VM from being saved, so that must fail here, with its
	// reason, rather than at the first checkpoint.
	if err := mnt.unmount(stage); err != nil {
		return nil, fmt.Errorf("share %s stays mounted after the copy: %w", m.Tag, err)
	}
	staged = false
	return &detachedShare{mount: m, skip: skip, rec: rec}, nil
}

// writeBack mounts the share again, writes back what changed under
// d.mount.Path since detach, and unmounts the share.
func (d *detachedShare) writeBack(ctx context.Context, mnt mounter) error {
	stage, err := mnt.share(d.mount.Tag, false)
	if err != nil {
		return err
	}
	var errs errorList
	if err := writeBack(ctx, d.mount.Path, stage, d.rec, d.skip); err != nil {
		errs.add(err)
	}
	if err := mnt.unmount(stage); err != nil {
		errs.add(err)
	}
	return errs.err()
}

// skipList holds the cleaned Skip names of a share.
type skipList []string

func newSkipList(names []string) (skipList, error) {
	var s skipList
	var errs []error
	for _, n := range names {
		c := path.Clean(n)
		if n == "" || path.IsAbs(c) || c == "." || c == ".." || strings.HasPrefix(c, "../") {
			errs = append(errs, fmt.Errorf("skip must name a path inside the share, got %q", n))
			continue
		}
		s = append(s, c)
	}
	return s, errors.Join(errs...)
}

// has reports whether rel (slash-separated, relative to the share root) is
// a skipped name or lies beneath one.
func (s skipList) has(rel string) bool {
	for _, n := range s {
		if rel == n || strings.HasPrefix(rel, n+"/") {
			return true
		}
	}
	return false
}

// stamp is what write-back compares to tell whether the command changed an
// entry: its type and permission bits, and for a regular file its size and
// mtime, for a directory its mtime, for a symlink its target.
type stamp struct {
	mode   fs.FileMode
	size   int64
	mtime  time.Time
	target string
}

func (a stamp) equal(b stamp) bool {
	return a.mode == b.mode && a.size == b.size && a.mtime.Equal(b.mtime) && a.target == b.target
}

// record maps the slash-separated paths copied in, relative to the share
// root, to their stamps.
type record map[string]stamp

// stampOf returns the stamp of the entry at p whose Lstat info is fi.
func stampOf(p string, fi fs.FileInfo) (stamp, error) {
	st := stamp{mode: fi.Mode() & (fs.ModeType | permBits)}
	switch {
	case fi.Mode().IsRegular():
		st.size, st.mtime = fi.Size(), fi.ModTime()
	case fi.IsDir():
		st.mtime = fi.ModTime()
	case fi.Mode()&fs.ModeSymlink != 0:
		t, err := os.Readlink(p)
		if err != nil {
			return stamp{}, err
		}
		st.target = t
	}
	return st, nil
}

// copyable reports whether a tree copy takes an entry of mode m: regular
// files, directories and symlinks, never devices, pipes or sockets.
func copyable(m fs.FileMode) bool {
	return m.IsRegular() || m.IsDir() || m&fs.ModeSymlink != 0
}

// dirTimes is a directory whose mode and mtime are set once its entries are
// written, since writing them changes its mtime and a read-only mode would
// forbid them.
type dirTimes struct {
	path    string
	rel     string
	mode    fs.FileMode
	setMode bool
	mtime   time.Time
	// always is false for a directory the command left unchanged: its
	// mtime needs restoring only if write-back put an entry into it.
	always bool
}

// apply sets the directory's mode (when setMode) and mtime without
// following a symlink.
func (d dirTimes) apply() error {
	if d.setMode {
		f, err := os.OpenFile(d.path, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err != nil {
			return err
		}
		err = f.Chmod(d.mode & permBits)
		f.Close()
		if err != nil {
			return err
		}
	}
	return setMtime(d.path, d.mtime)
}

// permBits are the mode bits that a copy preserves.
const permBits = fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky

// copyIn copies the tree at src into the existing directory dst: regular
// files, directories and symlinks with their modes and mtimes, leaving out
// special files and the names in skip. It returns the stamps of what it
// copied, taken from src. The first error ends the copy.
func copyIn(ctx context.Context, src, dst string, skip skipList) (record, error) {
	rec := record{}
	var dirs []dirTimes
	err := filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := relSlash(src, p)
		if err != nil {
			return err
		}
		if !copyable(e.Type()) || skip.has(rel) {
			if e.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := e.Info()
		if err != nil {
			return err
		}
		target := filepath.Join(dst, filepath.FromSlash(rel))
		switch {
		case fi.IsDir():
			if rel != "." {
				if err := os.Mkdir(target, 0o700); err != nil {
					return err
				}
			}
			st, _ := stampOf(p, fi)
			rec[rel] = st
			dirs = append(dirs, dirTimes{path: target, mode: fi.Mode(), setMode: true, mtime: fi.ModTime()})
		case fi.Mode().IsRegular():
			st, err := copyFile(p, target)
			if err != nil {
				return err
			}
			rec[rel] = st
		default:
			st, err := stampOf(p, fi)
			if err != nil {
				return err
			}
			if err := os.Symlink(st.target, target); err != nil {
				return err
			}
			setMtime(target, fi.ModTime()) // best effort: some filesystems refuse it on symlinks
			rec[rel] = st
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, d := range slices.Backward(dirs) {
		if err := d.apply(); err != nil {
			return nil, err
		}
	}
	return rec, nil
}

// copyFile copies the regular file src to the new file dst, with src's mode
// and mtime, and returns the stamp of what it copied.
func copyFile(src, dst string) (stamp, error) {
	in, err := os.OpenFile(src, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return stamp{}, err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return stamp{}, err
	}
	if !fi.Mode().IsRegular() {
		return stamp{}, fmt.Errorf("%s: no longer a regular file", src)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return stamp{}, err
	}
	n, err := io.Copy(out, in)
	if err == nil {
		err = out.Chmod(fi.Mode() & permBits)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = setMtime(dst, fi.ModTime())
	}
	if err != nil {
		return stamp{}, err
	}
	st, _ := stampOf(src, fi)
	st.size = n // what the guest holds, should src have changed meanwhile
	return st, nil
}

// maxWriteBackErrors bounds how many errors a write-back reports one by one,
// so that a guest cannot flood the exit status.
const maxWriteBackErrors = 8

// errorList collects the errors of a write-back, which goes on after them,
// as one line for the exit status.
type errorList struct {
	errs []error
	more int
}

func (l *errorList) add(err error) {
	if len(l.errs) < maxWriteBackErrors {
		l.errs = append(l.errs, err)
	} else {
		l.more++
	}
}

func (l *errorList) err() error {
	if len(l.errs) == 0 {
		return nil
	}
	msgs := make([]string, 0, len(l.errs)+1)
	for _, e := range l.errs {
		msgs = append(msgs, e.Error())
	}
	if l.more > 0 {
		msgs = append(msgs, fmt.Sprintf("and %d more errors", l.more))
	}
	return errors.New(strings.Join(msgs, "; "))
}

// writeBack writes what changed in the tree at src, the guest's copy, since
// copyIn recorded rec, into dst, the share. It writes the regular files,
// directories and symlinks that are new or whose stamp differs, each file
// by a rename from a temporary file beside it (so a host hard link to it is
// not written through either); it leaves unchanged entries
// alone (even where the host changed them since) and does not propagate
// deletions. It never touches a skipped name, never writes through a
// symlink on the host side and never replaces a directory of the host, nor
// changes the share root itself. It carries on past an error, skipping
// what lies beneath the failed entry, and returns the errors, each naming
// its path under src.
func writeBack(ctx context.Context, src, dst string, rec record, skip skipList) error {
	var errs errorList
	var dirs []dirTimes
	touched := map[string]bool{} // directories (rel) an entry was written into
	err := filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p != src {
				return nil // removed by a process the command left behind
			}
			errs.add(err)
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := relSlash(src, p)
		if err != nil {
			return err
		}
		if rel == "." {
			if fi, err := os.Lstat(dst); err != nil || !fi.IsDir() {
				return fmt.Errorf("share root %s is not a directory", dst)
			}
			return nil
		}
		if !copyable(e.Type()) || skip.has(rel) {
			if e.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		var cur stamp
		if err == nil {
			cur, err = stampOf(p, fi)
		}
		if err != nil {
			errs.add(err)
			return nil
		}
		old, had := rec[rel]
		changed := !had || !old.equal(cur)
		target := filepath.Join(dst, filepath.FromSlash(rel))
		hfi, err := os.Lstat(target)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs.add(fmt.Errorf("write %s: %w", p, err))
			return skipEntry(e)
		}
		exists := err == nil
		switch {
		case fi.IsDir():
			if exists && !hfi.IsDir() {
				errs.add(fmt.Errorf("write %s: the host has a %s there, not a directory; refusing to write through it", p, kind(hfi.Mode())))
				return filepath.SkipDir
			}
			if !exists {
				if err := os.Mkdir(target, 0o700); err != nil {
					errs.add(fmt.Errorf("write %s: %w", p, err))
					return filepath.SkipDir
				}
				touched[path.Dir(rel)] = true
			}
			dirs = append(dirs, dirTimes{
				path: target, rel: rel, mode: fi.Mode(), mtime: fi.ModTime(),
				setMode: !exists || !had || old.mode != cur.mode,
				always:  !exists || changed,
			})
			return nil
		case !changed:
			return nil
		case exists && hfi.IsDir():
			errs.add(fmt.Errorf("write %s: the host has a directory there; refusing to replace it with a %s", p, kind(fi.Mode())))
			return nil
		case fi.Mode().IsRegular():
			err = replaceFile(p, target)
		default:
			err = replaceSymlink(cur.target, target, fi.ModTime())
		}
		if err != nil {
			errs.add(fmt.Errorf("write %s: %w", p, err))
			return nil
		}
		touched[path.Dir(rel)] = true
		return nil
	})
	if err != nil {
		errs.add(err)
	}
	// Deepest first, so that setting a directory's mtime comes after
	// everything written into it.
	for _, d := range slices.Backward(dirs) {
		if !d.always && !touched[d.rel] {
			continue
		}
		if err := d.apply(); err != nil {
			errs.add(fmt.Errorf("write %s: %w", filepath.Join(src, filepath.FromSlash(d.rel)), err))
		}
	}
	return errs.err()
}

// skipEntry skips e and, for a directory, what lies beneath it.
func skipEntry(e fs.DirEntry) error {
	if e.IsDir() {
		return filepath.SkipDir
	}
	return nil
}

// kind names the type of a file mode for an error message.
func kind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	default:
		return "special file"
	}
}

// tempPrefix begins the names of write-back's temporary files.
const tempPrefix = ".deskvm-tmp-"

// replaceFile copies the regular file src over dst (whose directory is
// known to be no symlink) through a temporary file beside dst, with src's
// mode and mtime. A symlink at dst is replaced, not followed.
func replaceFile(src, dst string) error {
	in, err := os.OpenFile(src, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return errors.New("no longer a regular file")
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), tempPrefix+"*")
	if err != nil {
		return err
	}
	_, err = io.Copy(tmp, in)
	if err == nil {
		err = tmp.Chmod(fi.Mode() & permBits)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = setMtime(tmp.Name(), fi.ModTime())
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// replaceSymlink makes dst a symlink to target, replacing (not following)
// whatever non-directory is there.
func replaceSymlink(target, dst string, mtime time.Time) error {
	var tmp string
	for i := 0; ; i++ {
		tmp = filepath.Join(filepath.Dir(dst), fmt.Sprintf("%s%d", tempPrefix, rand.Uint64()))
		err := os.Symlink(target, tmp)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrExist) || i >= 100 {
			return err
		}
	}
	setMtime(tmp, mtime) // best effort: some filesystems refuse it on symlinks
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// setMtime sets the mtime of p, not following a symlink, and leaves its
// atime alone.
func setMtime(p string, t time.Time) error {
	ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, unix.NsecToTimespec(t.UnixNano())}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return &fs.PathError{Op: "set mtime", Path: p, Err: err}
	}
	return nil
}

// relSlash returns p relative to root, slash-separated.
func relSlash(root, p string) (string, error) {
	rel, err := filepath.Rel(root, p)
	if err != nil {
		return "", err
	}
	return filepath.ToSlash(rel), nil
}
