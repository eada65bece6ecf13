package owner

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Linux input event types (linux/input-event-codes.h) that a person at the keyboard, mouse,
// touchpad or touchscreen produces.
const (
	evKey = 0x01
	evRel = 0x02
	evAbs = 0x03
)

// inputPropAccelerometer marks a device as an accelerometer: it reports absolute axes all the
// time, whether or not anyone is there, so it must not count as input.
const inputPropAccelerometer = 0x06

// Defaults of an InputSource.
const (
	// DefaultInputRescan is how often an InputSource looks for newly plugged devices.
	DefaultInputRescan = 10 * time.Second
	// DefaultInputResolution is how long an InputSource leaves a device unread after noting
	// input on it: idle time is judged in minutes, so knowing of input to within a second is
	// plenty, and a 1 kHz mouse then costs one wake-up a second rather than a thousand.
	DefaultInputResolution = time.Second
)

// EventSize is the size of the kernel's struct input_event on this platform: a struct
// timeval of two longs, then a 16-bit type, a 16-bit code and a 32-bit value.
const EventSize = 2*strconv.IntSize/8 + 8

// Event is one struct input_event read from an evdev device.
type Event struct {
	Time  time.Time
	Type  uint16
	Code  uint16
	Value int32
}

// IsActivity reports whether e shows a person at the node: a key or button, relative motion
// (a mouse) or absolute motion (a touchpad or touchscreen). Synchronisation, scan codes,
// LEDs and switches do not count.
func (e Event) IsActivity() bool {
	return e.Type == evKey || e.Type == evRel || e.Type == evAbs
}

// DecodeEvent decodes one struct input_event, in native byte order, from the first
// EventSize bytes of b.
func DecodeEvent(b []byte) Event {
	_ = b[EventSize-1]
	var sec, usec int64
	w := strconv.IntSize / 8
	if w == 8 {
		sec, usec = int64(binary.NativeEndian.Uint64(b)), int64(binary.NativeEndian.Uint64(b[8:]))
	} else {
		sec, usec = int64(int32(binary.NativeEndian.Uint32(b))), int64(int32(binary.NativeEndian.Uint32(b[4:])))
	}
	rest := b[2*w:]
	return Event{
		Time:  time.Unix(sec, usec*1000),
		Type:  binary.NativeEndian.Uint16(rest),
		Code:  binary.NativeEndian.Uint16(rest[2:]),
		Value: int32(binary.NativeEndian.Uint32(rest[4:])),
	}
}

// AppendEvent appends e to b as a struct input_event in native byte order: the inverse of
// DecodeEvent, for tests and demos that feed synthetic input.
func AppendEvent(b []byte, e Event) []byte {
	sec, usec := e.Time.Unix(), int64(e.Time.Nanosecond()/1000)
	if strconv.IntSize == 64 {
		b = binary.NativeEndian.AppendUint64(b, uint64(sec))
		b = binary.NativeEndian.AppendUint64(b, uint64(usec))
	} else {
		b = binary.NativeEndian.AppendUint32(b, uint32(sec))
		b = binary.NativeEndian.AppendUint32(b, uint32(usec))
	}
	b = binary.NativeEndian.AppendUint16(b, e.Type)
	b = binary.NativeEndian.AppendUint16(b, e.Code)
	return binary.NativeEndian.AppendUint32(b, uint32(e.Value))
}

// EventReader decodes a stream of struct input_event records: an evdev device, or a pipe or
// file of them. Reads from a device return whole events; from a pipe they may not, and the
// reader joins the pieces.
type EventReader struct {
	r          io.Reader
	buf        []byte
	start, end int
}

// NewEventReader returns an EventReader over r that reads up to 64 events per call to r.
func NewEventReader(r io.Reader) *EventReader {
	return &EventReader{r: r, buf: make([]byte, 64*EventSize)}
}

// Read returns the next event. It returns io.EOF at the end of the stream, and
// io.ErrUnexpectedEOF if the stream ends inside an event.
func (er *EventReader) Read() (Event, error) {
	for er.end-er.start < EventSize {
		if er.start > 0 {
			er.end = copy(er.buf, er.buf[er.start:er.end])
			er.start = 0
		}
		n, err := er.r.Read(er.buf[er.end:])
		er.end += n
		if err != nil && er.end-er.start < EventSize {
			if errors.Is(err, io.EOF) && er.end > er.start {
				err = io.ErrUnexpectedEOF
			}
			return Event{}, err
		}
	}
	e := DecodeEvent(er.buf[er.start:])
	er.start += EventSize
	return e, nil
}

// InputConfig configures an InputSource; the zero value watches the real devices.
type InputConfig struct {
	// Dev is the directory of evdev device nodes; default "/dev/input".
	Dev string
	// Sys is the sysfs class directory describing them; default "/sys/class/input".
	Sys string
	// Rescan is how often to look for new devices; default DefaultInputRescan.
	Rescan time.Duration
	// Resolution is how long a device is left unread after input on it; default
	// DefaultInputResolution.
	Resolution time.Duration
	// Clock stamps the samples; default SystemClock.
	Clock Clock
}

// InputSource reports keyboard, mouse and touch input from the node's evdev devices: those
// whose capabilities include key, relative or absolute events, bar accelerometers. It is
// event-driven: it speaks when input happens, at most once per Resolution per device, with
// InputIdle zero, and a Sampler ages that figure until the next input.
//
// Reading /dev/input needs root or the input group. It sees input at the node's own seat
// only, which is the owner's; a remote desktop session shows up through LogindSource.
type InputSource struct {
	cfg InputConfig

	emitMu sync.Mutex // serialises emit across device readers

	mu       sync.Mutex
	watching map[string]bool // device paths being read, guarded by mu
}

// NewInputSource returns an InputSource with cfg's zero fields set to their defaults.
func NewInputSource(cfg InputConfig) *InputSource {
	if cfg.Dev == "" {
		cfg.Dev = "/dev/input"
	}
	if cfg.Sys == "" {
		cfg.Sys = "/sys/class/input"
	}
	if cfg.Rescan <= 0 {
		cfg.Rescan = DefaultInputRescan
	}
	if cfg.Resolution <= 0 {
		cfg.Resolution = DefaultInputResolution
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	return &InputSource{cfg: cfg, watching: map[string]bool{}}
}

// Name returns "input".
func (s *InputSource) Name() string { return "input" }

// Run watches the devices until ctx ends. When it first finds a device it reports input
// just now: it cannot know how long the owner has been idle before it started, and assuming
// they were just there errs on their side. Without a /dev/input directory it returns an
// error wrapping ErrUnavailable.
func (s *InputSource) Run(ctx context.Context, emit func(Sample)) error {
	if _, err := os.Stat(s.cfg.Dev); err != nil {
		return fmt.Errorf("input: %w: %w", ErrUnavailable, err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	report := func() {
		s.emitMu.Lock()
		defer s.emitMu.Unlock()
		emit(Sample{Time: s.cfg.Clock.Now(), Has: HasInput})
	}
	reported := false
	for {
		for _, path := range s.scan() {
			f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
			if err != nil {
				continue // no permission, or unplugged since the scan: try again next time
			}
			s.setWatching(path, true)
			stop := context.AfterFunc(ctx, func() { f.Close() })
			wg.Go(func() {
				defer stop()
				defer f.Close()
				defer s.setWatching(path, false)
				s.watch(ctx, f, report)
			})
			if !reported {
				report()
				reported = true
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.cfg.Clock.After(s.cfg.Rescan):
		}
	}
}

// watch reads events from r until it fails (the device went away, or ctx ended and closed
// it), calling report on input and then resting for Resolution.
func (s *InputSource) watch(ctx context.Context, r io.Reader, report func()) {
	er := NewEventReader(r)
	for {
		e, err := er.Read()
		if err != nil {
			return
		}
		if !e.IsActivity() {
			continue
		}
		report()
		select {
		case <-ctx.Done():
			return
		case <-s.cfg.Clock.After(s.cfg.Resolution):
		}
	}
}

func (s *InputSource) setWatching(path string, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if on {
		s.watching[path] = true
	} else {
		delete(s.watching, path)
	}
}

// scan returns the device nodes worth watching that are not watched yet.
func (s *InputSource) scan() []string {
	paths, _ := filepath.Glob(filepath.Join(s.cfg.Dev, "event*"))
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, p := range paths {
		if !s.watching[p] && s.wanted(filepath.Base(p)) {
			out = append(out, p)
		}
	}
	return out
}

// wanted reports whether device name (eventN) can report a person's input, from its
// capabilities in sysfs. A device sysfs says nothing of is watched anyway: only key,
// relative and absolute events count, so a wrong guess costs a sleeping goroutine.
func (s *InputSource) wanted(name string) bool {
	dir := filepath.Join(s.cfg.Sys, name, "device")
	ev, err := readHexMask(filepath.Join(dir, "capabilities", "ev"))
	if err != nil {
		return true
	}
	if ev&(1<<evKey|1<<evRel|1<<evAbs) == 0 {
		return false
	}
	props, err := readHexMask(filepath.Join(dir, "properties"))
	return err != nil || props&(1<<inputPropAccelerometer) == 0
}

// readHexMask reads the lowest word of a sysfs bitmap: hex words separated by spaces, most
// significant first.
func readHexMask(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	words := strings.Fields(string(b))
	if len(words) == 0 {
		return 0, fmt.Errorf("%s is empty", path)
	}
	return strconv.ParseUint(words[len(words)-1], 16, 64)
}
