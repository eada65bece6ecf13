package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/driver/cloudinit"
	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/deskcloud/deskcloud/driver/guestkit"
)

// countScript prints 0 to n-1, one line every 100 ms, then exits with code.
func countScript(n, code int) string {
	return "i=0; while [ $i -lt " + strconv.Itoa(n) + " ]; do echo $i; i=$((i+1)); sleep 0.1; done; exit " + strconv.Itoa(code)
}

// counts parses a file of one number per line.
func counts(tb testing.TB, path string) []int {
	tb.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	must.NoError(tb, err)
	var out []int
	for _, l := range strings.Fields(string(b)) {
		n, err := strconv.Atoi(l)
		must.NoError(tb, err, must.Sprintf("line %q of %s", l, path))
		out = append(out, n)
	}
	return out
}

// dialAgent dials the guest agent of m again; the client is closed at cleanup.
func dialAgent(tb testing.TB, ctx context.Context, m *Machine) *guestctl.Client {
	tb.Helper()
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	spec := m.Spec()
	c, err := guestctl.Dial(dctx, spec.ControlSocket())
	must.NoError(tb, err, must.Sprintf("dial the guest agent; console: %s", m.ConsoleTail(10)))
	tb.Cleanup(func() { c.Close() })
	return c
}

func runState(tb testing.TB, ctx context.Context, m *Machine) string {
	tb.Helper()
	mon, err := m.Monitor()
	must.NoError(tb, err)
	st, err := mon.RunState(ctx)
	must.NoError(tb, err)
	return st
}

func TestCheckpointRestore(t *testing.T) {
	requireQEMU(t)
	ctx := t.Context()
	const total, code = 150, 7
	spec := testSpec(t, "ckpt-test", 1, 512)
	spec.CgroupDirs = testCgroups(t)
	m := startTestVM(t, ctx, spec)
	c := startCommand(t, ctx, m, countScript(total, code))
	waitFor(t, ctx, time.Minute, "the guest to count to 20", func() bool { return len(counts(t, spec.Stdout)) >= 20 })
	// As deskvm runs it: a VM in the idle class still checkpoints at once on a busy host.
	must.NoError(t, SetIdleClass(m.PID()))
	must.NoError(t, SetCgroupIdle(spec.CgroupDirs[0]))

	dir := filepath.Join(t.TempDir(), "checkpoint")
	cp, err := m.Checkpoint(ctx, dir)
	must.NoError(t, err)
	c.Close()
	must.True(t, m.Exited(), must.Sprint("qemu still runs after the checkpoint"))
	fi, err := os.Stat(filepath.Join(dir, CheckpointStateFile))
	must.NoError(t, err)
	must.Eq(t, cp.StateBytes, fi.Size(), must.Sprint("state file size"))
	must.Positive(t, cp.StateBytes)
	must.FileExists(t, filepath.Join(dir, CheckpointManifestFile))
	must.NoError(t, CheckCheckpoint(dir))
	before := counts(t, spec.Stdout)
	t.Logf("checkpoint: %d MiB of state, paused %s (save %s), after count %d",
		cp.StateBytes>>20, cp.Paused, cp.Save, before[len(before)-1])

	t.Run("torn copy refused", func(t *testing.T) {
		torn := filepath.Join(t.TempDir(), "torn")
		must.NoError(t, os.Mkdir(torn, 0o700))
		for _, f := range []string{CheckpointManifestFile, CheckpointStateFile} {
			b, err := os.ReadFile(filepath.Join(dir, f))
			must.NoError(t, err)
			if f == CheckpointStateFile {
				b = b[:len(b)/2] // the copy broke off halfway
			}
			must.NoError(t, os.WriteFile(filepath.Join(torn, f), b, 0o600))
		}
		tspec := testSpec(t, "ckpt-torn", 1, 512)
		_, err := Restore(ctx, tspec, torn)
		must.ErrorIs(t, err, ErrTornCheckpoint)
		must.FileNotExists(t, tspec.PIDFile(), must.Sprint("no qemu may start from a torn checkpoint"))
	})

	t.Run("state qemu cannot load", func(t *testing.T) {
		// A checkpoint whose files match its manifest but which QEMU refuses, as one from
		// another deskvm's devices would be: the error carries QEMU's own reason.
		bad := filepath.Join(t.TempDir(), "bad")
		must.NoError(t, os.Mkdir(bad, 0o700))
		b, err := os.ReadFile(filepath.Join(dir, CheckpointStateFile))
		must.NoError(t, err)
		copy(b, "NOTQ") // QEMU's stream starts with the magic "QEVM"
		must.NoError(t, os.WriteFile(filepath.Join(bad, CheckpointStateFile), b, 0o600))
		mb, err := os.ReadFile(filepath.Join(dir, CheckpointManifestFile))
		must.NoError(t, err)
		var mf manifest
		must.NoError(t, json.Unmarshal(mb, &mf))
		sum := sha256.Sum256(b)
		mf.State.SHA256 = hex.EncodeToString(sum[:])
		must.NoError(t, writeManifest(bad, mf))
		must.NoError(t, CheckCheckpoint(bad))

		bspec := testSpec(t, "ckpt-bad", 1, 512)
		m, err := Restore(ctx, bspec, bad)
		must.Nil(t, m)
		must.ErrorContains(t, err, "qemu exited")
		must.ErrorContains(t, err, "Not a migration stream")
	})

	// The resumed VM's stdout goes to a new file: QEMU truncates a file chardev it opens.
	rspec := spec
	rspec.Stdout = spec.Stdout + ".resumed"
	m2, err := Restore(ctx, rspec, dir)
	must.NoError(t, err)
	t.Cleanup(func() { stopTestVM(t, m2) })
	must.Eq(t, "paused", runState(t, ctx, m2), must.Sprint("run state after restore"))
	must.NoError(t, m2.Resume(ctx))

	c2 := dialAgent(t, ctx, m2)
	st, err := c2.Wait(ctx)
	must.NoError(t, err)
	must.Eq(t, code, st.ExitCode, must.Sprintf("exit code of the resumed command (%+v)", st))
	must.NoError(t, c2.Ack(ctx))

	after := counts(t, rspec.Stdout)
	must.SliceNotEmpty(t, after, must.Sprint("the resumed guest printed nothing"))
	must.Positive(t, after[0], must.Sprint("the resumed count started again from 0"))
	all := append(before, after...)
	for i, n := range all {
		must.Eq(t, i, n, must.Sprintf("count %d of before %v + after %v: each number once, in order", i, before, after))
	}
	must.Eq(t, total, len(all))
}

func TestCheckpoint9p(t *testing.T) {
	requireQEMU(t)
	ctx := t.Context()
	host := t.TempDir()
	must.NoError(t, os.WriteFile(filepath.Join(host, "hello"), []byte("hello from the host\n"), 0o644))
	spec := testSpec(t, "ckpt-9p", 1, 256)
	spec.Shares = []Share{{Tag: "local", HostPath: host}}
	m := startTestVM(t, ctx, spec)
	c := startCommand(t, ctx, m, "while :; do sleep 0.2; done", guestctl.Mount{Tag: "local", Path: "/local"})
	exec := func(c *guestctl.Client, script string) (int, string) {
		var out bytes.Buffer
		code, err := c.Exec(ctx, guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", script}}, guestctl.ExecIO{Stdout: &out, Stderr: &out})
		must.NoError(t, err)
		return code, out.String()
	}

	// QEMU's virtio-9p device blocks migration while the guest has the share mounted.
	must.NoError(t, SetIdleClass(m.PID()))
	_, err := m.Checkpoint(ctx, filepath.Join(t.TempDir(), "blocked"))
	must.ErrorIs(t, err, ErrCheckpointBlocked)
	must.ErrorContains(t, err, "mount_tag 'local'")
	t.Logf("checkpoint with 9p mounted: %v", err)
	must.Eq(t, "running", runState(t, ctx, m), must.Sprint("a refused checkpoint must leave the vm running"))
	idle, err := IdleClass(m.PID())
	must.NoError(t, err)
	must.True(t, idle, must.Sprint("a refused checkpoint must leave the vm in the idle class"))
	must.NoError(t, SetNormalClass(m.PID()))

	// The share cannot be unmounted while a guest process has a file open on it...
	code, out := exec(c, "exec 3</local/hello; umount /local")
	must.NonZero(t, code, must.Sprintf("umount with a file open succeeded: %s", out))
	t.Logf("umount with a file open: %s", strings.TrimSpace(out))
	// ...and once it is unmounted, QEMU lifts the blocker.
	code, out = exec(c, "umount /local")
	must.Zero(t, code, must.Sprintf("umount /local: %s", out))
	dir := filepath.Join(t.TempDir(), "checkpoint")
	_, err = m.Checkpoint(ctx, dir)
	must.NoError(t, err)
	c.Close()

	m2, err := Restore(ctx, spec, dir)
	must.NoError(t, err)
	t.Cleanup(func() { stopTestVM(t, m2) })
	must.NoError(t, m2.Resume(ctx))
	c2 := dialAgent(t, ctx, m2)
	st, err := c2.Status(ctx)
	must.NoError(t, err)
	must.Eq(t, guestctl.StateRunning, st.State, must.Sprint("the command survives the checkpoint"))
	code, out = exec(c2, "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 local /local && cat /local/hello")
	must.Zero(t, code, must.Sprintf("remount after restore: %s", out))
	must.Eq(t, "hello from the host\n", out)
}

// fakeCheckpoint writes a checkpoint of a command-mode VM with made-up state, as Checkpoint
// lays it out, for the tests that need no QEMU.
func fakeCheckpoint(t *testing.T, spec Spec) string {
	dir := t.TempDir()
	state := bytes.Repeat([]byte("QEVM state "), 1000)
	must.NoError(t, os.WriteFile(filepath.Join(dir, CheckpointStateFile), state, 0o600))
	sum := sha256.Sum256(state)
	mf := manifest{
		Version: checkpointVersion, VM: spec.Name, CreatedAt: time.Now().UTC(), QEMUVersion: "7.2.0",
		State: manifestFile{File: CheckpointStateFile, Size: int64(len(state)), SHA256: hex.EncodeToString(sum[:])},
	}
	mf.setLayout(spec)
	must.NoError(t, writeManifest(dir, mf))
	return dir
}

func TestRestoreRefuses(t *testing.T) {
	base := Spec{
		Name: "refuse", QEMUBinary: "/nonexistent/qemu", Accelerator: AccelTCG, CPUs: 2, MemoryMiB: 512,
		Kernel: "/k", Initrd: "/i", Shares: []Share{{Tag: "local", HostPath: "/tmp"}},
	}
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, dir string)
		spec   func(s *Spec)
		torn   bool
		want   string
	}{
		{name: "no manifest", torn: true, want: "read manifest",
			damage: func(t *testing.T, dir string) { must.NoError(t, os.Remove(filepath.Join(dir, CheckpointManifestFile))) }},
		{name: "half a manifest", torn: true, want: "decode manifest",
			damage: func(t *testing.T, dir string) {
				p := filepath.Join(dir, CheckpointManifestFile)
				b, err := os.ReadFile(p)
				must.NoError(t, err)
				must.NoError(t, os.WriteFile(p, b[:len(b)/2], 0o600))
			}},
		{name: "state cut short", torn: true, want: "manifest says 11000",
			damage: func(t *testing.T, dir string) {
				must.NoError(t, os.Truncate(filepath.Join(dir, CheckpointStateFile), 5000))
			}},
		{name: "state damaged", torn: true, want: "state checksum",
			damage: func(t *testing.T, dir string) {
				f, err := os.OpenFile(filepath.Join(dir, CheckpointStateFile), os.O_WRONLY, 0)
				must.NoError(t, err)
				_, err = f.WriteAt([]byte("X"), 42)
				must.NoError(t, err)
				must.NoError(t, f.Close())
			}},
		{name: "state missing", torn: true, want: "open state",
			damage: func(t *testing.T, dir string) { must.NoError(t, os.Remove(filepath.Join(dir, CheckpointStateFile))) }},
		{name: "other memory size", want: "vm has 1024 MiB of memory, checkpoint 512",
			spec: func(s *Spec) { s.MemoryMiB = 1024 }},
		{name: "other shares", want: `vm shares ["local" "alloc"], checkpoint ["local"]`,
			spec: func(s *Spec) { s.Shares = append(s.Shares, Share{Tag: "alloc", HostPath: "/tmp"}) }},
		{name: "other vcpus and network", want: "vm has 4 vcpus, checkpoint 2",
			spec: func(s *Spec) { s.CPUs, s.Network = 4, true }},
		{name: "other balloon", want: `vm balloon has "free-page-reporting=on", checkpoint "free-page-reporting=on,page-poison=on"`,
			damage: editManifest(func(mf *manifest) { mf.Balloon = "free-page-reporting=on,page-poison=on" })},
		// A checkpoint from before the balloon was recorded passes the layout check (such
		// checkpoints load into today's balloon) and gets as far as starting QEMU.
		{name: "balloon not recorded", want: "/nonexistent/qemu",
			damage: editManifest(func(mf *manifest) { mf.Balloon = "" })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := base
			spec.Shares = append([]Share(nil), base.Shares...)
			spec.StateDir, spec.SocketDir = t.TempDir(), t.TempDir()
			dir := fakeCheckpoint(t, spec)
			if tc.damage != nil {
				tc.damage(t, dir)
			}
			if tc.spec != nil {
				tc.spec(&spec)
			}
			_, err := Restore(t.Context(), spec, dir)
			must.ErrorContains(t, err, tc.want)
			must.Eq(t, tc.torn, errors.Is(err, ErrTornCheckpoint), must.Sprintf("errors.Is(%v, ErrTornCheckpoint)", err))
			must.FileNotExists(t, spec.PIDFile(), must.Sprint("no qemu may start"))
		})
	}
}

// editManifest returns a damage function that rewrites a checkpoint's manifest with edit.
func editManifest(edit func(mf *manifest)) func(t *testing.T, dir string) {
	return func(t *testing.T, dir string) {
		mf, err := readCheckpoint(dir)
		must.NoError(t, err)
		edit(&mf)
		must.NoError(t, writeManifest(dir, mf))
	}
}

func TestCheckCheckpointDisk(t *testing.T) {
	spec := Spec{Name: "disk", CPUs: 1, MemoryMiB: 256, Disk: &Disk{Path: filepath.Join(t.TempDir(), "overlay.qcow2"), Format: "qcow2"}}
	must.NoError(t, os.WriteFile(spec.Disk.Path, []byte("qcow2 overlay"), 0o600))
	dir := fakeCheckpoint(t, spec)
	md, err := carryDisk(spec.Disk, dir)
	must.NoError(t, err)
	mf, err := readCheckpoint(dir)
	must.NoError(t, err)
	mf.Disk = &md
	must.NoError(t, writeManifest(dir, mf))
	must.NoError(t, CheckCheckpoint(dir))

	// A VM restored from the checkpoint writes to the disk: the checkpoint is spent.
	must.NoError(t, os.WriteFile(spec.Disk.Path, []byte("qcow2 overlay, written since"), 0o600))
	err = CheckCheckpoint(dir)
	must.ErrorIs(t, err, ErrTornCheckpoint)
	must.ErrorContains(t, err, "changed since the checkpoint")
}

func TestRelease(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"7.2.22", "7.2"}, {"8.0.0", "8.0"}, {"9", "9"},
	} {
		t.Run(tc.in, func(t *testing.T) { must.Eq(t, tc.want, release(tc.in)) })
	}
}

// imageScript is user-data for the kit's test image: it writes a marker to the end of the
// boot disk and syncs it, counts, then reads the marker back from the disk, past the page
// cache, and writes another.
const imageScript = `#!/bin/sh
d=vda
[ "$(cat /sys/block/vdb/size)" -gt "$(cat /sys/block/vda/size)" ] && d=vdb
s=$(($(cat /sys/block/$d/size) - 8))
echo disk-marker-before | dd of=/dev/$d bs=512 seek=$s conv=fsync 2>/dev/null
i=0; while [ $i -lt 60 ]; do echo count $i; i=$((i+1)); sleep 0.1; done
echo 3 > /proc/sys/vm/drop_caches
echo read-back $(dd if=/dev/$d bs=512 skip=$s count=1 2>/dev/null | head -c 18)
echo disk-marker-after | dd of=/dev/$d bs=512 seek=$((s + 1)) conv=fsync 2>/dev/null
exit 4
`

// consoleCounts are the numbers of the "count N" lines of an image-mode console.
func consoleCounts(tb testing.TB, path string) []int {
	tb.Helper()
	b, _ := os.ReadFile(path)
	var out []int
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "count "); ok {
			n, err := strconv.Atoi(v)
			must.NoError(tb, err)
			out = append(out, n)
		}
	}
	return out
}

func TestCheckpointImageMode(t *testing.T) {
	requireQEMU(t)
	ctx := t.Context()
	spec := testSpec(t, "ckpt-image", 1, 256)
	spec.Kernel, spec.Initrd, spec.Append, spec.Stderr = "", "", "", ""
	must.NoError(t, os.MkdirAll(spec.StateDir, 0o700))
	overlay := filepath.Join(spec.StateDir, "overlay.qcow2")
	must.NoError(t, CreateOverlay(ctx, "qemu-img", guestkit.TestImage(), "qcow2", overlay))
	spec.Disk = &Disk{Path: overlay, Format: "qcow2"}
	spec.Seed = filepath.Join(spec.StateDir, "seed.iso")
	must.NoError(t, cloudinit.WriteSeed(spec.Seed, []byte(imageScript), []byte("instance-id: ckpt-image\n")))

	m := startTestVM(t, ctx, spec)
	waitFor(t, ctx, bootTimeout, "the image guest to count to 10", func() bool { return len(consoleCounts(t, spec.Stdout)) >= 10 })
	dir := filepath.Join(t.TempDir(), "checkpoint")
	cp, err := m.Checkpoint(ctx, dir)
	must.NoError(t, err)
	must.Positive(t, cp.DiskBytes)
	must.FileExists(t, filepath.Join(dir, CheckpointDiskFile))
	before := consoleCounts(t, spec.Stdout)

	rspec := spec
	rspec.Stdout = spec.Stdout + ".resumed"
	rspec.Disk = &Disk{Path: "/elsewhere/overlay.qcow2", Format: "qcow2"} // the checkpoint's disk is used
	m2, err := Restore(ctx, rspec, dir)
	must.NoError(t, err)
	t.Cleanup(func() { stopTestVM(t, m2) })
	must.NoError(t, m2.Resume(ctx))
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	must.NoError(t, m2.Wait(wctx), must.Sprint("the resumed guest powers off after its user-data"))

	console, err := os.ReadFile(rspec.Stdout)
	must.NoError(t, err)
	must.StrContains(t, string(console), "read-back disk-marker-before", must.Sprint("the disk carried along holds what the guest wrote before the checkpoint"))
	must.StrContains(t, string(console), "deskvm-image: user-data exited 4")
	after := consoleCounts(t, rspec.Stdout)
	must.SliceNotEmpty(t, after)
	must.Eq(t, before[len(before)-1]+1, after[0], must.Sprintf("count after the restore: before %v, after %v", before, after))

	// The restored VM wrote to the checkpoint's disk: the checkpoint is spent.
	_, err = Restore(ctx, rspec, dir)
	must.ErrorIs(t, err, ErrTornCheckpoint)
	must.ErrorContains(t, err, "changed since the checkpoint")
}
