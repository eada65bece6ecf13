package owner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/godbus/dbus/v5"
)

// DefaultLogindInterval is how often a LogindSource asks logind: a D-Bus round trip costs
// tens of microseconds, so once a second tells of a screen lock promptly for nothing.
const DefaultLogindInterval = time.Second

// logindFailuresTolerated is how many queries in a row may fail (logind restarting, say)
// before a LogindSource gives up.
const logindFailuresTolerated = 60

const (
	logindName    = "org.freedesktop.login1"
	logindSeat    = "org.freedesktop.login1.Seat"
	logindSession = "org.freedesktop.login1.Session"
)

// LogindConfig configures a LogindSource; the zero value asks the system bus about seat0.
type LogindConfig struct {
	// Address is the D-Bus address to use; empty means the system bus.
	Address string
	// Seat is the seat whose active session is the owner's; default "seat0".
	Seat string
	// Interval is the time between queries; default DefaultLogindInterval.
	Interval time.Duration
	// Clock paces the queries and stamps the samples; default SystemClock.
	Clock Clock
}

// LogindSource reports, from systemd-logind, whether someone is logged in at the seat,
// whether their screen is locked (LockedHint), and, while their desktop says they are idle
// (IdleHint), since when (IdleSinceHint).
//
// It says nothing of input while the idle hint is off: a desktop sets the hint only after its
// own idle delay, and some never set it (a screen that never blanks, a bare window manager),
// so "not idle" is no evidence of recent input; InputSource has that. Without a system bus
// or logind, Run returns an error wrapping ErrUnavailable.
type LogindSource struct {
	cfg LogindConfig
}

// NewLogindSource returns a LogindSource with cfg's zero fields set to their defaults.
func NewLogindSource(cfg LogindConfig) *LogindSource {
	if cfg.Seat == "" {
		cfg.Seat = "seat0"
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultLogindInterval
	}
	if cfg.Clock == nil {
		cfg.Clock = SystemClock{}
	}
	return &LogindSource{cfg: cfg}
}

// Name returns "logind".
func (s *LogindSource) Name() string { return "logind" }

// Run queries logind every Interval until ctx ends.
func (s *LogindSource) Run(ctx context.Context, emit func(Sample)) error {
	var conn *dbus.Conn
	var err error
	if s.cfg.Address == "" {
		conn, err = dbus.ConnectSystemBus(dbus.WithContext(ctx))
	} else {
		conn, err = dbus.Connect(s.cfg.Address, dbus.WithContext(ctx))
	}
	if err != nil {
		return fmt.Errorf("logind: %w: connect to bus: %w", ErrUnavailable, err)
	}
	defer conn.Close()
	seat := conn.Object(logindName, dbus.ObjectPath("/org/freedesktop/login1/seat/"+s.cfg.Seat))

	failures := 0
	for {
		smp, err := s.query(ctx, conn, seat)
		switch {
		case isNoLogind(err):
			return fmt.Errorf("logind: %w: %w", ErrUnavailable, err)
		case err != nil && ctx.Err() == nil:
			if failures++; failures >= logindFailuresTolerated {
				return fmt.Errorf("logind: %d queries in a row failed: %w", failures, err)
			}
		case err == nil:
			failures = 0
			emit(smp)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.cfg.Clock.After(s.cfg.Interval):
		}
	}
}

// query reads the seat's active session and its hints.
func (s *LogindSource) query(ctx context.Context, conn *dbus.Conn, seat dbus.BusObject) (Sample, error) {
	now := s.cfg.Clock.Now()
	none := Sample{Time: now, Has: HasSession | HasLocked}

	var active struct {
		ID   string
		Path dbus.ObjectPath
	}
	err := seat.CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, logindSeat, "ActiveSession").Store(&active)
	if isNoSuchObject(err) {
		return none, nil // a node without this seat: a server, nobody at it
	}
	if err != nil {
		return Sample{}, fmt.Errorf("read active session of seat %s: %w", s.cfg.Seat, err)
	}
	if active.ID == "" || active.Path == "/" {
		return none, nil
	}
	var props map[string]dbus.Variant
	err = conn.Object(logindName, active.Path).CallWithContext(ctx, "org.freedesktop.DBus.Properties.GetAll", 0, logindSession).Store(&props)
	if isNoSuchObject(err) {
		return none, nil // the session ended between the two calls
	}
	if err != nil {
		return Sample{}, fmt.Errorf("read session %s: %w", active.ID, err)
	}
	if class, _ := props["Class"].Value().(string); class == "greeter" {
		return none, nil // the login screen: nobody is logged in yet
	}
	smp := Sample{Time: now, Has: HasSession | HasLocked, Session: true}
	smp.Locked, _ = props["LockedHint"].Value().(bool)
	if idle, _ := props["IdleHint"].Value().(bool); idle {
		since, _ := props["IdleSinceHint"].Value().(uint64) // µs since the epoch
		smp.Has |= HasInput
		smp.InputIdle = max(now.Sub(time.UnixMicro(int64(since))), 0)
	}
	return smp, nil
}

// isNoLogind reports whether err says that nothing on the bus answers to logind's name.
func isNoLogind(err error) bool {
	switch dbusErrorName(err) {
	case "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner":
		return true
	}
	return false
}

// isNoSuchObject reports whether err says the seat or session asked about does not exist.
// Buses word that differently: logind's sd-bus says UnknownObject, others NoSuchObject or,
// for a path with no properties, UnknownInterface.
func isNoSuchObject(err error) bool {
	switch dbusErrorName(err) {
	case "org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.DBus.Error.NoSuchObject",
		"org.freedesktop.DBus.Error.UnknownInterface",
		"org.freedesktop.login1.NoSuchSeat", "org.freedesktop.login1.NoSuchSession":
		return true
	}
	return false
}

// dbusErrorName returns the D-Bus error name in err, or "" when err is not a D-Bus error.
func dbusErrorName(err error) string {
	var de dbus.Error
	if errors.As(err, &de) {
		return de.Name
	}
	var dp *dbus.Error
	if errors.As(err, &dp) {
		return dp.Name
	}
	return ""
}
