// Package tracetest helps tests and benchmarks use the third-party traces kept beside the
// repository, when they are there. The data is never copied into the repository.
package tracetest

import (
	"os"
	"path/filepath"
	"testing"
)

// LibraryLogons returns the directory of the library logon trace,
// <repo>/../shared/data/library-logons, or skips the test if it is absent.
func LibraryLogons(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("find the working directory: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Skip("skipping: no go.mod above the test, so no repository to find ../shared from")
		}
		dir = parent
	}
	data := filepath.Join(dir, "..", "shared", "data", "library-logons")
	if _, err := os.Stat(data); err != nil {
		t.Skipf("skipping: the library logon trace is not at %s (it lives beside the repository, never in it)", data)
	}
	return data
}
