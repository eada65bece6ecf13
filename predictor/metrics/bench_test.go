package metrics

import "testing"

// BenchmarkAccumulatorAdd measures recording one scored forecast.
func BenchmarkAccumulatorAdd(b *testing.B) {
	probs, labels := randomForecasts(4, 1<<16)
	acc := NewAccumulator()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		acc.Add(probs[i&(1<<16-1)], labels[i&(1<<16-1)])
		i++
	}
}

// BenchmarkAccumulatorSummary measures scoring everything an accumulator holds.
func BenchmarkAccumulatorSummary(b *testing.B) {
	probs, labels := randomForecasts(5, 1<<16)
	acc := NewAccumulator()
	for i, p := range probs {
		acc.Add(p, labels[i])
	}
	for b.Loop() {
		acc.Summary(0.5)
	}
}
