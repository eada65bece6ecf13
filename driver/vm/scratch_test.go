package vm

import (
	"os"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func TestScratchBootIdle(t *testing.T) {
	requireQEMU(t)
	ctx := t.Context()
	spec := testSpec(t, "scratch", 2, 512)
	if os.Getenv("CG") != "" {
		spec.CgroupDirs = testCgroups(t)
	}
	t0 := time.Now()
	m := startTestVM(t, ctx, spec)
	must.NoError(t, SetIdleClass(m.PID()))
	if os.Getenv("CG") != "" {
		must.NoError(t, SetCgroupIdle(spec.CgroupDirs[0]))
	}
	startCommand(t, ctx, m, "while :; do sleep 1; done")
	t.Logf("booted in %v; console %s", time.Since(t0), m.ConsoleTail(3))
}
