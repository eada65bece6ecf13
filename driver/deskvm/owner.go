package deskvm

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
	"github.com/deskcloud/deskcloud/predictor"
	"github.com/hashicorp/go-hclog"
	"github.com/rs/zerolog"
)

// idleMinuteBuckets are the values driver.deskvm.owner.idle_minutes takes: the owner's input
// idle time rounded down to one of them, so that the node's attributes, and with them
// Nomad's node updates, change a few times an hour at most.
var idleMinuteBuckets = []int{0, 1, 5, 15, 30, 60, 120, 240}

// harvestMemoryStep rounds driver.deskvm.harvestable.memory down, for the same reason.
const harvestMemoryStep = 256

// ownerSensor senses the desktop's owner for the whole node: one Sampler over the configured
// sources, one node-wide owner state for the fingerprint and the forecast, and the latest
// sample handed to every running task's yield loop.
type ownerSensor struct {
	logger hclog.Logger
	proc   *owner.ProcSource // nil when the proc source is off
	cores  int

	mu       sync.Mutex
	cls      *owner.Classifier // guarded by mu
	latest   owner.Sample      // guarded by mu
	status   owner.Status      // guarded by mu
	lowWater int               // memory_low_water, MiB, guarded by mu
	live     *predictor.Live   // nil when the forecast could not start, guarded by mu
	subs     map[chan owner.Sample]struct{}
	// changed is signalled (without blocking) when the owner's state changes.
	changed chan struct{}
}

// newOwnerSensor builds the sensor for the plugin config; it senses nothing until run.
func newOwnerSensor(logger hclog.Logger, c *Config, policy ownerPolicy) *ownerSensor {
	s := &ownerSensor{
		logger:   logger.Named("owner"),
		cores:    runtime.NumCPU(),
		cls:      owner.NewClassifier(policy.thresholds),
		lowWater: policy.lowWaterMiB,
		subs:     map[chan owner.Sample]struct{}{},
		changed:  make(chan struct{}, 1),
	}
	live, err := predictor.NewLive(predictor.LiveConfig{
		StateFile: c.Owner.ForecastState,
		PoolFile:  c.Owner.ForecastPool,
		Logger:    zerolog.New(hclogWriter{s.logger}),
	})
	switch {
	case err != nil:
		s.logger.Warn("forecast off: its model cannot start", "error", err)
	case live.Warning() != nil:
		s.logger.Warn("forecast model starts afresh", "error", live.Warning())
		s.live = live
	default:
		s.live = live
	}
	return s
}

// ownerPolicy is what the sensor needs of the yield policy.
type ownerPolicy struct {
	thresholds  owner.Thresholds
	lowWaterMiB int
}

// sources builds the configured sources.
func (s *ownerSensor) sources(c *Config) []owner.Source {
	var srcs []owner.Source
	for _, name := range c.Owner.Sources {
		switch name {
		case sourceProc:
			// The node's busy time from the root cgroup's nanosecond counter where there is
			// one, so that the VMs, excluded by their cgroups, are taken out exactly.
			s.proc = owner.NewProcSource(owner.ProcConfig{CPUInterval: c.Owner.cpuInterval(), TotalCgroup: owner.RootCgroup(cgroupRoot)})
			srcs = append(srcs, s.proc)
		case sourceInput:
			srcs = append(srcs, owner.NewInputSource(owner.InputConfig{}))
		case sourceLogind:
			srcs = append(srcs, owner.NewLogindSource(owner.LogindConfig{}))
		}
	}
	if c.Owner.ReplayFile != "" {
		srcs = append(srcs, &replayFile{path: c.Owner.ReplayFile, speed: c.Owner.ReplaySpeed})
	}
	return srcs
}

// run senses until ctx ends.
func (s *ownerSensor) run(ctx context.Context, c *Config) {
	srcs := s.sources(c)
	if len(srcs) == 0 {
		s.logger.Info("owner sensing off: no sources configured")
		return
	}
	sampler := owner.NewSampler(zerolog.New(hclogWriter{s.logger}), srcs...)
	_ = sampler.Run(ctx, s.observe)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.live != nil {
		if err := s.live.Close(); err != nil {
			s.logger.Warn("save forecast model", "error", err)
		}
	}
}

// observe takes one merged sample; it runs under the Sampler's lock and must be quick.
func (s *ownerSensor) observe(smp owner.Sample) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latest = smp
	prev := s.status.State
	s.status = s.cls.Observe(smp)
	if s.status.State != prev {
		select {
		case s.changed <- struct{}{}:
		default:
		}
	}
	if s.live != nil {
		s.live.Observe(smp.Time, s.status.State)
	}
	for ch := range s.subs {
		// Latest wins: a yield loop that is busy applying a decision reads the newest
		// sample next, never a queue of stale ones.
		select {
		case <-ch:
		default:
		}
		ch <- smp
	}
}

// subscribe returns a channel that always holds the newest sample not yet read, and the
// function that ends the subscription.
func (s *ownerSensor) subscribe() (<-chan owner.Sample, func()) {
	ch := make(chan owner.Sample, 1)
	s.mu.Lock()
	s.subs[ch] = struct{}{}
	s.mu.Unlock()
	return ch, func() {
		s.mu.Lock()
		delete(s.subs, ch)
		s.mu.Unlock()
	}
}

// exclude tells the proc source which processes are VMs, not the owner.
func (s *ownerSensor) exclude(pids []int, cgroups []string) {
	if s.proc != nil {
		s.proc.Exclude(pids, cgroups)
	}
}

// attributes are the node attributes that describe the owner, without the
// "driver.deskvm." prefix, coarse so that they change rarely; none before the first sample.
func (s *ownerSensor) attributes(now time.Time) map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.latest.Time.IsZero() {
		return nil
	}
	smp, st := s.latest, s.status
	attrs := map[string]string{"owner.state": st.State.String()}
	if smp.Has&owner.HasInput != 0 {
		idle := smp.InputIdle + max(now.Sub(smp.Time), 0)
		attrs["owner.idle_minutes"] = strconv.Itoa(bucket(int(idle/time.Minute), idleMinuteBuckets))
	}
	cpu := 0
	if st.State != owner.StateActive {
		cpu = int(math.Floor(float64(s.cores) * (1 - st.Load)))
	}
	attrs["harvestable.cpu"] = strconv.Itoa(max(cpu, 0))
	if smp.Has&owner.HasMemory != 0 {
		mem := max(smp.MemAvailableMiB-s.lowWater, 0) / harvestMemoryStep * harvestMemoryStep
		attrs["harvestable.memory"] = strconv.Itoa(mem)
	}
	if s.live != nil {
		for k, v := range s.live.Attributes(now) {
			attrs[k] = v
		}
	}
	return attrs
}

// bucket rounds v down to the largest of buckets (ascending) not above it.
func bucket(v int, buckets []int) int {
	b := buckets[0]
	for _, x := range buckets {
		if v >= x {
			b = x
		}
	}
	return b
}

// replayFile is a Replay of a trace file, opened when it runs: a named pipe then waits for
// its writer without holding up the plugin.
type replayFile struct {
	path  string
	speed float64
}

func (r *replayFile) Name() string { return "replay" }

func (r *replayFile) Run(ctx context.Context, emit func(owner.Sample)) error {
	f, err := openReplay(ctx, r.path)
	if err != nil {
		return fmt.Errorf("owner.replay_file: %w", err)
	}
	defer f.Close()
	go func() {
		<-ctx.Done()
		f.Close() // unblocks a read from a pipe whose writer is idle
	}()
	return owner.NewReplay(f, owner.ReplayConfig{Speed: r.speed, StartNow: true}).Run(ctx, emit)
}

// openReplay opens path for reading; a named pipe's open blocks until a writer comes, so it
// runs aside and gives up when ctx ends.
func openReplay(ctx context.Context, path string) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		f, err := os.Open(path)
		ch <- result{f, err}
	}()
	select {
	case r := <-ch:
		return r.f, r.err
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.f != nil {
				r.f.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// hclogWriter bridges zerolog's JSON lines into the plugin's hclog logger, which go-plugin
// carries to the Nomad agent at the right level.
type hclogWriter struct{ log hclog.Logger }

func (w hclogWriter) Write(p []byte) (int, error) {
	return w.WriteLevel(zerolog.InfoLevel, p)
}

// WriteLevel logs one zerolog event at its level, its message as the message and its other
// fields as key/values.
func (w hclogWriter) WriteLevel(l zerolog.Level, p []byte) (int, error) {
	var fields map[string]any
	if err := json.Unmarshal(p, &fields); err != nil {
		w.log.Info(strings.TrimSpace(string(p)))
		return len(p), nil
	}
	msg, _ := fields[zerolog.MessageFieldName].(string)
	var kv []any
	for k, v := range fields {
		switch k {
		case zerolog.MessageFieldName, zerolog.LevelFieldName, zerolog.TimestampFieldName:
		default:
			kv = append(kv, k, v)
		}
	}
	switch l {
	case zerolog.TraceLevel, zerolog.DebugLevel:
		w.log.Debug(msg, kv...)
	case zerolog.WarnLevel:
		w.log.Warn(msg, kv...)
	case zerolog.ErrorLevel, zerolog.FatalLevel, zerolog.PanicLevel:
		w.log.Error(msg, kv...)
	default:
		w.log.Info(msg, kv...)
	}
	return len(p), nil
}

// active reports whether the owner is active now.
func (s *ownerSensor) active() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status.State == owner.StateActive
}
