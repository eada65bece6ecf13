package deskvm

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/atomicfile"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// Checkpoints live in the task's local/ dir, which the job can write: a template or an
// artifact can put files there before the task starts. Restoring a checkpoint feeds its
// state file to QEMU as a migration stream, a format QEMU does not harden against hostile
// input. So the driver signs each checkpoint it makes with a key the job never sees, and
// restores only a checkpoint whose signature it can check: made by a deskvm holding the same
// key, for this very task (namespace, job, group, task and task config).
//
// The signature covers the manifest (package vm), which holds the state file's SHA-256 and
// the disk overlay's size and time, and the task's identity.

const (
	// checkpointSigFile holds the hex HMAC-SHA256 of a checkpoint; it is written last.
	checkpointSigFile = "deskvm.sig"
	// checkpointTaskFile names the task a checkpoint was made for (taskIdentity).
	checkpointTaskFile = "deskvm.task"
	// checkpointKeyMin is the least key length, in bytes.
	checkpointKeyMin = 32
	// checkpointSigDomain keeps these MACs apart from any other use of the key.
	checkpointSigDomain = "deskvm checkpoint v1\x00"
)

var (
	// errCheckpointUnsigned: the checkpoint has no signature (made by another program, or a
	// crash between its manifest and its signature). It is never restored.
	errCheckpointUnsigned = errors.New("checkpoint is not signed")
	// errCheckpointForged: the signature does not match this node's key. Either the files
	// were changed or another key signed it (give every node the same checkpoint_key_file
	// to resume on any of them).
	errCheckpointForged = errors.New("checkpoint signature does not match this node's checkpoint key")
	// errCheckpointOtherTask: signed with this key, for another task or task config (the
	// job was updated since, say).
	errCheckpointOtherTask = errors.New("checkpoint was made for another task or task config")
)

// checkpointKey is the node's checkpoint key, read or created on first use.
type checkpointKey struct {
	path string // "" keeps a random key in this process only

	once sync.Once
	key  []byte
	err  error
}

func newCheckpointKey(path string) *checkpointKey { return &checkpointKey{path: path} }

// get returns the key: the contents of path, created with a random key (0600) if absent.
func (k *checkpointKey) get() ([]byte, error) {
	k.once.Do(func() { k.key, k.err = loadCheckpointKey(k.path) })
	return k.key, k.err
}

func loadCheckpointKey(path string) ([]byte, error) {
	if path == "" {
		return randomKey()
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		b, err = createCheckpointKey(path)
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint_key_file: %w", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("checkpoint_key_file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("checkpoint_key_file %s must be readable by its owner only (chmod 600), has mode %04o", path, fi.Mode().Perm())
	}
	key := bytes.TrimSpace(b)
	if len(key) < checkpointKeyMin {
		return nil, fmt.Errorf("checkpoint_key_file %s must hold at least %d bytes of key, has %d", path, checkpointKeyMin, len(key))
	}
	return key, nil
}

func randomKey() ([]byte, error) {
	raw := make([]byte, checkpointKeyMin)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	return []byte(hex.EncodeToString(raw)), nil
}

// createCheckpointKey writes a new random key to path, unless another process got there
// first (it links a whole file into place, so a reader never sees half a key), and returns
// what path then holds.
func createCheckpointKey(path string) ([]byte, error) {
	key, err := randomKey()
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".new-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(append(key, '\n'))
	if err == nil {
		err = tmp.Sync() // CreateTemp makes it 0600
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	return os.ReadFile(path)
}

// checkpointKey returns the node's checkpoint key; before SetConfig, one of this process
// only.
func (d *Driver) checkpointKey() *checkpointKey {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ckey == nil {
		d.ckey = newCheckpointKey("")
	}
	return d.ckey
}

// trustedCheckpoint returns the task's newest complete checkpoint if this node's key signed
// it for this task, or "". One it cannot trust is set aside as failed-… with an event that
// says why, and the task starts afresh: restoring it would hand QEMU a migration stream that
// anyone who could write the task's local/ dir may have made.
func (d *Driver) trustedCheckpoint(cfg *drivers.TaskConfig) string {
	dir := latestCheckpoint(cfg)
	if dir == "" {
		return ""
	}
	err := d.verifyCheckpoint(cfg, dir)
	if err == nil {
		return dir
	}
	d.checkpointFailed(cfg, dir, err)
	return ""
}

func (d *Driver) verifyCheckpoint(cfg *drivers.TaskConfig, dir string) error {
	key, err := d.checkpointKey().get()
	if err != nil {
		return err
	}
	id, err := taskIdentity(cfg)
	if err != nil {
		return err
	}
	return verifyCheckpoint(dir, key, id)
}

// taskIdentity names the task a checkpoint belongs to: its namespace, job, group and name,
// and a hash of its task config, so that a job whose task config changed does not resume
// the old one's VM.
func taskIdentity(cfg *drivers.TaskConfig) (string, error) {
	var tc TaskConfig
	if err := cfg.DecodeDriverConfig(&tc); err != nil {
		return "", fmt.Errorf("decode task config: %w", err)
	}
	b, err := json.Marshal(tc)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return fmt.Sprintf("%s/%s/%s/%s config-sha256:%s", cfg.Namespace, cfg.JobID, cfg.TaskGroupName, cfg.Name, hex.EncodeToString(sum[:])), nil
}

// checkpointMAC is the signature of a checkpoint with manifest for the task identity.
func checkpointMAC(key []byte, identity string, manifest []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(checkpointSigDomain))
	m.Write([]byte(identity))
	m.Write([]byte{0})
	m.Write(manifest)
	return m.Sum(nil)
}

// signCheckpoint signs the complete checkpoint in dir for the task identity.
func signCheckpoint(dir string, key []byte, identity string) error {
	manifest, err := os.ReadFile(filepath.Join(dir, vm.CheckpointManifestFile))
	if err != nil {
		return fmt.Errorf("sign checkpoint: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, checkpointTaskFile), []byte(identity+"\n"), 0o600); err != nil {
		return fmt.Errorf("sign checkpoint: %w", err)
	}
	sig := hex.EncodeToString(checkpointMAC(key, identity, manifest))
	if err := atomicfile.WriteFile(filepath.Join(dir, checkpointSigFile), []byte(sig+"\n"), 0o600); err != nil {
		return fmt.Errorf("sign checkpoint: %w", err)
	}
	return nil
}

// verifyCheckpoint checks dir's signature against key and that it was made for the task
// identity. Its errors wrap errCheckpointUnsigned, errCheckpointForged or
// errCheckpointOtherTask. It checks the signature only: vm.CheckCheckpoint checks the files
// against the manifest.
func verifyCheckpoint(dir string, key []byte, identity string) error {
	sigHex, err := os.ReadFile(filepath.Join(dir, checkpointSigFile))
	if err != nil {
		return fmt.Errorf("%w: %v", errCheckpointUnsigned, err)
	}
	sig, err := hex.DecodeString(string(bytes.TrimSpace(sigHex)))
	if err != nil {
		return fmt.Errorf("%w: %s is not hex", errCheckpointForged, checkpointSigFile)
	}
	manifest, err := os.ReadFile(filepath.Join(dir, vm.CheckpointManifestFile))
	if err != nil {
		return fmt.Errorf("%w: %v", errCheckpointUnsigned, err)
	}
	madeFor, err := os.ReadFile(filepath.Join(dir, checkpointTaskFile))
	if err != nil {
		return fmt.Errorf("%w: %v", errCheckpointUnsigned, err)
	}
	madeForID := string(bytes.TrimSuffix(madeFor, []byte("\n")))
	if !hmac.Equal(sig, checkpointMAC(key, madeForID, manifest)) {
		return errCheckpointForged
	}
	if madeForID != identity {
		return fmt.Errorf("%w: made for %s, this is %s", errCheckpointOtherTask, madeForID, identity)
	}
	return nil
}
