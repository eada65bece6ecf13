package owner

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Sampler merges several sources into one stream of samples. It is itself a [Source], so a
// Sampler can stand wherever one source can.
//
// Each incoming observation produces one merged sample stamped with the observation's time
// (never earlier than the previous merged sample). CPU and memory come from the latest
// observation that has them; input idle time is the shortest any source reports, aged by the
// time since that source reported it, so an event-driven source need only speak when input
// happens; the screen counts as locked, and a session as present, when any source says so.
type Sampler struct {
	log     zerolog.Logger
	sources []Source

	mu     sync.Mutex
	latest Sample   // the merged sample, guarded by mu
	last   []Sample // each source's latest observation, guarded by mu
}

// NewSampler returns a Sampler over sources; log receives the sources' failures, from
// several goroutines, so its writer must be safe for concurrent use.
func NewSampler(log zerolog.Logger, sources ...Source) *Sampler {
	return &Sampler{log: log, sources: sources, last: make([]Sample, len(sources))}
}

// Name returns "sampler".
func (s *Sampler) Name() string { return "sampler" }

// Run runs every source until ctx ends or all of them have finished, calling emit with the
// merged sample after each observation. emit is called under the Sampler's lock, one call at
// a time, so it must return quickly: hand the sample on, don't act on it there.
//
// A source that fails is logged and dropped while the others carry on, so Run returns nil:
// on a desktop that lost its input devices, CPU sensing must go on.
func (s *Sampler) Run(ctx context.Context, emit func(Sample)) error {
	var wg sync.WaitGroup
	for i, src := range s.sources {
		wg.Go(func() {
			err := src.Run(ctx, func(obs Sample) {
				s.mu.Lock()
				defer s.mu.Unlock()
				s.last[i] = obs
				s.latest = s.merge(obs)
				emit(s.latest)
			})
			switch {
			case err == nil || ctx.Err() != nil:
			case errors.Is(err, ErrUnavailable):
				s.log.Info().Str("source", src.Name()).Err(err).Msg("owner source unavailable")
			default:
				s.log.Warn().Str("source", src.Name()).Err(err).Msg("owner source stopped")
			}
		})
	}
	wg.Wait()
	return nil
}

// Latest returns the most recent merged sample; its Time is zero before the first one.
func (s *Sampler) Latest() Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.latest
}

// merge folds obs into the previous merged sample. It allocates nothing.
func (s *Sampler) merge(obs Sample) Sample {
	m := s.latest
	if obs.Time.After(m.Time) {
		m.Time = obs.Time
	}
	m.Has |= obs.Has
	if obs.Has&HasCPU != 0 {
		m.CPU = obs.CPU
	}
	if obs.Has&HasMemory != 0 {
		m.MemAvailableMiB, m.MemTotalMiB = obs.MemAvailableMiB, obs.MemTotalMiB
	}
	idle, haveIdle := time.Duration(0), false
	m.Locked, m.Session = false, false
	for _, o := range s.last {
		if o.Has&HasInput != 0 {
			aged := o.InputIdle + max(m.Time.Sub(o.Time), 0)
			if !haveIdle || aged < idle {
				idle, haveIdle = aged, true
			}
		}
		m.Locked = m.Locked || (o.Has&HasLocked != 0 && o.Locked)
		m.Session = m.Session || (o.Has&HasSession != 0 && o.Session)
	}
	m.InputIdle = idle
	return m
}
