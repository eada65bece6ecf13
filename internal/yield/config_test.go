package yield

import (
	"errors"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func TestDefaults(t *testing.T) {
	p := DefaultPolicy()
	must.NoError(t, p.Validate())
	fromConfig, err := DefaultConfig().Policy()
	must.NoError(t, err)
	must.Eq(t, p, fromConfig, must.Sprint("DefaultConfig must spell DefaultPolicy"))

	c := DefaultConfig()
	must.Eq(t, "15m", c.AwayAfter)
	must.Eq(t, "2m", c.SuspendAfter)
	must.Eq(t, []string{"checkpoint", "suspend", "restart"}, c.PreemptionModes)
}

func TestConfigPolicyErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(*Config)
		want []string
	}{
		{"unparsable duration", func(c *Config) { c.SuspendAfter = "2 minutes" }, []string{`suspend_after must be a duration such as "30s" or "2m", got "2 minutes"`}},
		{"empty duration", func(c *Config) { c.LoadWindow = "" }, []string{`load_window must be a duration such as "30s" or "2m", got ""`}},
		{"several durations at once", func(c *Config) {
			c.ResumeAfter = "soon"
			c.CheckpointAfter = "10"
		}, []string{
			`resume_after must be a duration such as "30s" or "2m", got "soon"`,
			`checkpoint_after must be a duration such as "30s" or "2m", got "10"`,
		}},
		{"negative duration", func(c *Config) { c.CapRecoverAfter = "-30s" }, []string{`cap_recover_after must be zero or more, got "-30s"`}},
		{"owner key", func(c *Config) { c.CPUBusyAbove = "7" }, []string{`cpu_busy_above must be a load from 0 to 1, got "7"`}},
		{"unknown mode", func(c *Config) { c.Preemption = "hibernate" }, []string{`preemption must be one of ["checkpoint" "suspend" "restart"], got "hibernate"`}},
		{"mode not allowed on node", func(c *Config) { c.PreemptionModes = []string{"suspend", "restart"} }, []string{`preemption must be one of preemption_modes ["suspend" "restart"], got "checkpoint"`}},
		{"no modes", func(c *Config) { c.PreemptionModes = nil }, []string{`preemption_modes must name at least one of ["checkpoint" "suspend" "restart"], got none`}},
		{"bad mode in list", func(c *Config) { c.PreemptionModes = []string{"checkpoint", "freeze"} }, []string{`preemption_modes entries must be among ["checkpoint" "suspend" "restart"], got "freeze"`}},
		{"memory", func(c *Config) {
			c.MemoryLowWater = 4096
			c.MemoryFloor = -1
		}, []string{
			`memory_high_water must be at least memory_low_water (4096), got "2048"`,
			`memory_floor must be zero or more MiB, got "-1"`,
		}},
		{"cap steps", func(c *Config) {
			c.CPUCapSteps = []ConfigCapStep{{LoadAbove: "0.2", Percent: 50}, {LoadAbove: "0.1", Percent: 60}, {LoadAbove: "2", Percent: 0}}
		}, []string{
			`cpu_cap_step[1].load_above must be above the step before's (0.2), got "0.1"`,
			`cpu_cap_step[1].percent must be below the step before's (50), got "60"`,
			`cpu_cap_step[2].load_above must be a load from 0 to 1, got "2"`,
			`cpu_cap_step[2].percent must be from 1 to 100, got "0"`,
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.edit(&c)
			_, err := c.Policy()
			must.Error(t, err)
			for _, w := range tc.want {
				must.ErrorContains(t, err, w)
			}
			var joined interface{ Unwrap() []error }
			if len(tc.want) > 1 {
				must.True(t, errors.As(err, &joined), must.Sprint("several errors must come joined"))
			}
		})
	}
}

func TestConfigCapStepsDefault(t *testing.T) {
	c := DefaultConfig()
	c.CPUCapSteps = nil
	p, err := c.Policy()
	must.NoError(t, err)
	must.Eq(t, DefaultPolicy().CPUCapSteps, p.CPUCapSteps)

	c.CPUCapSteps = []ConfigCapStep{{LoadAbove: "0", Percent: 100}} // never cap
	p, err = c.Policy()
	must.NoError(t, err)
	must.SliceLen(t, 1, p.CPUCapSteps)
}

func TestForTask(t *testing.T) {
	node := DefaultPolicy()
	node.PreemptionModes = []Mode{ModeCheckpoint, ModeRestart}
	cases := []struct {
		name string
		ask  string
		want Mode
		err  string
	}{
		{"node default", "", ModeCheckpoint, ""},
		{"allowed", "restart", ModeRestart, ""},
		{"not allowed here", "suspend", "", `preemption must be one of the node's preemption_modes ["checkpoint" "restart"], got "suspend"`},
		{"no such mode", "nap", "", `preemption must be one of the node's preemption_modes ["checkpoint" "restart"], got "nap"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := node.ForTask(tc.ask)
			if tc.err != "" {
				must.EqError(t, err, tc.err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, p.Preemption)
			must.NoError(t, p.Validate())
		})
	}
	must.Eq(t, ModeCheckpoint, node.Preemption, must.Sprint("ForTask must not change the node policy"))
}

func TestPolicyValidateTyped(t *testing.T) {
	p := DefaultPolicy()
	p.SuspendAfter = -time.Minute
	p.Owner.AwayAfter = 10 * time.Second
	err := p.Validate()
	must.ErrorContains(t, err, `suspend_after must be zero or more, got "-1m"`)
	must.ErrorContains(t, err, `away_after must be at least input_active_within (1m), got "10s"`)
}
