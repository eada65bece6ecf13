package vm

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/shoenig/test/must"
)

// touchAndFree fills most of a 1536 MiB guest's memory once and frees it again, as a job
// that peaked and finished a step would (two tmpfs files: each tmpfs takes at most half the
// RAM).
const touchAndFree = "dd if=/dev/zero of=/tmp/a bs=1M count=600 2>/dev/null; dd if=/dev/zero of=/dev/shm/b bs=1M count=600 2>/dev/null; rm /tmp/a /dev/shm/b"

// reportingVM is one side of BenchmarkFreePageReporting and what its trials measured.
type reportingVM struct {
	name  string
	extra []string // QEMU arguments that make this side
	m     *Machine
	c     *guestctl.Client

	negotiated bool
	// unasked is how long after the guest freed its memory QEMU's RSS was 1 GiB below its
	// peak, with no balloon request; -1 when not within the limit.
	unasked []time.Duration
	// handBack is how long the balloon took to reach its target afterwards.
	handBack []time.Duration
	// QEMU's RSS in MiB: at its peak, at the end of the unasked watch, the highest while
	// the balloon inflated, and when it had reached its target.
	peakRSS, idleRSS, inflateRSS, balloonRSS []int64
}

// BenchmarkFreePageReporting compares, in one run, the same guest with virtio-balloon free
// page reporting off (deskvm's VM before it turned reporting on) and on: the guest touches
// 1.2 GiB and frees it, and the benchmark measures (a) how long until QEMU's RSS is 1 GiB
// lower without any balloon request, and then (b) how long the balloon takes to hand 1 GiB
// back (actual at 512 MiB) and QEMU's RSS after. Both VMs run at once; their touch phases
// overlap, their balloon phases do not.
func BenchmarkFreePageReporting(b *testing.B) {
	requireQEMU(b)
	ctx := b.Context()
	const memMiB, giveMiB, trials = 1536, 1024, 3
	const unaskedLimit = 20 * time.Second
	target := memMiB - giveMiB

	vms := []*reportingVM{
		// -set changes a property of the balloon device that Spec.Args adds.
		{name: "off", extra: []string{"-set", "device.balloon0.free-page-reporting=off"}},
		{name: "on"},
	}
	for _, v := range vms {
		spec := testSpec(b, "bench-fpr-"+v.name, 1, memMiB)
		spec.ExtraArgs = v.extra
		v.m = startTestVM(b, ctx, spec)
	}
	// Both boot at once; the agent answers once the guest's balloon driver is loaded.
	for _, v := range vms {
		v.c = startCommand(b, ctx, v.m, "while :; do sleep 1; done")
		v.negotiated = reportingNegotiated(b, ctx, v.c)
		must.Eq(b, v.name == "on", v.negotiated, must.Sprintf("guest %s negotiated free page reporting", v.name))
	}

	for range trials {
		watchUnasked(b, ctx, vms, giveMiB, unaskedLimit)
		for _, v := range vms {
			took, _, peak := balloonTo(b, ctx, v.m, target, time.Minute)
			must.Positive(b, took, must.Sprintf("guest %s did not hand back %d MiB within a minute", v.name, giveMiB))
			v.handBack = append(v.handBack, took)
			v.inflateRSS = append(v.inflateRSS, int64(peak))
			v.balloonRSS = append(v.balloonRSS, int64(rssMiB(v.m.PID())))
			deflate(b, ctx, v.m, memMiB)
		}
	}

	tw := newTable("free page reporting (a): %d MiB guest touches 1200 MiB and frees it; time until QEMU's RSS is %d MiB below its peak with no balloon request, %d trials, limit %s (host load %s)",
		memMiB, giveMiB, trials, unaskedLimit, loadAvg())
	fmt.Fprintln(tw, "reporting\tnegotiated\twithin limit\tp50\tmin\tmax\tQEMU RSS peak\tat end of watch\t")
	for _, v := range vms {
		var got []time.Duration
		for _, d := range v.unasked {
			if d >= 0 {
				got = append(got, d)
			}
		}
		p50, lo, hi := ms(-1), ms(-1), ms(-1)
		if len(got) > 0 {
			p50, lo, hi = ms(median(got)), ms(slices.Min(got)), ms(slices.Max(got))
		}
		fmt.Fprintf(tw, "%s\t%t\t%d/%d\t%s\t%s\t%s\t%d MiB\t%d MiB\t\n", v.name, v.negotiated, len(got), len(v.unasked),
			p50, lo, hi, median(v.peakRSS), median(v.idleRSS))
		b.ReportMetric(float64(len(got)), v.name+"-unasked-1GiB-trials")
		if len(got) == len(v.unasked) {
			b.ReportMetric(median(got).Seconds(), v.name+"-unasked-1GiB-s")
		}
		b.ReportMetric(float64(median(v.idleRSS)), v.name+"-rss-idle-MiB")
	}
	tw.Flush()

	tw = newTable("free page reporting (b): then the balloon hands back %d MiB (actual at %d MiB), %d trials (host load %s)",
		giveMiB, target, trials, loadAvg())
	fmt.Fprintln(tw, "reporting\tp50\tmin\tmax\tQEMU RSS before\thighest while inflating\tafter\t")
	for _, v := range vms {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d MiB\t%d MiB\t%d MiB\t\n", v.name, ms(median(v.handBack)), ms(slices.Min(v.handBack)),
			ms(slices.Max(v.handBack)), median(v.idleRSS), median(v.inflateRSS), median(v.balloonRSS))
		b.ReportMetric(median(v.handBack).Seconds(), v.name+"-handback-1GiB-s")
		b.ReportMetric(float64(median(v.balloonRSS)), v.name+"-rss-after-balloon-MiB")
	}
	tw.Flush()
	fmt.Println("  RSS figures are medians over the trials; the unasked watch ends when RSS is 1 GiB below its peak or at the limit")
}

// watchUnasked has every guest touch and free its memory at once and samples QEMU's RSS
// until each is giveMiB below its peak or limit has passed since its guest freed.
func watchUnasked(b *testing.B, ctx context.Context, vms []*reportingVM, giveMiB int, limit time.Duration) {
	b.Helper()
	type freed struct {
		v    *reportingVM
		at   time.Time
		code int
		err  error
	}
	done := make(chan freed, len(vms))
	for _, v := range vms {
		go func() {
			code, err := v.c.Exec(ctx, guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", touchAndFree}}, guestctl.ExecIO{})
			done <- freed{v, time.Now(), code, err}
		}()
	}
	peak := make(map[*reportingVM]int)
	freedAt := make(map[*reportingVM]time.Time)
	watched := make(map[*reportingVM]bool)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for len(watched) < len(vms) {
		select {
		case <-ctx.Done():
			must.NoError(b, ctx.Err())
		case f := <-done:
			must.NoError(b, f.err, must.Sprintf("touch and free in guest %s", f.v.name))
			must.Zero(b, f.code, must.Sprintf("exit code of touch and free in guest %s", f.v.name))
			freedAt[f.v] = f.at
		case <-tick.C:
		}
		for _, v := range vms {
			rss := rssMiB(v.m.PID())
			peak[v] = max(peak[v], rss)
			at, ok := freedAt[v]
			if !ok || watched[v] {
				continue
			}
			var d time.Duration
			switch {
			case rss <= peak[v]-giveMiB:
				d = time.Since(at)
			case time.Since(at) > limit:
				d = -1
			default:
				continue
			}
			watched[v] = true
			v.unasked = append(v.unasked, d)
			v.peakRSS = append(v.peakRSS, int64(peak[v]))
			v.idleRSS = append(v.idleRSS, int64(rss))
		}
	}
}

// reportingNegotiated tells from inside the guest whether its balloon driver took free page
// reporting: bit 5 (VIRTIO_BALLOON_F_REPORTING) of the balloon device's negotiated features.
func reportingNegotiated(b *testing.B, ctx context.Context, c *guestctl.Client) bool {
	b.Helper()
	const script = `for d in /sys/bus/virtio/devices/*; do if [ "$(cat $d/device)" = 0x0005 ]; then cat $d/features; fi; done`
	var out, errOut bytes.Buffer
	code, err := c.Exec(ctx, guestctl.ExecRequest{Command: []string{"/bin/sh", "-c", script}}, guestctl.ExecIO{Stdout: &out, Stderr: &errOut})
	must.NoError(b, err)
	must.Zero(b, code, must.Sprintf("exit code of reading the balloon's features; stderr %q", errOut.String()))
	features := bytes.TrimSpace(out.Bytes())
	must.SliceNotEmpty(b, features, must.Sprint("the guest has no virtio balloon device"))
	return len(features) > 5 && features[5] == '1'
}
