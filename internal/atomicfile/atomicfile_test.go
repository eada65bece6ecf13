package atomicfile

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")

	must.NoError(t, WriteFile(p, []byte("one"), 0o600))
	must.NoError(t, WriteFile(p, []byte("two"), 0o640))
	b, err := os.ReadFile(p)
	must.NoError(t, err)
	must.Eq(t, "two", string(b))
	fi, err := os.Stat(p)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o640), fi.Mode().Perm())

	entries, err := os.ReadDir(dir)
	must.NoError(t, err)
	must.Len(t, 1, entries, must.Sprint("no temporary file may be left behind"))
}

func TestWriteFileFailureLeavesOldFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	must.NoError(t, WriteFile(p, []byte("old"), 0o600))
	// A directory in the way makes the rename fail.
	target := filepath.Join(dir, "sub")
	must.NoError(t, os.MkdirAll(filepath.Join(target, "x"), 0o700))
	must.Error(t, WriteFile(target, []byte("new"), 0o600))
	b, err := os.ReadFile(p)
	must.NoError(t, err)
	must.Eq(t, "old", string(b))
	entries, err := os.ReadDir(dir)
	must.NoError(t, err)
	must.Len(t, 2, entries, must.Sprint("only state.json and sub may remain"))
}
