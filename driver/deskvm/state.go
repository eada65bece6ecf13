package deskvm

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/deskcloud/deskcloud/driver/vm"
	"github.com/deskcloud/deskcloud/internal/atomicfile"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// taskState is everything RecoverTask needs to find a task's VM again. It is stored with
// Nomad as the task handle's driver state under taskHandleVersion.
type taskState struct {
	TaskConfig *drivers.TaskConfig
	Mode       string // modeCommand or modeImage
	Spec       vm.Spec
	PID        int
	StartedAt  int64 // unix nanoseconds
	// Yield is true when the task's VM yields to the owner, under Preemption (the task's
	// preemption mode, empty for the node's).
	Yield      bool
	Preemption string
	// WaitingOn names the checkpoint (its directory under local/.deskvm) of a task that
	// StartTask left waiting on disk, with no VM (PID 0), for the owner to leave. Nomad keeps
	// this state as StartTask returned it, so once the VM runs it is found from the VM
	// record in the VM's state dir (vmRecord). Empty for a task that started with a VM, and
	// in states written before it existed.
	WaitingOn string
}

// exitRecord is the guest command's exit status, saved in the VM's state dir before the guest
// is told it may power off, so that a driver restart in between does not lose it.
type exitRecord struct {
	ExitCode int    `json:"exit_code"`
	Signal   int    `json:"signal"`
	Error    string `json:"error,omitempty"`
}

func exitRecordPath(spec vm.Spec) string { return filepath.Join(spec.StateDir, "exit.json") }

// saveExitRecord writes r atomically and durably.
func saveExitRecord(spec vm.Spec, r exitRecord) error {
	if err := writeRecord(exitRecordPath(spec), r); err != nil {
		return fmt.Errorf("save exit status: %w", err)
	}
	return nil
}

// loadExitRecord reads the saved exit status; ok is false when there is none.
func loadExitRecord(spec vm.Spec) (exitRecord, bool) {
	var r exitRecord
	if !readRecord(exitRecordPath(spec), &r) {
		return exitRecord{}, false
	}
	return r, true
}

// vmRecord is the VM that a task waiting on disk brought up once the owner left: restored
// from Checkpoint, or started afresh (Checkpoint empty). It is saved in the VM's state dir
// before the VM is resumed, so that a driver restart finds the VM even though the state
// Nomad holds still says the task waits.
type vmRecord struct {
	PID        int     `json:"pid"`
	Spec       vm.Spec `json:"spec"` // as the VM runs: restored in image mode, its disk is in the checkpoint
	Checkpoint string  `json:"checkpoint,omitempty"`
}

func vmRecordPath(spec vm.Spec) string { return filepath.Join(spec.StateDir, "vm.json") }

// saveVMRecord writes r atomically and durably.
func saveVMRecord(spec vm.Spec, r vmRecord) error {
	if err := os.MkdirAll(spec.StateDir, 0o700); err != nil {
		return fmt.Errorf("save vm record: %w", err)
	}
	if err := writeRecord(vmRecordPath(spec), r); err != nil {
		return fmt.Errorf("save vm record: %w", err)
	}
	return nil
}

// loadVMRecord reads the record of the VM spec names; ok is false when there is none, or
// only one of an earlier run of the task (another VM name).
func loadVMRecord(spec vm.Spec) (vmRecord, bool) {
	var r vmRecord
	if !readRecord(vmRecordPath(spec), &r) || r.Spec.Name != spec.Name || r.PID <= 0 {
		return vmRecord{}, false
	}
	return r, true
}

func removeVMRecord(spec vm.Spec) { _ = os.Remove(vmRecordPath(spec)) }

// writeRecord writes v as JSON to path, atomically and durably.
func writeRecord(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

// readRecord reads the JSON at path into v; false when there is none or it does not decode.
func readRecord(path string, v any) bool {
	b, err := os.ReadFile(path)
	return err == nil && json.Unmarshal(b, v) == nil
}

// taskStore holds the driver's task handles by task id.
type taskStore struct {
	mu    sync.RWMutex
	store map[string]*taskHandle
}

func newTaskStore() *taskStore {
	return &taskStore{store: map[string]*taskHandle{}}
}

func (ts *taskStore) Set(id string, h *taskHandle) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ts.store[id] = h
}

func (ts *taskStore) Get(id string) (*taskHandle, bool) {
	ts.mu.RLock()
	defer ts.mu.RUnlock()
	h, ok := ts.store[id]
	return h, ok
}

func (ts *taskStore) Delete(id string) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	delete(ts.store, id)
}

func (ts *taskStore) All() []*taskHandle {
	ts.mu.RLock()
	defer ts.mu.RUnlock()
	out := make([]*taskHandle, 0, len(ts.store))
	for _, h := range ts.store {
		out = append(out, h)
	}
	return out
}
