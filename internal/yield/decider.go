package yield

import (
	"fmt"
	"slices"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
)

// Layer is how far a VM has yielded to its owner. Each layer keeps those before it: a paused
// VM is still capped and ballooned, and runs at idle CPU priority when it resumes.
type Layer uint8

const (
	// LayerIdleClass is the base layer, always on: the VM's threads run SCHED_IDLE, so the
	// owner's threads always run first, but the VM is otherwise unrestrained.
	LayerIdleClass Layer = iota
	// LayerCPUCap means the VM's CPU is capped below 100% of its vCPUs.
	LayerCPUCap
	// LayerMemory means the balloon has taken memory back from the guest.
	LayerMemory
	// LayerPause means the VM is paused (QMP stop).
	LayerPause
	// LayerCheckpoint means the VM is checkpointed to disk and stopped; it resumes from
	// the checkpoint.
	LayerCheckpoint
	// LayerRestart means the VM is stopped for good and its task must exit so Nomad
	// restarts it. It is final: the Decider never leaves it.
	LayerRestart
)

// String returns the layer's name as shown in task events and stats: "idle-class",
// "cpu-cap", "memory", "pause", "checkpoint" or "restart".
func (l Layer) String() string {
	switch l {
	case LayerIdleClass:
		return "idle-class"
	case LayerCPUCap:
		return "cpu-cap"
	case LayerMemory:
		return "memory"
	case LayerPause:
		return "pause"
	case LayerCheckpoint:
		return "checkpoint"
	case LayerRestart:
		return "restart"
	}
	return fmt.Sprintf("layer(%d)", uint8(l))
}

// VMInfo describes the VM a Decider decides for, as it is when the Decider starts.
type VMInfo struct {
	// MemoryMiB is the guest RAM the VM booted with: the most the balloon lets it have. Zero
	// turns the memory layer off.
	MemoryMiB int
	// Layer, CPUCapPercent and BalloonMiB are what the VM is at now: zero values for a new
	// VM; for a VM found again after a driver restart, what the driver finds (paused or not,
	// its cpu.max, its balloon target), so decisions carry on from there.
	Layer         Layer
	CPUCapPercent int
	BalloonMiB    int
}

// Guest is what the driver last learnt of the guest's memory.
type Guest struct {
	// BalloonMiB is the guest's memory now, as the balloon reports it (QMP query-balloon
	// "actual"). Zero means no balloon: the memory layer can free nothing, and any memory
	// the owner needs is a shortfall.
	BalloonMiB int
	// UsedMiB is what the guest needs: its total memory less what it reports available
	// (virtio-balloon statistics). Zero means not known; the floor is then memory_floor
	// alone.
	UsedMiB int
}

// Decision is the target the driver must apply to the VM.
type Decision struct {
	// Time is the time of the sample the decision was made on.
	Time time.Time
	// Layer is the deepest layer in force.
	Layer Layer
	// CPUCapPercent is the VM's CPU quota as a percentage of its vCPUs; 100 means uncapped.
	// It and BalloonMiB hold still while the VM is paused or checkpointed, and move again
	// from there once it resumes.
	CPUCapPercent int
	// BalloonMiB is the balloon target: the memory the guest may have. Zero when the memory
	// layer is off.
	BalloonMiB int
	// Owner is the owner's state as judged on this sample.
	Owner owner.Status
	// Changed is true when Layer, CPUCapPercent or BalloonMiB differ from the previous
	// decision: the driver acts, and records Reason as a task event, only then.
	Changed bool
	// Reason says in words why the target is what it is, fit for a Nomad task event, such as
	// "owner active: CPU capped at 25%" or "checkpoint: paused for 10m0s". Its wording is
	// stable; numbers in it are config values or amounts of memory.
	Reason string
}

// phase is where the VM stands beyond the CPU and memory layers.
type phase uint8

const (
	running phase = iota
	paused
	checkpointed
	restarted
)

// why is what moved the target on one sample, kept until the reason is formatted; higher
// values outrank lower ones when one sample moves several things.
type why uint8

const (
	whyNone why = iota
	whyCapDown
	whyCapUp
	whyMemoryShrink
	whyMemoryGrow
	whyMemoryAhead
	whyMemoryFloor
	whyResume
	whyPauseActive
	whyPauseMemory
	whyFinalPaused
	whyFinalMemory
)

// Decider turns a stream of owner samples into decisions for one VM. It is deterministic:
// time comes only from the samples, so the same samples give the same decisions, live or
// replayed. Observe allocates nothing unless the target changes. A Decider is not safe for
// concurrent use.
type Decider struct {
	p      Policy
	vm     VMInfo
	levels []int // cap percentages, 100 first, then each step's
	cls    *owner.Classifier

	started    bool
	now        time.Time
	phase      phase
	capPercent int
	capLoad    owner.Average // the owner load over CapWindow: whether the owner is at work
	capSample  float64       // the latest CPU sample: how hard, once they are
	balloon    int

	activeFrom  time.Time // since when the owner has been active; zero if not active
	quietFrom   time.Time // since when the owner has not been active; zero if active
	pausedAt    time.Time
	capUpFrom   time.Time // since when the load has allowed a higher cap
	memHighFrom time.Time // since when MemAvailable has been above the high water
	shortFrom   time.Time // since when the owner has been short of memory the VM cannot free
	short       int       // MiB short, on the last sample
	ahead       string    // why the guest is held at its floor ahead of the owner; "" if not

	why  why
	last Decision
}

// NewDecider returns a Decider for vm under p, which should have passed Validate.
func NewDecider(p Policy, vm VMInfo) *Decider {
	p.CPUCapSteps = slices.Clone(p.CPUCapSteps) // the caller's slice stays theirs
	d := &Decider{
		p:          p,
		vm:         vm,
		levels:     []int{100},
		cls:        owner.NewClassifier(p.Owner),
		capPercent: vm.CPUCapPercent,
		capLoad:    owner.Average{Window: p.CapWindow},
		balloon:    vm.BalloonMiB,
	}
	for _, s := range p.CPUCapSteps {
		d.levels = append(d.levels, s.Percent)
	}
	if d.capPercent <= 0 || d.capPercent > 100 {
		d.capPercent = 100
	}
	if vm.MemoryMiB <= 0 {
		d.balloon = 0
	} else if d.balloon <= 0 || d.balloon > vm.MemoryMiB {
		d.balloon = vm.MemoryMiB
	}
	switch vm.Layer {
	case LayerPause:
		d.phase = paused
	case LayerCheckpoint:
		d.phase = checkpointed
	case LayerRestart:
		d.phase = restarted
	}
	d.last = Decision{Layer: d.layer(), CPUCapPercent: d.capPercent, BalloonMiB: d.balloon}
	if vm.Layer == LayerIdleClass {
		d.last.Reason = "harvesting: CPU at idle priority"
	} else {
		d.last.Reason = "recovered: " + d.last.Layer.String()
	}
	return d
}

// Decision returns the last decision, or the VM's starting point before any sample.
func (d *Decider) Decision() Decision { return d.last }

// SetAhead holds the guest at its memory floor ahead of the owner's return, or lets it go
// (why ""), from the next sample on. The harvest policy asks for this on the forecast
// (package harvest, action Shrink): the balloon takes seconds to hand memory back, so it
// is handed back before the owner sits down. why ends the event's reason ("owner likely
// back within 10m (p 0.03)"). Let go, the guest grows back as when the owner's memory
// recovers: after memory_recover_after with MemAvailable above memory_high_water.
func (d *Decider) SetAhead(why string) { d.ahead = why }

// Observe folds in one owner sample and what the driver last learnt of the guest's memory,
// and returns the target. Samples should come in time order; one from before the previous
// sample counts as simultaneous with it.
func (d *Decider) Observe(s owner.Sample, g Guest) Decision {
	t := s.Time
	if d.started && t.Before(d.now) {
		t = d.now
	}
	if !d.started && d.phase == paused {
		d.pausedAt = t // found paused after a restart: count from now
	}
	s.Time, d.now, d.started = t, t, true
	st := d.cls.Observe(s)
	if d.phase == restarted {
		d.last.Time, d.last.Owner, d.last.Changed = t, st, false
		return d.last
	}
	active := st.State == owner.StateActive
	if active {
		if d.activeFrom.IsZero() {
			d.activeFrom = st.Since
		}
		d.quietFrom = time.Time{}
	} else {
		if d.quietFrom.IsZero() {
			d.quietFrom = st.Since
		}
		d.activeFrom = time.Time{}
	}

	if s.Has&owner.HasCPU != 0 {
		d.capLoad.Observe(t, s.CPU)
		d.capSample = s.CPU
	}
	d.why = whyNone
	if d.phase == running {
		d.stepCap(t, d.capLoad.Value, d.capSample)
	}
	resumeShort := d.stepMemory(t, s, g)
	d.stepPhase(t, active, resumeShort, s)

	dec := Decision{
		Time:          t,
		Layer:         d.layer(),
		CPUCapPercent: d.capPercent,
		BalloonMiB:    d.balloon,
		Owner:         st,
		Reason:        d.last.Reason,
	}
	if dec.Layer != d.last.Layer || dec.CPUCapPercent != d.last.CPUCapPercent || dec.BalloonMiB != d.last.BalloonMiB {
		dec.Changed = true
		dec.Reason = d.reason(st.State)
	}
	d.last = dec
	return dec
}

// stepCap moves the CPU cap, owner first: tighten on fast evidence, relax slowly. avg, the
// load over CapWindow, says whether the owner is at work: a tick of a background process
// moves it too little to pass the first band. Once it has, the load is the higher of avg and
// latest, the last CPU sample, because avg lags an owner who has just started by a few
// samples while latest already shows their whole load. The cap goes down at once to that
// load's band, and up one step at a time once that load has allowed more for
// CapRecoverAfter: while the owner is at work the average and the latest sample must both
// allow it, so samples that straddle a band's edge hold the cap rather than flap it. A
// sample without CPU figures leaves avg and latest as they were.
func (d *Decider) stepCap(t time.Time, avg, latest float64) {
	load := avg
	if len(d.p.CPUCapSteps) > 0 && avg > d.p.CPUCapSteps[0].LoadAbove {
		load = max(avg, latest)
	}
	band := 100
	for _, s := range d.p.CPUCapSteps {
		if load > s.LoadAbove {
			band = s.Percent
		}
	}
	switch {
	case band < d.capPercent:
		d.capPercent, d.capUpFrom = band, time.Time{}
		d.note(whyCapDown)
	case band > d.capPercent:
		if d.capUpFrom.IsZero() {
			d.capUpFrom = t
		}
		if t.Sub(d.capUpFrom) >= d.p.CapRecoverAfter {
			next := band
			for _, l := range d.levels {
				if l > d.capPercent && l < next {
					next = l
				}
			}
			d.capPercent, d.capUpFrom = next, t
			d.note(whyCapUp)
		}
	default:
		d.capUpFrom = time.Time{}
	}
}

// stepMemory moves the balloon target while the VM runs and works out how short of memory
// the owner is beyond what the VM can give back. It returns the shortfall there would be if
// the VM ran, which a paused VM must not have to resume.
func (d *Decider) stepMemory(t time.Time, s owner.Sample, g Guest) (resumeShort int) {
	if d.vm.MemoryMiB <= 0 || s.Has&owner.HasMemory == 0 || d.phase == checkpointed || d.phase == restarted {
		d.short, d.shortFrom = 0, time.Time{}
		return 0
	}
	floor := min(d.vm.MemoryMiB, g.UsedMiB+d.p.MemoryFloorMiB)
	deficit := max(0, d.p.MemoryLowWaterMiB-s.MemAvailableMiB)
	reclaimable := 0
	if g.BalloonMiB > 0 {
		reclaimable = max(0, g.BalloonMiB-floor)
	}
	resumeShort = max(0, deficit-reclaimable)

	if d.phase == running {
		if d.ahead != "" && g.BalloonMiB > 0 && floor < d.balloon {
			d.balloon = floor
			d.note(whyMemoryAhead)
		}
		switch {
		case deficit > 0:
			d.memHighFrom = time.Time{}
			if g.BalloonMiB > 0 {
				if want := max(floor, g.BalloonMiB-deficit); want < d.balloon {
					d.balloon = want
					d.note(whyMemoryShrink)
				}
			}
		case d.ahead != "":
			d.memHighFrom = time.Time{}
		case s.MemAvailableMiB > d.p.MemoryHighWaterMiB && d.balloon < d.vm.MemoryMiB:
			if d.memHighFrom.IsZero() {
				d.memHighFrom = t
			}
			if t.Sub(d.memHighFrom) >= d.p.MemoryRecoverAfter {
				d.balloon = min(d.vm.MemoryMiB, d.balloon+s.MemAvailableMiB-d.p.MemoryHighWaterMiB)
				d.memHighFrom = t
				d.note(whyMemoryGrow)
			}
		default:
			d.memHighFrom = time.Time{}
		}
		if d.balloon < floor {
			d.balloon = floor
			d.note(whyMemoryFloor)
		}
	}

	d.short = resumeShort
	if d.phase == paused {
		d.short = deficit // a paused guest cannot work its balloon
	}
	if d.short == 0 {
		d.shortFrom = time.Time{}
	} else if d.shortFrom.IsZero() {
		d.shortFrom = t
	}
	return resumeShort
}

// stepPhase pauses, checkpoints, restarts and resumes.
func (d *Decider) stepPhase(t time.Time, active bool, resumeShort int, s owner.Sample) {
	quietLongEnough := !active && t.Sub(d.quietFrom) >= d.p.ResumeAfter
	shortLongEnough := d.short > 0 && t.Sub(d.shortFrom) >= d.p.MemoryShortfallAfter
	switch d.phase {
	case running:
		switch {
		case shortLongEnough:
			d.final(t, whyFinalMemory)
		case active && t.Sub(d.activeFrom) >= d.p.SuspendAfter:
			d.phase, d.pausedAt = paused, t
			d.note(whyPauseActive)
		}
	case paused:
		switch {
		case quietLongEnough && resumeShort == 0:
			d.resume()
		case shortLongEnough && d.p.Preemption != ModeSuspend:
			d.final(t, whyFinalMemory)
		case t.Sub(d.pausedAt) >= d.p.CheckpointAfter && d.p.Preemption != ModeSuspend:
			d.final(t, whyFinalPaused)
		}
	case checkpointed:
		room := d.vm.MemoryMiB <= 0 || s.Has&owner.HasMemory == 0 ||
			s.MemAvailableMiB-d.balloon >= d.p.MemoryHighWaterMiB
		if quietLongEnough && room {
			d.resume()
		}
	}
}

// resume runs the VM again. The cap and balloon stay where they were when it stopped and
// move again from here, so a resumed VM starts gently.
func (d *Decider) resume() {
	d.phase = running
	d.capUpFrom, d.memHighFrom = time.Time{}, time.Time{}
	d.note(whyResume)
}

// final takes the last layer of the task's preemption mode. Suspend has no layer past
// pausing, so a suspend-mode VM short of memory is paused: a paused guest touches none of
// its memory, so the host can swap it out.
func (d *Decider) final(t time.Time, w why) {
	switch d.p.Preemption {
	case ModeCheckpoint:
		d.phase = checkpointed
	case ModeRestart:
		d.phase = restarted
	default:
		if d.phase != paused {
			d.phase, d.pausedAt = paused, t
			d.note(whyPauseMemory)
		}
		return
	}
	d.note(w)
}

func (d *Decider) note(w why) { d.why = max(d.why, w) }

func (d *Decider) layer() Layer {
	switch {
	case d.phase == restarted:
		return LayerRestart
	case d.phase == checkpointed:
		return LayerCheckpoint
	case d.phase == paused:
		return LayerPause
	case d.balloon < d.vm.MemoryMiB:
		return LayerMemory
	case d.capPercent < 100:
		return LayerCPUCap
	}
	return LayerIdleClass
}

// reason words the change made on this sample. It runs only when the target changed.
func (d *Decider) reason(st owner.State) string {
	final := "checkpoint"
	if d.p.Preemption == ModeRestart {
		final = "restart"
	}
	switch d.why {
	case whyFinalMemory:
		return fmt.Sprintf("%s: owner short of %d MiB the guest cannot give back", final, d.short)
	case whyFinalPaused:
		return fmt.Sprintf("%s: paused for %s", final, d.p.CheckpointAfter)
	case whyPauseActive:
		return fmt.Sprintf("paused: owner active for %s", d.p.SuspendAfter)
	case whyPauseMemory:
		return fmt.Sprintf("paused: owner short of %d MiB the guest cannot give back", d.short)
	case whyResume:
		return fmt.Sprintf("resumed: owner idle for %s", d.p.ResumeAfter)
	case whyMemoryFloor:
		return fmt.Sprintf("guest needs memory: grown to %d MiB", d.balloon)
	case whyMemoryGrow:
		return fmt.Sprintf("owner has memory to spare: guest grown to %d MiB", d.balloon)
	case whyMemoryShrink:
		return fmt.Sprintf("owner short of memory: guest shrunk to %d MiB", d.balloon)
	case whyMemoryAhead:
		return fmt.Sprintf("%s: guest shrunk to its floor, %d MiB", d.ahead, d.balloon)
	case whyCapUp:
		if d.capPercent == 100 {
			return fmt.Sprintf("owner %s: CPU uncapped", st)
		}
		return fmt.Sprintf("owner %s: CPU cap raised to %d%%", st, d.capPercent)
	case whyCapDown:
		return fmt.Sprintf("owner %s: CPU capped at %d%%", st, d.capPercent)
	}
	return fmt.Sprintf("%s: as before", d.layer())
}
