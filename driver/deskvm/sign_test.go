package deskvm

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

// testKeyFile is the checkpoint key of every driver the package's tests start, kept for the
// whole run so that a driver restarted in a test, or a test's own fake checkpoint, uses the
// key the driver checks with.
var testKeyFile string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "deskvm-test-key-")
	if err != nil {
		panic(err)
	}
	testKeyFile = filepath.Join(dir, "checkpoint.key")
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// signForTest signs a checkpoint made by a test for task with the tests' key.
func signForTest(t *testing.T, dir string, task *drivers.TaskConfig) {
	t.Helper()
	key, err := newCheckpointKey(testKeyFile).get()
	must.NoError(t, err)
	id, err := taskIdentity(task)
	must.NoError(t, err)
	must.NoError(t, signCheckpoint(dir, key, id))
}

func TestCheckpointKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keys", "checkpoint.key")

	// Two plugins (two Nomad clients on one machine) create the key at once: both end up
	// with the one that reached the file.
	var wg sync.WaitGroup
	keys := make([][]byte, 2)
	errs := make([]error, 2)
	for i := range keys {
		wg.Go(func() { keys[i], errs[i] = newCheckpointKey(path).get() })
	}
	wg.Wait()
	must.NoError(t, errs[0])
	must.NoError(t, errs[1])
	must.Eq(t, keys[0], keys[1])
	must.Eq(t, 64, len(keys[0]), must.Sprint("32 random bytes in hex"))
	fi, err := os.Stat(path)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o600), fi.Mode().Perm())
	again, err := newCheckpointKey(path).get()
	must.NoError(t, err)
	must.Eq(t, keys[0], again, must.Sprint("a key once made is read back, not replaced"))

	// An operator's key: whitespace around it does not count.
	own := filepath.Join(dir, "own.key")
	must.NoError(t, os.WriteFile(own, []byte("  "+strings.Repeat("k", 40)+"\n"), 0o600))
	k, err := newCheckpointKey(own).get()
	must.NoError(t, err)
	must.Eq(t, strings.Repeat("k", 40), string(k))

	short := filepath.Join(dir, "short.key")
	must.NoError(t, os.WriteFile(short, []byte("too short\n"), 0o600))
	_, err = newCheckpointKey(short).get()
	must.ErrorContains(t, err, "checkpoint_key_file "+short+" must hold at least 32 bytes of key, has 9")

	open := filepath.Join(dir, "open.key")
	must.NoError(t, os.WriteFile(open, []byte(strings.Repeat("k", 40)), 0o644))
	_, err = newCheckpointKey(open).get()
	must.ErrorContains(t, err, "must be readable by its owner only (chmod 600), has mode 0644")

	// No file: a key of this process only, random each time.
	a, err := newCheckpointKey("").get()
	must.NoError(t, err)
	b, err := newCheckpointKey("").get()
	must.NoError(t, err)
	must.NotEq(t, a, b)
}

// fakeCheckpoint makes a checkpoint dir with a manifest, as package vm leaves it.
func fakeCheckpoint(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "checkpoint-1")
	must.NoError(t, os.MkdirAll(dir, 0o700))
	must.NoError(t, os.WriteFile(filepath.Join(dir, vm.CheckpointManifestFile), []byte(`{"version":1,"state":{"file":"state.bin","size":3,"sha256":"abc"}}`), 0o600))
	return dir
}

func TestSignCheckpoint(t *testing.T) {
	key := []byte(strings.Repeat("a", 64))
	other := []byte(strings.Repeat("b", 64))
	const id = "default/count/work/count config-sha256:1111"

	t.Run("signed by this key for this task", func(t *testing.T) {
		dir := fakeCheckpoint(t)
		must.NoError(t, signCheckpoint(dir, key, id))
		must.NoError(t, verifyCheckpoint(dir, key, id))
	})
	t.Run("unsigned", func(t *testing.T) {
		dir := fakeCheckpoint(t)
		must.ErrorIs(t, verifyCheckpoint(dir, key, id), errCheckpointUnsigned)
	})
	t.Run("another key", func(t *testing.T) {
		dir := fakeCheckpoint(t)
		must.NoError(t, signCheckpoint(dir, other, id))
		must.ErrorIs(t, verifyCheckpoint(dir, key, id), errCheckpointForged)
	})
	t.Run("manifest changed after signing", func(t *testing.T) {
		// The job rewrites the manifest to name a state file of its own making.
		dir := fakeCheckpoint(t)
		must.NoError(t, signCheckpoint(dir, key, id))
		mf := filepath.Join(dir, vm.CheckpointManifestFile)
		b, err := os.ReadFile(mf)
		must.NoError(t, err)
		must.NoError(t, os.WriteFile(mf, []byte(strings.Replace(string(b), `"abc"`, `"abd"`, 1)), 0o600))
		must.ErrorIs(t, verifyCheckpoint(dir, key, id), errCheckpointForged)
	})
	t.Run("identity changed after signing", func(t *testing.T) {
		// The job claims a checkpoint of another task as its own.
		dir := fakeCheckpoint(t)
		must.NoError(t, signCheckpoint(dir, key, "default/other/work/count config-sha256:1111"))
		must.NoError(t, os.WriteFile(filepath.Join(dir, checkpointTaskFile), []byte(id+"\n"), 0o600))
		must.ErrorIs(t, verifyCheckpoint(dir, key, id), errCheckpointForged)
	})
	t.Run("another task config", func(t *testing.T) {
		dir := fakeCheckpoint(t)
		must.NoError(t, signCheckpoint(dir, key, "default/count/work/count config-sha256:2222"))
		err := verifyCheckpoint(dir, key, id)
		must.ErrorIs(t, err, errCheckpointOtherTask)
		must.ErrorContains(t, err, "made for default/count/work/count config-sha256:2222")
	})
	t.Run("signature not hex", func(t *testing.T) {
		dir := fakeCheckpoint(t)
		must.NoError(t, signCheckpoint(dir, key, id))
		must.NoError(t, os.WriteFile(filepath.Join(dir, checkpointSigFile), []byte("zz\n"), 0o600))
		must.ErrorIs(t, verifyCheckpoint(dir, key, id), errCheckpointForged)
	})
}

func TestTaskIdentity(t *testing.T) {
	mk := func(job string, tc TaskConfig) string {
		cfg := &drivers.TaskConfig{Namespace: "default", JobID: job, TaskGroupName: "work", Name: "count"}
		must.NoError(t, cfg.EncodeConcreteDriverConfig(&tc))
		id, err := taskIdentity(cfg)
		must.NoError(t, err)
		return id
	}
	base := mk("count", TaskConfig{Command: "/local/count.sh", Args: []string{"300"}, Preemption: "checkpoint"})
	must.StrHasPrefix(t, "default/count/work/count config-sha256:", base)
	must.Eq(t, base, mk("count", TaskConfig{Command: "/local/count.sh", Args: []string{"300"}, Preemption: "checkpoint"}))
	must.NotEq(t, base, mk("count", TaskConfig{Command: "/local/count.sh", Args: []string{"301"}, Preemption: "checkpoint"}))
	must.NotEq(t, base, mk("other", TaskConfig{Command: "/local/count.sh", Args: []string{"300"}, Preemption: "checkpoint"}))
}

// TestDriver_RefusesUntrustedCheckpoint: a checkpoint in the task's local/ dir that this
// node's key did not sign for this task (the job wrote it, or it was made for another task
// config) is never restored: it is set aside as failed-…, the event says why, and the task's
// own command runs afresh.
func TestDriver_RefusesUntrustedCheckpoint(t *testing.T) {
	for _, tc := range []struct {
		name string
		mess func(t *testing.T, dir string, task *drivers.TaskConfig)
		want string
	}{
		{"unsigned, as a job's template or artifact would put it", func(t *testing.T, dir string, _ *drivers.TaskConfig) {
			must.NoError(t, os.Remove(filepath.Join(dir, checkpointSigFile)))
		}, "checkpoint is not signed"},
		{"signed with another key", func(t *testing.T, dir string, task *drivers.TaskConfig) {
			id, err := taskIdentity(task)
			must.NoError(t, err)
			must.NoError(t, signCheckpoint(dir, []byte(strings.Repeat("x", 64)), id))
		}, errCheckpointForged.Error()},
		{"made for another task config", func(t *testing.T, dir string, task *drivers.TaskConfig) {
			other := *task
			must.NoError(t, other.EncodeConcreteDriverConfig(&TaskConfig{Command: "/bin/sh", Args: []string{"-c", "exit 0"}}))
			signForTest(t, dir, &other)
		}, errCheckpointOtherTask.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hv := newFakeHypervisor(t)
			pipe := newOwnerPipe(t)
			h, d := newHarness(t, fakeBackend(), hv, yieldConfig(t, pipe.path, "checkpoint"))
			events := collectEvents(t, d)
			task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo fresh; exit 9"}})
			t.Cleanup(h.MkAllocDir(task, true))
			cp := writeFakeCheckpoint(t, task, restoredCommand("echo restored; exit 0"))
			tc.mess(t, cp, task)

			handle, _, err := h.StartTask(task)
			must.NoError(t, err)
			launched, restored := hv.counts()
			must.Eq(t, 0, restored, must.Sprint("an untrusted checkpoint must never reach QEMU"))
			must.Eq(t, 1, launched, must.Sprint("the task starts afresh"))
			res := waitExit(t, h, handle.Config.ID, 10*time.Second)
			must.Eq(t, 9, res.ExitCode, must.Sprintf("the task's own command runs; got %+v", res))
			waitFor(t, 5*time.Second, "the refusal's event", func() bool {
				return events.has("checkpoint could not be resumed, starting afresh: " + tc.want)
			})
			failed := filepath.Join(filepath.Dir(cp), "failed-"+filepath.Base(cp))
			_, err = os.Stat(failed)
			must.NoError(t, err, must.Sprint("the refused checkpoint is set aside, not deleted"))
		})
	}

	t.Run("signed by this node for this task", func(t *testing.T) {
		hv := newFakeHypervisor(t)
		pipe := newOwnerPipe(t)
		h, _ := newHarness(t, fakeBackend(), hv, yieldConfig(t, pipe.path, "checkpoint"))
		task := newTask(t, TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo fresh; exit 9"}})
		t.Cleanup(h.MkAllocDir(task, true))
		writeFakeCheckpoint(t, task, restoredCommand("echo restored; exit 0"))
		handle, _, err := h.StartTask(task)
		must.NoError(t, err)
		_, restored := hv.counts()
		must.Eq(t, 1, restored, must.Sprint("the node's own checkpoint is restored"))
		must.NoError(t, h.StopTask(handle.Config.ID, time.Second, "SIGKILL"))
	})
}
