package yield

import (
	"bytes"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/internal/owner"
)

// BenchmarkObserve is one Decider.Observe on a sample that changes nothing: the cost the
// driver pays per VM per owner sample, ten times a second.
func BenchmarkObserve(b *testing.B) {
	d := NewDecider(DefaultPolicy(), testVM)
	s := owner.Sample{Time: t0, Has: owner.HasCPU | owner.HasMemory | owner.HasInput | owner.HasLocked | owner.HasSession,
		CPU: 0.05, MemAvailableMiB: 9000, InputIdle: time.Hour, Session: true}
	g := Guest{BalloonMiB: 4096, UsedMiB: 1000}
	b.ReportAllocs()
	for b.Loop() {
		s.Time = s.Time.Add(100 * time.Millisecond)
		d.Observe(s, g)
	}
}

// BenchmarkObserveWorkday replays the synthetic workday of TestReplayWorkday (a sample every
// 10 s, every change of target included) through a Decider and reports the cost per sample,
// and how many years of such a trace one core decides per second: what a fleet simulator
// pays per VM.
func BenchmarkObserveWorkday(b *testing.B) {
	tr, err := owner.NewTraceReader(bytes.NewReader(workday(b)))
	if err != nil {
		b.Fatal(err)
	}
	var samples []owner.Sample
	for {
		s, err := tr.Next()
		if err != nil {
			break
		}
		samples = append(samples, s)
	}
	vm := VMInfo{MemoryMiB: 4096}
	b.ReportAllocs()
	for b.Loop() {
		d, guest := NewDecider(DefaultPolicy(), vm), vm.MemoryMiB
		for _, s := range samples {
			s.MemAvailableMiB += vm.MemoryMiB - guest
			dec := d.Observe(s, Guest{BalloonMiB: guest, UsedMiB: 1500})
			switch {
			case dec.Layer >= LayerCheckpoint:
				guest = 0
			case dec.Layer != LayerPause:
				guest = dec.BalloonMiB
			}
		}
	}
	perSample := float64(b.Elapsed()) / float64(b.N) / float64(len(samples))
	b.ReportMetric(perSample, "ns/sample")
	b.ReportMetric(1e9/perSample/(365*24*360), "years/s")
}
