package vm

// A checkpoint saves a running VM to files in one directory and stops QEMU; Restore starts a
// fresh QEMU from them, on this node or another, and the guest carries on where it stopped.
//
// How the state is saved. QEMU 7.2 offers two ways. Measured on a 512 MiB guest holding
// 200 MiB of data, under TCG on a shared 2-core machine (BenchmarkCheckpoint):
//
//   - migrate to a file: 269 MiB of state; the guest paused 0.8-1.1 s in all (QEMU
//     writing 0.67-0.88 s, then fsync and quit); restore and cont 0.8-1.1 s. QEMU's
//     migration stream goes to a pipe whose write end is passed over the QMP socket
//     (getfd, SCM_RIGHTS) and is copied here to the state file while it is hashed. QEMU 7.2
//     has no "file:" URI, and "exec:" needs a child process, which the VM's sandbox
//     (spawn=deny) forbids. Zero pages cost a few bytes each: the file is the size of the
//     RAM the guest has used, not of its RAM (76 MiB for a guest that only booted).
//   - savevm into a qcow2 image: the same 269 MiB, written in 0.31-0.54 s. But it needs a
//     qcow2 image attached to the VM to hold the state, which command-mode VMs do not have;
//     in image mode it writes an internal snapshot into the task's overlay; restoring needs
//     the image attached from the start (-loadvm); and it runs synchronously in QEMU's main
//     loop, blocking the monitor. It fails on the same migration blockers (9p).
//
// Migration is the one used: the saving is 0.3 s slower, which does not matter for a
// layer taken after minutes of pause, and in return a checkpoint is one plain file,
// checksummed in flight, with no device added to the VM, loaded through the same path as
// live migration between nodes. Writing the file directly (getfd on the file) measured the
// same as the pipe; the pipe saves reading the state back to hash it.
//
// Restore starts QEMU with "-incoming defer" and feeds the state file over QMP
// (migrate-incoming "fd:"), because Start owns QEMU's command line and the child's file
// descriptors; "-incoming fd:N" with an inherited descriptor would save two QMP round trips,
// a few milliseconds of a restore that takes most of a second.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/deskcloud/deskcloud/internal/atomicfile"
)

// Files of a checkpoint directory.
const (
	// CheckpointManifestFile describes the checkpoint; it is written last, so a directory
	// without it holds no checkpoint.
	CheckpointManifestFile = "manifest.json"
	// CheckpointStateFile holds the VM's device and RAM state (QEMU's migration stream).
	CheckpointStateFile = "state.bin"
	// CheckpointDiskFile is the VM's disk overlay (image mode), linked or copied in.
	CheckpointDiskFile = "disk.qcow2"
)

// checkpointVersion is the manifest format; Restore refuses any other.
const checkpointVersion = 1

// checkpointFD is the name under which QEMU holds the checkpoint's pipe or file.
const checkpointFD = "deskvm-checkpoint"

// migratePoll is how often query-migrate is asked while a checkpoint is written or read.
const migratePoll = 10 * time.Millisecond

// quitTimeout is how long a saved VM's QEMU gets to quit before it is killed.
const quitTimeout = 5 * time.Second

// checkpointBandwidth lifts QEMU's migration speed limit (128 MiB/s by default, meant for
// live migration over a shared network) for a checkpoint to a local file.
const checkpointBandwidth = 64 << 30

var (
	// ErrCheckpointBlocked means QEMU refuses to save the VM's state, e.g. while the guest
	// has a 9p share mounted. The VM is left as it was: running if it ran.
	ErrCheckpointBlocked = errors.New("vm state cannot be saved")
	// ErrTornCheckpoint means a checkpoint directory holds no complete checkpoint: its
	// manifest is missing or unreadable, or a file does not match it. It is never resumed.
	ErrTornCheckpoint = errors.New("checkpoint is incomplete or damaged")
)

// Checkpoint is a VM saved to a directory by Machine.Checkpoint.
type Checkpoint struct {
	// Dir is the checkpoint directory.
	Dir string
	// StateBytes is the size of the saved device and RAM state.
	StateBytes int64
	// DiskBytes is the size of the disk overlay carried along (image mode), else 0.
	DiskBytes int64
	// Paused is how long the guest was stopped before QEMU exited: saving the state,
	// syncing it to disk and quitting.
	Paused time.Duration
	// Save is the part of Paused that QEMU took to write the state.
	Save time.Duration
}

// manifest is CheckpointManifestFile.
type manifest struct {
	Version     int       `json:"version"`
	VM          string    `json:"vm"`
	CreatedAt   time.Time `json:"created_at"`
	QEMUVersion string    `json:"qemu_version"`
	// The device layout that a resuming QEMU must have.
	CPUs      int      `json:"cpus"`
	MemoryMiB int      `json:"memory_mib"`
	Kernel    bool     `json:"kernel"`
	Shares    []string `json:"shares,omitempty"`
	Network   bool     `json:"network"`
	Seed      bool     `json:"seed"`
	// Balloon is the balloon device's properties (balloonFeatures). Checkpoints from before
	// it was recorded have none; they load into any balloon this deskvm makes.
	Balloon string `json:"balloon,omitempty"`

	State manifestFile  `json:"state"`
	Disk  *manifestDisk `json:"disk,omitempty"`
}

type manifestFile struct {
	File   string `json:"file"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// manifestDisk is the disk overlay. It is not hashed (it may be gigabytes); its size and
// modification time tell that nothing has written it since the checkpoint.
type manifestDisk struct {
	File    string    `json:"file"`
	Format  string    `json:"format"`
	Size    int64     `json:"size"`
	ModTime time.Time `json:"mod_time"`
}

// migrationInfo is the part of query-migrate's reply used here.
type migrationInfo struct {
	Status         string   `json:"status"`
	ErrorDesc      string   `json:"error-desc"`
	BlockedReasons []string `json:"blocked-reasons"`
}

// Checkpoint saves the VM to dir and ends QEMU: it pauses the guest, writes its state and
// checks that QEMU reports the save completed, carries the disk overlay along (image mode),
// writes the manifest last, and quits QEMU. Restore resumes the VM from dir.
//
// Either the checkpoint is complete and QEMU has exited, or the VM is left as it was, running
// if it ran, and dir holds no checkpoint. ErrCheckpointBlocked means QEMU cannot save this VM
// at all (a 9p share is mounted, for one); the guest is then not even paused.
func (m *Machine) Checkpoint(ctx context.Context, dir string) (Checkpoint, error) {
	cp := Checkpoint{Dir: dir}
	mon, err := m.Monitor()
	if err != nil {
		return cp, err
	}
	// A VM in the idle class gets no CPU while the owner is busy, and QEMU's monitor and
	// migration threads are its threads too: the save could take minutes. Its threads run
	// normally from here until QEMU exits; the vCPUs are paused at once and use nothing.
	reidle := m.unstarve()
	fail := func(err error) (Checkpoint, error) {
		if rerr := reidle(); rerr != nil {
			err = fmt.Errorf("%w (and the vm lost its idle class: %v)", err, rerr)
		}
		return cp, fmt.Errorf("checkpoint vm %s: %w", m.spec.Name, err)
	}

	var mi migrationInfo
	if err := mon.Execute(ctx, "query-migrate", nil, &mi); err != nil {
		return fail(err)
	}
	if len(mi.BlockedReasons) > 0 {
		return fail(fmt.Errorf("%w: %s", ErrCheckpointBlocked, strings.Join(mi.BlockedReasons, "; ")))
	}
	var ver struct {
		QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
	}
	if err := mon.Execute(ctx, "query-version", nil, &ver); err != nil {
		return fail(err)
	}

	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail(err)
	}
	// An older manifest must not outlive the state it describes.
	if err := os.Remove(filepath.Join(dir, CheckpointManifestFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fail(err)
	}
	state, err := os.OpenFile(filepath.Join(dir, CheckpointStateFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fail(err)
	}
	defer state.Close()

	wasRunning, err := mon.RunState(ctx)
	if err != nil {
		return fail(err)
	}
	start := time.Now()
	if err := m.Pause(ctx); err != nil {
		return fail(err)
	}
	// From here on, a failure puts the VM back as it was; the directory then has no
	// manifest, so it is never taken for a checkpoint.
	failPaused := func(err error) (Checkpoint, error) {
		if wasRunning == "running" {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			if rerr := m.Resume(rctx); rerr != nil {
				err = fmt.Errorf("%w (and the vm stays paused: %v)", err, rerr)
			}
		}
		return fail(err)
	}
	if err := mon.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": checkpointBandwidth}, nil); err != nil {
		return failPaused(err)
	}
	size, sum, err := m.saveState(ctx, mon, state)
	if err != nil {
		return failPaused(err)
	}
	cp.Save = time.Since(start)
	if size == 0 {
		return failPaused(errors.New("qemu wrote an empty state"))
	}
	if err := state.Sync(); err != nil {
		return failPaused(fmt.Errorf("sync state: %w", err))
	}
	if err := state.Close(); err != nil {
		return failPaused(fmt.Errorf("close state: %w", err))
	}
	cp.StateBytes = size

	mf := manifest{
		Version:     checkpointVersion,
		VM:          m.spec.Name,
		CreatedAt:   time.Now().UTC(),
		QEMUVersion: fmt.Sprintf("%d.%d.%d", ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro),
		State:       manifestFile{File: CheckpointStateFile, Size: size, SHA256: sum},
	}
	mf.setLayout(m.spec)
	if d := m.spec.Disk; d != nil {
		// QEMU flushed and released the disk when the save completed: the overlay is
		// consistent with the saved RAM.
		md, err := carryDisk(d, dir)
		if err != nil {
			return failPaused(err)
		}
		mf.Disk = &md
		cp.DiskBytes = md.Size
	}
	if err := writeManifest(dir, mf); err != nil {
		return failPaused(err)
	}

	// The checkpoint is complete, so this QEMU must not run the guest again: quit, or
	// SIGKILL if it does not go (its disks were flushed and released when the save
	// completed). quit's reply races with QEMU closing the socket, so its error is no
	// failure.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), quitTimeout)
	_ = mon.Quit(qctx)
	cancel()
	select {
	case <-m.done:
	case <-time.After(quitTimeout):
		_ = m.Kill()
		<-m.done
	}
	_ = m.Close()
	cp.Paused = time.Since(start)
	return cp, nil
}

// unstarve puts the VM's threads and cgroups that are in the idle class back in the normal
// class, and returns the function that restores what it changed.
func (m *Machine) unstarve() (reidle func() error) {
	idle, _ := IdleClass(m.pid)
	var idleDirs []string
	for _, d := range m.spec.CgroupDirs {
		if ok, _ := CgroupIdle(d); ok && ClearCgroupIdle(d) == nil {
			idleDirs = append(idleDirs, d)
		}
	}
	if idle {
		_ = SetNormalClass(m.pid)
	}
	return func() error {
		var errs []error
		if idle {
			errs = append(errs, SetIdleClass(m.pid))
		}
		for _, d := range idleDirs {
			errs = append(errs, SetCgroupIdle(d))
		}
		return errors.Join(errs...)
	}
}

// saveState runs the migration of the paused VM into a pipe and copies the stream to w while
// hashing it; it returns the size and sha256 once QEMU reports the migration completed.
func (m *Machine) saveState(ctx context.Context, mon *Monitor, w io.Writer) (int64, string, error) {
	r, pw, err := os.Pipe()
	if err != nil {
		return 0, "", err
	}
	defer r.Close()
	// A larger pipe buffer means fewer wake-ups of this process and of QEMU's migration
	// thread; failing to grow it only costs speed.
	_, _ = unix.FcntlInt(pw.Fd(), unix.F_SETPIPE_SZ, 1<<20)
	err = mon.runWithFile(ctx, "getfd", map[string]any{"fdname": checkpointFD}, pw)
	pw.Close() // QEMU holds its own copy now
	if err != nil {
		return 0, "", err
	}

	type copied struct {
		n   int64
		sum string
		err error
	}
	done := make(chan copied, 1)
	go func() {
		h := sha256.New()
		n, err := io.CopyBuffer(io.MultiWriter(w, h), r, make([]byte, 1<<20))
		done <- copied{n, hex.EncodeToString(h.Sum(nil)), err}
	}()

	if err := mon.Execute(ctx, "migrate", map[string]any{"uri": "fd:" + checkpointFD}, nil); err != nil {
		_ = mon.Execute(context.WithoutCancel(ctx), "closefd", map[string]any{"fdname": checkpointFD}, nil)
		r.Close()
		<-done
		// A blocker may have appeared since Checkpoint looked (a share mounted meanwhile).
		var mi migrationInfo
		if qerr := mon.Execute(ctx, "query-migrate", nil, &mi); qerr == nil && len(mi.BlockedReasons) > 0 {
			return 0, "", fmt.Errorf("%w: %s", ErrCheckpointBlocked, strings.Join(mi.BlockedReasons, "; "))
		}
		return 0, "", fmt.Errorf("save state: %w", err)
	}
	if err := waitMigration(ctx, mon, m.done); err != nil {
		// Cancelling closes QEMU's end of the pipe, which ends the copy.
		_ = mon.Execute(context.WithoutCancel(ctx), "migrate_cancel", nil, nil)
		r.Close()
		<-done
		return 0, "", fmt.Errorf("save state: %w", err)
	}
	// QEMU closes its end of the pipe when the migration completes.
	select {
	case c := <-done:
		if c.err != nil {
			return 0, "", fmt.Errorf("write state: %w", c.err)
		}
		return c.n, c.sum, nil
	case <-ctx.Done():
		r.Close()
		<-done
		return 0, "", fmt.Errorf("write state: %w", ctx.Err())
	}
}

// waitMigration polls query-migrate until the migration, outgoing or incoming, completes or
// fails, QEMU exits, or ctx ends.
func waitMigration(ctx context.Context, mon *Monitor, exited <-chan struct{}) error {
	tick := time.NewTicker(migratePoll)
	defer tick.Stop()
	for {
		var mi migrationInfo
		if err := mon.Execute(ctx, "query-migrate", nil, &mi); err != nil {
			return err
		}
		switch mi.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			if mi.ErrorDesc == "" {
				mi.ErrorDesc = "no reason given"
			}
			return fmt.Errorf("migration %s: %s", mi.Status, mi.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errors.New("qemu exited")
		case <-tick.C:
		}
	}
}

// Restore starts a new QEMU for spec from the checkpoint in dir and loads the saved state.
// The VM is returned paused, exactly as it was saved: the caller applies its yield settings
// (SetIdleClass on the new pid, above all) and then calls Resume. spec must describe the
// same devices as the VM that was saved (vCPUs, memory, shares, network, kernel or disk);
// paths may differ (a disk is taken from dir). A checkpoint whose manifest is missing or
// whose state does not match it is refused with ErrTornCheckpoint and never started.
//
// In image mode the restored VM runs on the disk in dir (Spec().Disk says so), and writes
// to it, so the checkpoint cannot be restored again afterwards: Restore refuses a disk that
// changed since the checkpoint.
func Restore(ctx context.Context, spec Spec, dir string) (*Machine, error) {
	mf, err := readCheckpoint(dir)
	if err != nil {
		return nil, fmt.Errorf("restore vm %s: %w", spec.Name, err)
	}
	if err := mf.checkLayout(spec); err != nil {
		return nil, fmt.Errorf("restore vm %s from %s: %w", spec.Name, dir, err)
	}
	if mf.Disk != nil {
		spec.Disk = &Disk{Path: filepath.Join(dir, mf.Disk.File), Format: mf.Disk.Format}
	}
	statePath := filepath.Join(dir, mf.State.File)
	state, err := os.Open(statePath)
	if err != nil {
		return nil, fmt.Errorf("restore vm %s: %w", spec.Name, err)
	}
	defer state.Close()

	spec.Incoming = statePath
	m, err := Start(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("restore vm %s: %w", spec.Name, err)
	}
	if err := m.checkVersion(ctx, mf.QEMUVersion); err != nil {
		_ = m.Kill()
		return nil, fmt.Errorf("restore vm %s from %s: %w", spec.Name, dir, err)
	}
	if err := m.loadState(ctx, state); err != nil {
		_ = m.Kill()
		return nil, fmt.Errorf("restore vm %s from %s: %w", spec.Name, dir, err)
	}
	// The state is in; Spec now describes a VM to find again, not one to restore.
	m.spec.Incoming = ""
	return m, nil
}

// checkVersion refuses a QEMU other than the one that saved the state: the VM's machine type
// is the unversioned "q35", which each QEMU release maps to its own machine, and QEMU loads
// a state only into the machine that saved it.
func (m *Machine) checkVersion(ctx context.Context, want string) error {
	mon, err := m.Monitor()
	if err != nil {
		return err
	}
	var ver struct {
		QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
	}
	if err := mon.Execute(ctx, "query-version", nil, &ver); err != nil {
		return err
	}
	got := fmt.Sprintf("%d.%d.%d", ver.QEMU.Major, ver.QEMU.Minor, ver.QEMU.Micro)
	// Stable releases (the third number) keep their release's machine types.
	if release(got) != release(want) {
		return fmt.Errorf("checkpoint was saved by qemu %s, this qemu is %s", want, got)
	}
	return nil
}

// release is "major.minor" of a QEMU version.
func release(version string) string {
	parts := strings.SplitN(version, ".", 3)
	return strings.Join(parts[:min(2, len(parts))], ".")
}

// loadState feeds the state file to a QEMU started with -incoming defer and waits until QEMU
// has loaded it; the VM is then paused.
func (m *Machine) loadState(ctx context.Context, state *os.File) error {
	mon, err := m.Monitor()
	if err != nil {
		return err
	}
	if err := mon.runWithFile(ctx, "getfd", map[string]any{"fdname": checkpointFD}, state); err != nil {
		return err
	}
	if err := mon.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + checkpointFD}, nil); err != nil {
		return fmt.Errorf("load state: %w", err)
	}
	if err := waitMigration(ctx, mon, m.done); err != nil {
		// QEMU 7.2 exits when it cannot load the state, and its log says why. The monitor
		// may see the exit first, as a reply cut short, so give QEMU a moment to be reaped.
		if m.exitsWithin(ctx, quitTimeout) {
			return fmt.Errorf("load state: qemu exited: %s", m.LogTail(3))
		}
		return fmt.Errorf("load state: %w", err)
	}
	// The saved VM was paused, so QEMU stays paused after loading; wait until it has left
	// the incoming state for good.
	tick := time.NewTicker(migratePoll)
	defer tick.Stop()
	for {
		st, err := mon.RunState(ctx)
		if err != nil {
			return fmt.Errorf("load state: %w", err)
		}
		if st != "inmigrate" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("load state: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// exitsWithin reports whether QEMU has exited, or exits within d.
func (m *Machine) exitsWithin(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-m.done:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return false
}

// CheckCheckpoint tells whether dir holds a complete checkpoint: a manifest, and files that
// match it. Its error wraps ErrTornCheckpoint when they do not.
func CheckCheckpoint(dir string) error {
	_, err := readCheckpoint(dir)
	return err
}

// readCheckpoint reads dir's manifest and checks every file against it.
func readCheckpoint(dir string) (manifest, error) {
	var mf manifest
	torn := func(format string, a ...any) (manifest, error) {
		return mf, fmt.Errorf("%w: %s: %s", ErrTornCheckpoint, dir, fmt.Sprintf(format, a...))
	}
	b, err := os.ReadFile(filepath.Join(dir, CheckpointManifestFile))
	if err != nil {
		return torn("read manifest: %v", err)
	}
	if err := json.Unmarshal(b, &mf); err != nil {
		return torn("decode manifest: %v", err)
	}
	if mf.Version != checkpointVersion {
		return mf, fmt.Errorf("checkpoint %s: manifest version %d, want %d", dir, mf.Version, checkpointVersion)
	}
	if mf.State.File == "" || filepath.Base(mf.State.File) != mf.State.File {
		return torn("manifest names state file %q", mf.State.File)
	}
	f, err := os.Open(filepath.Join(dir, mf.State.File))
	if err != nil {
		return torn("open state: %v", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return torn("read state: %v", err)
	}
	if n != mf.State.Size {
		return torn("state is %d bytes, manifest says %d", n, mf.State.Size)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != mf.State.SHA256 {
		return torn("state checksum %s, manifest says %s", sum, mf.State.SHA256)
	}
	if d := mf.Disk; d != nil {
		if d.File == "" || filepath.Base(d.File) != d.File {
			return torn("manifest names disk file %q", d.File)
		}
		fi, err := os.Stat(filepath.Join(dir, d.File))
		if err != nil {
			return torn("disk: %v", err)
		}
		if fi.Size() != d.Size || !fi.ModTime().Equal(d.ModTime) {
			return torn("disk %s changed since the checkpoint (size %d, modified %s; manifest says %d, %s)",
				d.File, fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano), d.Size, d.ModTime.UTC().Format(time.RFC3339Nano))
		}
	}
	return mf, nil
}

func (mf *manifest) setLayout(s Spec) {
	mf.CPUs, mf.MemoryMiB = s.CPUs, s.MemoryMiB
	mf.Kernel = s.Kernel != ""
	mf.Network = s.Network || len(s.Ports) > 0
	mf.Seed = s.Seed != ""
	mf.Balloon = balloonFeatures
	mf.Shares = nil
	for _, sh := range s.Shares {
		mf.Shares = append(mf.Shares, sh.Tag)
	}
}

// checkLayout compares the devices of spec with those the checkpoint was saved with: QEMU
// can load a state only into the same devices, and says so less clearly.
func (mf *manifest) checkLayout(s Spec) error {
	var want manifest
	want.setLayout(s)
	var errs []error
	if want.CPUs != mf.CPUs {
		errs = append(errs, fmt.Errorf("vm has %d vcpus, checkpoint %d", want.CPUs, mf.CPUs))
	}
	if want.MemoryMiB != mf.MemoryMiB {
		errs = append(errs, fmt.Errorf("vm has %d MiB of memory, checkpoint %d", want.MemoryMiB, mf.MemoryMiB))
	}
	if want.Kernel != mf.Kernel || (s.Disk != nil) != (mf.Disk != nil) {
		errs = append(errs, errors.New("vm and checkpoint differ in boot mode (kernel or disk)"))
	}
	if !slices.Equal(want.Shares, mf.Shares) {
		errs = append(errs, fmt.Errorf("vm shares %q, checkpoint %q", want.Shares, mf.Shares))
	}
	if want.Network != mf.Network {
		errs = append(errs, fmt.Errorf("vm network %t, checkpoint %t", want.Network, mf.Network))
	}
	if want.Seed != mf.Seed {
		errs = append(errs, fmt.Errorf("vm seed disk %t, checkpoint %t", want.Seed, mf.Seed))
	}
	if mf.Balloon != "" && mf.Balloon != want.Balloon {
		errs = append(errs, fmt.Errorf("vm balloon has %q, checkpoint %q (saved by another deskvm release)", want.Balloon, mf.Balloon))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("device layout differs: %w", err)
	}
	return nil
}

// carryDisk puts the disk overlay into dir: a hard link when dir is on the same file system
// (instant), else a copy.
func carryDisk(d *Disk, dir string) (manifestDisk, error) {
	dst := filepath.Join(dir, CheckpointDiskFile)
	src, err := filepath.Abs(d.Path)
	if err != nil {
		return manifestDisk{}, err
	}
	if abs, _ := filepath.Abs(dst); abs != src {
		if err := os.Remove(dst); err != nil && !errors.Is(err, os.ErrNotExist) {
			return manifestDisk{}, fmt.Errorf("carry disk: %w", err)
		}
		if err := os.Link(src, dst); err != nil {
			if err := copyFile(src, dst); err != nil {
				return manifestDisk{}, fmt.Errorf("carry disk: %w", err)
			}
		}
	}
	fi, err := os.Stat(dst)
	if err != nil {
		return manifestDisk{}, fmt.Errorf("carry disk: %w", err)
	}
	return manifestDisk{File: CheckpointDiskFile, Format: d.Format, Size: fi.Size(), ModTime: fi.ModTime()}, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// writeManifest writes the manifest under a temporary name, syncs it and renames it into
// place, then syncs dir: the manifest appears whole or not at all, after the files it names.
func writeManifest(dir string, mf manifest) error {
	b, err := json.MarshalIndent(mf, "", "  ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, CheckpointManifestFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	return nil
}

// runWithFile runs a QMP command and passes f along with it (SCM_RIGHTS on the QMP socket),
// as getfd and add-fd need.
func (mon *Monitor) runWithFile(ctx context.Context, command string, args any, f *os.File) error {
	b, err := json.Marshal(map[string]any{"execute": command, "arguments": args})
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	ch := make(chan error, 1)
	go func() {
		_, err := mon.mon.RunWithFile(b, f)
		ch <- err
	}()
	select {
	case <-ctx.Done():
		// As in Execute: a reply that may still come makes the connection unusable.
		_ = mon.Close()
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	case err := <-ch:
		if err != nil {
			return fmt.Errorf("qmp %s: %w", command, err)
		}
		return nil
	}
}
