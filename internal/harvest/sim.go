package harvest

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/deskcloud/deskcloud/predictor"
)

// Event is one state change of a desktop.
type Event struct {
	Time  time.Time
	State predictor.State
}

// Options tune a simulation. The zero value means the defaults.
type Options struct {
	// From and To bound the simulated period, [From, To); zero is open. Events before From
	// only warm up the desktops' models.
	From, To time.Time
	// Tick is the cadence of decisions between events (default a minute).
	Tick time.Duration
	// ForecastEvery is how often a policy that needs a forecast gets a fresh one, and so
	// decides, while nothing happens on a vacant or running desktop (default
	// predictor.SampleEvery, the models' own cadence). Events are decided on at once.
	ForecastEvery time.Duration
	// CheckpointEvery is how often a running VM checkpoints, for the work lost with
	// checkpointing (default 30 minutes).
	CheckpointEvery time.Duration
	// DrainTime is how long a drain holds the desktop while the checkpoint is written
	// (default a minute).
	DrainTime time.Duration
	// ShrinkTime is how long a VM takes to reach its floor once asked to shrink: an owner
	// who arrives sooner finds it still above its floor, a collision (default a minute; the
	// balloon hands back a GiB in about 9 s under emulation, docs/performance.md, and a
	// desktop's VM may have several to hand back).
	ShrinkTime time.Duration
	// FloorLoss is the fraction of a full-size VM's work that a VM at its floor does not
	// do, from 0 to 1; a floor hour is credited 1-FloorLoss hours of work (default 0: the
	// idle class gives the VM the whole CPU while the owner is away, so a job whose memory
	// fits the floor runs at full speed; one that needs the memory handed back is slower).
	FloorLoss float64
	// JobLength is the length of the jobs a VM runs back to back, for the work lost
	// without checkpointing: a stop loses the job in progress (default an hour).
	JobLength time.Duration
	// Pool is the prior of the desktops' models, for policies that need a forecast;
	// nil means an untrained predictor.NewPool.
	Pool *predictor.Pool
	// Frozen stops the desktops' models from learning; by default they learn from their
	// own desktop as they go, as they would on their nodes.
	Frozen bool
	// Context, when set, tells each desktop's model the fleet context at every sampling
	// tick, as the forecast evaluation's default mode does; it must be made from the same
	// desktops, in the same order, and Pool must have been built with a fleet context. Nil
	// gives the models their own desktop's history only, as the driver's do.
	Context *FleetContext
	// Density, when set, tells every decision the fleet's arrival density over the year
	// before its day, for a Forecast policy with an ArrivalDensity to scale its thresholds by.
	Density *FleetDensity
	// Workers bounds the goroutines simulating desktops (default GOMAXPROCS). Reports do
	// not depend on it.
	Workers int
}

func (o Options) withDefaults() Options {
	if o.Tick <= 0 {
		o.Tick = time.Minute
	}
	if o.ForecastEvery <= 0 {
		o.ForecastEvery = predictor.SampleEvery
	}
	if o.CheckpointEvery <= 0 {
		o.CheckpointEvery = 30 * time.Minute
	}
	if o.DrainTime <= 0 {
		o.DrainTime = time.Minute
	}
	if o.ShrinkTime <= 0 {
		o.ShrinkTime = time.Minute
	}
	if o.JobLength <= 0 {
		o.JobLength = time.Hour
	}
	if o.Pool == nil {
		o.Pool = predictor.NewPool()
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	return o
}

// Report sums what a policy did over a set of desktops.
type Report struct {
	Policy   string `json:"policy"`
	Desktops int    `json:"desktops"`
	// DesktopHours is the simulated time summed over desktops; AwayHours the part with the
	// owner away, HarvestableHours the part with the desktop also up.
	DesktopHours     float64 `json:"desktop_hours"`
	AwayHours        float64 `json:"away_hours"`
	HarvestableHours float64 `json:"harvestable_hours"`
	// MachineHours is the time VMs ran, FullHours at full size plus FloorHours at their
	// floor (from the moment they were asked to shrink, or started there). HarvestedHours
	// is the work done, in hours of a VM at full size: FullHours plus FloorWork
	// (1-Options.FloorLoss) times FloorHours. For a policy without a floor layer the three
	// harvest figures are equal.
	MachineHours   float64 `json:"machine_hours"`
	FullHours      float64 `json:"full_hours"`
	FloorHours     float64 `json:"floor_hours"`
	FloorWork      float64 `json:"floor_work"`
	HarvestedHours float64 `json:"harvested_hours"`
	// Arrivals counts owners coming back (an in-use period starting), each once and in one
	// class: Collisions found a VM holding the desktop above its floor (running at full
	// size, still shrinking, suspended while not at its floor, or draining: a drain writes
	// the checkpoint, with the disk and memory that takes); ArrivalsAtFloor found a VM at
	// its floor, running or suspended; ArrivalsVacant found no VM.
	Arrivals        int64 `json:"arrivals"`
	Collisions      int64 `json:"collisions"`
	ArrivalsAtFloor int64 `json:"arrivals_at_floor"`
	ArrivalsVacant  int64 `json:"arrivals_vacant"`
	Starts          int64 `json:"starts"`
	// FloorStarts counts the Starts that placed a VM at its floor.
	FloorStarts int64 `json:"floor_starts"`
	Suspends    int64 `json:"suspends"`
	Drains      int64 `json:"drains"`
	// Shrinks counts VMs taken to their floor, Grows VMs given their memory back.
	Shrinks int64 `json:"shrinks"`
	Grows   int64 `json:"grows"`
	// Preemptions counts VMs evicted by the policy; PowerOffs VMs lost because the desktop
	// went off under them.
	Preemptions int64 `json:"preemptions"`
	PowerOffs   int64 `json:"power_offs"`
	// LostHours is the work lost when VMs checkpoint every CheckpointEvery of running and on
	// drain: an eviction or power-off loses what ran since the last checkpoint.
	// LostHoursNoCheckpoint is the work lost when they cannot checkpoint: every stop, drains
	// included, loses the job of JobLength in progress. Both are in hours of work, as
	// HarvestedHours is.
	LostHours             float64 `json:"lost_hours"`
	LostHoursNoCheckpoint float64 `json:"lost_hours_no_checkpoint"`
}

// CollisionRate is Collisions over Arrivals.
func (r Report) CollisionRate() float64 {
	if r.Arrivals == 0 {
		return 0
	}
	return float64(r.Collisions) / float64(r.Arrivals)
}

// AtFloorRate is ArrivalsAtFloor over Arrivals.
func (r Report) AtFloorRate() float64 {
	if r.Arrivals == 0 {
		return 0
	}
	return float64(r.ArrivalsAtFloor) / float64(r.Arrivals)
}

// add sums o into r.
func (r *Report) add(o Report) {
	r.Desktops += o.Desktops
	r.DesktopHours += o.DesktopHours
	r.AwayHours += o.AwayHours
	r.HarvestableHours += o.HarvestableHours
	r.MachineHours += o.MachineHours
	r.FullHours += o.FullHours
	r.FloorHours += o.FloorHours
	r.HarvestedHours += o.HarvestedHours
	r.Arrivals += o.Arrivals
	r.Collisions += o.Collisions
	r.ArrivalsAtFloor += o.ArrivalsAtFloor
	r.ArrivalsVacant += o.ArrivalsVacant
	r.Starts += o.Starts
	r.FloorStarts += o.FloorStarts
	r.Suspends += o.Suspends
	r.Drains += o.Drains
	r.Shrinks += o.Shrinks
	r.Grows += o.Grows
	r.Preemptions += o.Preemptions
	r.PowerOffs += o.PowerOffs
	r.LostHours += o.LostHours
	r.LostHoursNoCheckpoint += o.LostHoursNoCheckpoint
}

// Simulate replays every desktop's events through the policy and sums the reports. Each
// desktop is simulated on its own, in parallel; the sum is taken in the order given, so the
// result does not depend on the scheduling.
func Simulate(ctx context.Context, p Policy, desktops [][]Event, opt Options) (Report, error) {
	if !(opt.FloorLoss >= 0 && opt.FloorLoss <= 1) {
		return Report{}, fmt.Errorf("floor loss must be between 0 and 1, got %v", opt.FloorLoss)
	}
	if opt.Context != nil && len(opt.Context.group) != len(desktops) {
		return Report{}, fmt.Errorf("fleet context made for %d desktops, given %d", len(opt.Context.group), len(desktops))
	}
	opt = opt.withDefaults()
	reports := make([]Report, len(desktops))
	errs := make([]error, opt.Workers)
	var wg sync.WaitGroup
	var next int
	var mu sync.Mutex
	for w := range opt.Workers {
		wg.Go(func() {
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= len(desktops) || ctx.Err() != nil {
					return
				}
				r, err := simulateDesktop(p, i, desktops[i], opt)
				if err != nil {
					errs[w] = fmt.Errorf("desktop %d: %w", i, err)
					return
				}
				reports[i] = r
			}
		})
	}
	wg.Wait()
	if err := errors.Join(append(errs, ctx.Err())...); err != nil {
		return Report{}, err
	}
	total := Report{Policy: p.Name(), FloorWork: 1 - opt.FloorLoss}
	for _, r := range reports {
		total.add(r)
	}
	return total, nil
}

// desktopSim is one desktop's simulation.
type desktopSim struct {
	p     Policy
	opt   Options
	index int // the desktop's index among those simulated, for its fleet context
	model *predictor.Model
	rep   Report

	state         predictor.State // the owner's, from the trace
	seen          bool
	firstSeen     time.Time
	lastActiveEnd time.Time
	hasActive     bool

	phase      Phase
	phaseSince time.Time
	floor      bool          // the VM is at its floor, or on its way there: AtFloor, or suspended at it
	floorFrom  time.Time     // when it reaches its floor
	work       time.Duration // work done since the VM started
	sinceCkpt  time.Duration // running time since its last checkpoint
	ckptWork   time.Duration // work done since its last checkpoint

	clock      time.Time // accounted up to here
	forecast   predictor.Forecast
	forecastAt time.Time // when forecast was made; zero for none
}

func simulateDesktop(p Policy, index int, evs []Event, opt Options) (Report, error) {
	d := &desktopSim{p: p, opt: opt, index: index, rep: Report{Policy: p.Name(), Desktops: 1, FloorWork: 1 - opt.FloorLoss}}
	if p.NeedsForecast() {
		learn := predictor.LearnDesktop
		if opt.Frozen {
			learn = predictor.LearnNone
		}
		d.model = predictor.NewModel(opt.Pool, learn)
	}
	for i, e := range evs {
		if i > 0 && e.Time.Before(evs[i-1].Time) {
			return Report{}, fmt.Errorf("events out of order at %s", e.Time.Format(time.RFC3339))
		}
		if d.seen {
			if err := d.run(e.Time); err != nil {
				return Report{}, err
			}
		}
		if err := d.event(e); err != nil {
			return Report{}, err
		}
	}
	// A desktop's simulation ends at its last event: after it, its trace tells nothing.
	return d.rep, nil
}

func (d *desktopSim) inPeriod(t time.Time) bool {
	return !t.Before(d.opt.From) && (d.opt.To.IsZero() || t.Before(d.opt.To))
}

// run decides at every tick from the clock up to (not including) t.
func (d *desktopSim) run(t time.Time) error {
	for at := d.nextTick(d.clock); at.Before(t); at = d.nextTick(at) {
		d.account(at)
		if err := d.contextTick(at); err != nil {
			return err
		}
		if err := d.tickDecide(at); err != nil {
			return err
		}
	}
	d.account(t)
	return nil
}

// nextTick is the next time after the given one that anything can change: the next Tick,
// or for a policy that decides by forecast on a vacant or running desktop, the next
// multiple of ForecastEvery (or the end of a drain, if sooner); with a fleet context, also
// the models' next sampling tick.
func (d *desktopSim) nextTick(after time.Time) time.Time {
	if d.model == nil {
		return after.Truncate(d.opt.Tick).Add(d.opt.Tick)
	}
	var next time.Time
	if d.phase == Suspended {
		next = after.Truncate(d.opt.Tick).Add(d.opt.Tick)
	} else {
		next = after.Truncate(d.opt.ForecastEvery).Add(d.opt.ForecastEvery)
	}
	if d.phase == Draining {
		if end := d.phaseSince.Add(d.opt.DrainTime); end.After(after) && end.Before(next) {
			next = end
		}
	}
	if d.opt.Context != nil {
		if s := after.Truncate(predictor.SampleEvery).Add(predictor.SampleEvery); s.Before(next) {
			next = s
		}
	}
	return next
}

// contextTick tells the model the fleet context of time at, and when at is one of its
// sampling ticks and the desktop is harvestable, takes the model there, so that it takes
// its learning sample with the context of that tick, as in the forecast evaluation.
func (d *desktopSim) contextTick(at time.Time) error {
	if d.opt.Context == nil || d.model == nil {
		return nil
	}
	d.model.SetContext(d.opt.Context.at(d.index, at))
	if !d.state.Harvestable() || !at.Truncate(predictor.SampleEvery).Equal(at) {
		return nil
	}
	return d.model.Advance(at)
}

// account moves the clock to t, counting what happened in between.
func (d *desktopSim) account(t time.Time) {
	if !t.After(d.clock) {
		return
	}
	from := d.clock
	if from.Before(d.opt.From) {
		from = d.opt.From
	}
	to := t
	if !d.opt.To.IsZero() && to.After(d.opt.To) {
		to = d.opt.To
	}
	if to.After(from) {
		dt := to.Sub(from)
		h := dt.Hours()
		d.rep.DesktopHours += h
		if d.state.OwnerAway() {
			d.rep.AwayHours += h
		}
		if d.state.Harvestable() {
			d.rep.HarvestableHours += h
		}
		if d.phase == Running || d.phase == AtFloor {
			rate := 1.0
			if d.phase == AtFloor {
				rate = d.rep.FloorWork
				d.rep.FloorHours += h
			} else {
				d.rep.FullHours += h
			}
			d.rep.MachineHours += h
			d.rep.HarvestedHours += rate * h
			w := workIn(dt, rate)
			d.work += w
			if d.sinceCkpt += dt; d.sinceCkpt >= d.opt.CheckpointEvery {
				d.sinceCkpt %= d.opt.CheckpointEvery
				d.ckptWork = workIn(d.sinceCkpt, rate)
			} else {
				d.ckptWork += w
			}
		}
	}
	d.clock = t
	if d.phase == Draining && !t.Before(d.phaseSince.Add(d.opt.DrainTime)) {
		// The checkpoint is written: nothing is lost, unless VMs cannot checkpoint.
		d.stop(0)
	}
}

// workIn is the work done in dt at the given rate.
func workIn(dt time.Duration, rate float64) time.Duration {
	if rate == 1 {
		return dt
	}
	return time.Duration(float64(dt) * rate)
}

// atFloor reports whether the VM is at its floor at t, rather than above it.
func (d *desktopSim) atFloor(t time.Time) bool {
	return d.floor && !t.Before(d.floorFrom)
}

// event applies one state change of the desktop, then lets the policy react.
func (d *desktopSim) event(e Event) error {
	if d.model != nil {
		if err := d.model.Observe(e.Time, e.State); err != nil {
			return err
		}
		d.forecastAt = time.Time{}
	}
	prev := d.state
	if !d.seen {
		d.seen, d.state, d.clock, d.firstSeen = true, e.State, e.Time, e.Time
		return d.contextTick(e.Time)
	}
	d.state = e.State
	if err := d.contextTick(e.Time); err != nil {
		return err
	}
	in := d.inPeriod(e.Time)
	switch {
	case e.State == predictor.InUse && prev.OwnerAway():
		if in {
			d.rep.Arrivals++
			switch {
			case !d.phase.Holds():
				d.rep.ArrivalsVacant++
			case d.atFloor(e.Time):
				d.rep.ArrivalsAtFloor++
			default:
				d.rep.Collisions++
			}
		}
	case prev == predictor.InUse && e.State != predictor.InUse:
		d.lastActiveEnd, d.hasActive = e.Time, true
	}
	if e.State == predictor.Offline && d.phase.Holds() {
		// The desktop went off under the VM.
		if in {
			d.rep.PowerOffs++
		}
		d.stop(d.ckptWork)
	}
	return d.decide(e.Time)
}

// decide asks the policy at time at and carries out its answer.
func (d *desktopSim) decide(at time.Time) error {
	return d.decideAt(at, true)
}

// tickDecide is decide at a tick rather than an event: a policy that needs a forecast is
// asked only on multiples of ForecastEvery on the clock, when its desktop's model has just
// taken its own sample (so the forecast comes cheap), unless the VM is suspended.
func (d *desktopSim) tickDecide(at time.Time) error {
	return d.decideAt(at, d.model == nil || d.phase == Suspended || at.Truncate(d.opt.ForecastEvery).Equal(at))
}

func (d *desktopSim) decideAt(at time.Time, due bool) error {
	if !due || !d.inPeriod(at) || d.phase == Draining {
		return nil
	}
	s := Situation{
		Now: at, Phase: d.phase, PhaseSince: d.phaseSince,
		Harvestable: d.state.Harvestable(), OwnerPresent: d.state == predictor.InUse,
	}
	if d.state.OwnerAway() {
		if d.hasActive {
			s.OwnerIdle = at.Sub(d.lastActiveEnd)
		} else {
			s.OwnerIdle = at.Sub(d.firstSeen) // never seen active: idle since first seen
		}
	}
	if d.model != nil && s.Harvestable && (d.phase == Vacant || d.phase == Running || d.phase == AtFloor) {
		if err := d.refreshForecast(at); err != nil {
			return err
		}
		s.Forecast = d.forecast
		if d.opt.Density != nil {
			s.ArrivalDensity = d.opt.Density.At(at)
		}
	}
	switch a := d.p.Decide(s); a {
	case Start:
		if d.phase == Vacant && s.Harvestable {
			d.setPhase(Running, at)
			d.rep.Starts++
		}
	case StartAtFloor:
		if d.phase == Vacant && s.Harvestable {
			d.setPhase(AtFloor, at)
			d.rep.Starts++
			d.rep.FloorStarts++
		}
	case Suspend:
		if d.phase == Running || d.phase == AtFloor {
			d.setPhase(Suspended, at)
			d.rep.Suspends++
		}
	case Resume:
		if d.phase == Suspended && s.Harvestable {
			if d.floor {
				d.setPhase(AtFloor, at)
			} else {
				d.setPhase(Running, at)
			}
		}
	case Drain:
		if d.phase == Running || d.phase == AtFloor {
			d.setPhase(Draining, at)
			d.rep.Drains++
		}
	case Evict:
		if d.phase.Holds() {
			d.rep.Preemptions++
			d.stop(d.ckptWork)
		}
	case Shrink:
		if d.phase == Running {
			d.setPhase(AtFloor, at)
			d.rep.Shrinks++
		}
	case Grow:
		if d.phase == AtFloor {
			d.setPhase(Running, at)
			d.rep.Grows++
		}
	case Hold:
	default:
		return fmt.Errorf("policy %s asked for unknown action %d", d.p.Name(), a)
	}
	return nil
}

// refreshForecast renews the forecast unless it was made at this very time.
func (d *desktopSim) refreshForecast(at time.Time) error {
	if d.forecastAt.Equal(at) {
		return nil
	}
	f, err := d.model.ForecastProbabilities(at)
	if err != nil {
		return err
	}
	d.forecast, d.forecastAt = f, at
	return nil
}

// setPhase moves the VM to phase p. A VM reaches its floor ShrinkTime after it is first
// taken there, and stays there while suspended there. A VM started at its floor is taken
// to reach it ShrinkTime after it starts too, the cautious side: one resumed from its
// checkpoint gets its memory image back in full before its balloon can inflate. A paused
// guest cannot inflate its balloon, so a VM suspended before it reached its floor stays
// above it, and resumes at full size. A drain holds the desktop above the floor.
func (d *desktopSim) setPhase(p Phase, at time.Time) {
	if d.phase == Vacant {
		d.work, d.sinceCkpt, d.ckptWork = 0, 0, 0
	}
	switch p {
	case AtFloor:
		if !d.floor {
			d.floor, d.floorFrom = true, at.Add(d.opt.ShrinkTime)
		}
	case Suspended:
		d.floor = d.atFloor(at)
	case Running, Draining:
		d.floor = false
	}
	d.phase, d.phaseSince = p, at
}

// stop ends the VM, losing lost of its work if it checkpoints, and the job in progress if
// it cannot.
func (d *desktopSim) stop(lost time.Duration) {
	if d.inPeriod(d.clock) {
		d.rep.LostHours += lost.Hours()
		d.rep.LostHoursNoCheckpoint += (d.work % d.opt.JobLength).Hours()
	}
	d.phase, d.phaseSince, d.floor = Vacant, d.clock, false
	d.work, d.sinceCkpt, d.ckptWork = 0, 0, 0
}
