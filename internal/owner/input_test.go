package owner

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

var (
	evSyn = Event{Type: 0x00}
	evMsc = Event{Type: 0x04, Code: 0x04, Value: 30} // MSC_SCAN
	keyA  = Event{Type: evKey, Code: 30, Value: 1}   // KEY_A down
	relX  = Event{Type: evRel, Code: 0, Value: -3}   // REL_X
	absX  = Event{Type: evAbs, Code: 0, Value: 512}  // ABS_X
	swLid = Event{Type: 0x05, Code: 0, Value: 1}     // SW_LID
)

func events(es ...Event) []byte {
	var b []byte
	for _, e := range es {
		b = AppendEvent(b, e)
	}
	return b
}

func TestEventRoundTrip(t *testing.T) {
	e := Event{Time: time.Unix(1772442000, 123456000), Type: evKey, Code: 272, Value: -7}
	b := AppendEvent(nil, e)
	must.SliceLen(t, EventSize, b)
	must.Eq(t, e, DecodeEvent(b))
	must.True(t, e.Time.Equal(DecodeEvent(b).Time))
}

func TestEventIsActivity(t *testing.T) {
	cases := []struct {
		name string
		e    Event
		want bool
	}{
		{"syn", evSyn, false},
		{"msc scan code", evMsc, false},
		{"key", keyA, true},
		{"mouse motion", relX, true},
		{"touchpad motion", absX, true},
		{"lid switch", swLid, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, tc.e.IsActivity())
		})
	}
}

// TestEventReaderPipe feeds events through a pipe in pieces that split events, as a pipe
// may, and checks they come out whole and in order.
func TestEventReaderPipe(t *testing.T) {
	r, w, err := os.Pipe()
	must.NoError(t, err)
	defer r.Close()
	want := []Event{evMsc, keyA, evSyn, relX, relX, evSyn}
	for i := range want {
		want[i].Time = t0.Add(time.Duration(i) * time.Millisecond)
	}
	raw := events(want...)
	go func() {
		defer w.Close()
		for _, cut := range []int{5, EventSize, 2*EventSize + 3} {
			w.Write(raw[:cut])
			raw = raw[cut:]
		}
		w.Write(raw)
	}()
	er := NewEventReader(r)
	for i, e := range want {
		got, err := er.Read()
		must.NoError(t, err, must.Sprintf("event %d", i))
		must.Eq(t, e.Type, got.Type)
		must.Eq(t, e.Code, got.Code)
		must.Eq(t, e.Value, got.Value)
		must.True(t, e.Time.Equal(got.Time))
	}
	_, err = er.Read()
	must.ErrorIs(t, err, io.EOF)
}

func TestEventReaderTruncated(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events")
	b := events(keyA, relX)
	must.NoError(t, os.WriteFile(path, b[:len(b)-4], 0o644))
	f, err := os.Open(path)
	must.NoError(t, err)
	defer f.Close()
	er := NewEventReader(f)
	_, err = er.Read()
	must.NoError(t, err)
	_, err = er.Read()
	must.ErrorIs(t, err, io.ErrUnexpectedEOF)
}

// TestInputWatch feeds a device stream to watch: only key, relative and absolute events
// report, and after a report the device rests for the resolution before it is read again.
func TestInputWatch(t *testing.T) {
	cases := []struct {
		name    string
		stream  []Event
		reports int
	}{
		{"nothing but sync and scan codes", []Event{evSyn, evMsc, evSyn, swLid}, 0},
		{"one key press", []Event{evMsc, keyA, evSyn}, 1},
		{"a burst is one report per rest", []Event{relX, evSyn, relX, evSyn, absX}, 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clock := NewFakeClock(t0)
			s := NewInputSource(InputConfig{Clock: clock})
			r, w, err := os.Pipe()
			must.NoError(t, err)
			defer r.Close()
			_, err = w.Write(events(tc.stream...))
			must.NoError(t, err)
			must.NoError(t, w.Close())

			var reports []time.Time
			done := make(chan struct{})
			go func() {
				defer close(done)
				s.watch(t.Context(), r, func() { reports = append(reports, clock.Now()) })
			}()
			for i := 1; i < tc.reports; i++ {
				must.NoError(t, clock.WaitForWaiters(t.Context(), 1))
				clock.Advance(DefaultInputResolution)
			}
			if tc.reports > 0 {
				must.NoError(t, clock.WaitForWaiters(t.Context(), 1))
				clock.Advance(DefaultInputResolution)
			}
			<-done
			must.SliceLen(t, tc.reports, reports)
			for i, at := range reports {
				must.Eq(t, t0.Add(time.Duration(i)*DefaultInputResolution), at)
			}
		})
	}
}

// fakeInput is a /dev/input and /sys/class/input stand-in: FIFOs for device nodes, and
// capability files as the kernel writes them.
type fakeInput struct {
	dev, sys string
}

func newFakeInput(t *testing.T) *fakeInput {
	root := t.TempDir()
	fi := &fakeInput{dev: filepath.Join(root, "dev"), sys: filepath.Join(root, "sys")}
	must.NoError(t, os.MkdirAll(fi.dev, 0o755))
	return fi
}

// add creates device name with the given ev and properties bitmaps and returns its writer
// end; nil for a device with no sysfs entry.
func (fi *fakeInput) add(t *testing.T, name, ev, props string) *os.File {
	path := filepath.Join(fi.dev, name)
	must.NoError(t, syscall.Mkfifo(path, 0o600))
	if ev != "" {
		caps := filepath.Join(fi.sys, name, "device", "capabilities")
		must.NoError(t, os.MkdirAll(caps, 0o755))
		must.NoError(t, os.WriteFile(filepath.Join(caps, "ev"), []byte(ev+"\n"), 0o644))
		must.NoError(t, os.WriteFile(filepath.Join(fi.sys, name, "device", "properties"), []byte(props+"\n"), 0o644))
	}
	// Opened read-write, the FIFO always has a writer, so the source's reads block rather
	// than see end of file.
	w, err := os.OpenFile(path, os.O_RDWR, 0)
	must.NoError(t, err)
	t.Cleanup(func() { w.Close() })
	return w
}

func TestInputSourceDevices(t *testing.T) {
	fi := newFakeInput(t)
	fi.add(t, "event0", "120013", "0")         // keyboard: SYN KEY MSC LED REP
	fi.add(t, "event1", "17", "0")             // mouse: SYN KEY REL MSC
	fi.add(t, "event2", "b", "0")              // touchpad: SYN KEY ABS
	fi.add(t, "event3", "9", "40")             // accelerometer: SYN ABS, INPUT_PROP_ACCELEROMETER
	fi.add(t, "event4", "21", "0")             // lid switch: SYN SW
	fi.add(t, "event5", "", "")                // nothing in sysfs: watched to be safe
	fi.add(t, "event6", "0 0 0 120013", "0 0") // multi-word bitmaps
	must.NoError(t, os.WriteFile(filepath.Join(fi.dev, "mice"), nil, 0o644))

	s := NewInputSource(InputConfig{Dev: fi.dev, Sys: fi.sys})
	got := s.scan()
	want := []string{"event0", "event1", "event2", "event5", "event6"}
	must.SliceLen(t, len(want), got)
	for i, name := range want {
		must.Eq(t, filepath.Join(fi.dev, name), got[i])
	}
}

// TestInputSourceRun runs the source over fake devices: a report at start, one per input,
// none for a device that is not a person's, and a clean stop.
func TestInputSourceRun(t *testing.T) {
	fi := newFakeInput(t)
	kbd := fi.add(t, "event0", "120013", "0")
	accel := fi.add(t, "event3", "9", "40")

	clock := NewFakeClock(t0)
	s := NewInputSource(InputConfig{Dev: fi.dev, Sys: fi.sys, Clock: clock})
	ctx, cancel := context.WithCancel(t.Context())
	got := make(chan Sample, 10)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, func(smp Sample) { got <- smp }) }()

	first := <-got
	must.Eq(t, Sample{Time: t0, Has: HasInput}, first)
	must.NoError(t, clock.WaitForWaiters(ctx, 1)) // the rescan timer

	_, err := accel.Write(events(absX, evSyn))
	must.NoError(t, err)
	clock.Advance(5 * time.Second)
	_, err = kbd.Write(events(evMsc, keyA, evSyn))
	must.NoError(t, err)
	second := <-got
	must.Eq(t, Sample{Time: t0.Add(5 * time.Second), Has: HasInput}, second)

	must.NoError(t, clock.WaitForWaiters(ctx, 2)) // rescan, and the keyboard's rest
	cancel()
	must.NoError(t, <-done)
	must.Eq(t, 0, len(got), must.Sprint("the accelerometer must not report"))
}

func TestInputSourceUnavailable(t *testing.T) {
	s := NewInputSource(InputConfig{Dev: filepath.Join(t.TempDir(), "no-input")})
	err := s.Run(t.Context(), func(Sample) {})
	must.ErrorIs(t, err, ErrUnavailable)
	must.True(t, errors.Is(err, os.ErrNotExist))
}
