package vm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

func TestSharesToWeight(t *testing.T) {
	for _, tc := range []struct{ shares, weight int64 }{{2, 1}, {1024, 39}, {262144, 10000}, {0, 1}, {1 << 30, 10000}} {
		must.Eq(t, tc.weight, sharesToWeight(tc.shares), must.Sprintf("shares %d", tc.shares))
	}
}

// TestJoinCgroupsFiles checks what joinCgroups writes into v1- and v2-shaped dirs.
func TestJoinCgroupsFiles(t *testing.T) {
	v1mem, v1cpu, v2 := t.TempDir(), t.TempDir(), t.TempDir()
	for dir, files := range map[string][]string{
		v1mem: {"memory.limit_in_bytes"}, v1cpu: {"cpu.shares"}, v2: {"memory.max", "cpu.weight"},
	} {
		for _, f := range files {
			must.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o644))
		}
	}
	must.NoError(t, joinCgroups(4242, []string{v1mem, v1cpu, v2}, 320, 1024))
	read := func(dir, f string) string {
		b, err := os.ReadFile(filepath.Join(dir, f))
		must.NoError(t, err)
		return strings.TrimSpace(string(b))
	}
	must.Eq(t, "335544320", read(v1mem, "memory.limit_in_bytes"))
	must.Eq(t, "1024", read(v1cpu, "cpu.shares"))
	must.Eq(t, "335544320", read(v2, "memory.max"))
	must.Eq(t, "39", read(v2, "cpu.weight"))
	for _, d := range []string{v1mem, v1cpu, v2} {
		must.Eq(t, "4242", read(d, "cgroup.procs"))
	}
}
