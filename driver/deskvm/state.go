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
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(exitRecordPath(spec), b, 0o600); err != nil {
		return fmt.Errorf("save exit status: %w", err)
	}
	return nil
}

// loadExitRecord reads the saved exit status; ok is false when there is none.
func loadExitRecord(spec vm.Spec) (exitRecord, bool) {
	b, err := os.ReadFile(exitRecordPath(spec))
	if err != nil {
		return exitRecord{}, false
	}
	var r exitRecord
	if json.Unmarshal(b, &r) != nil {
		return exitRecord{}, false
	}
	return r, true
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
