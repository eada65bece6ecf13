// Package ownerload stands in for a desktop owner's CPU-bound program in the benchmarks that
// measure how much a VM slows its owner (driver/vm's and scripts/slowdown): a fixed amount
// of integer work, and the amount that takes a given time on one core.
package ownerload

import "time"

// Spin does n rounds of integer work and returns its result, which callers should keep
// (print it, or store it) so that the compiler cannot drop the loop.
func Spin(n int64) uint64 {
	x := uint64(88172645463325252)
	for range n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
	}
	return x
}

// Sink holds a Spin result that is otherwise unused.
var Sink uint64

// Calibrate returns the number of Spin rounds that take about d on one core now: the
// fastest of three timed runs of 50 million rounds, so that another program's burst makes
// the count smaller rather than larger.
func Calibrate(d time.Duration) int64 {
	const n = 50_000_000
	var best time.Duration
	for range 3 {
		start := time.Now()
		Sink = Spin(n)
		if took := time.Since(start); best == 0 || took < best {
			best = took
		}
	}
	return int64(float64(n) * float64(d) / float64(best))
}
