package owner

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
	"github.com/shoenig/test/must"
)

func TestLogindNoBus(t *testing.T) {
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path="+filepath.Join(t.TempDir(), "no-bus"))
	s := NewLogindSource(LogindConfig{})
	err := s.Run(t.Context(), func(Sample) { t.Error("no sample expected without a bus") })
	must.ErrorIs(t, err, ErrUnavailable)
}

// startBus runs a private D-Bus daemon for the test and returns its address. It skips the
// test when dbus-daemon is not installed.
func startBus(t testing.TB) string {
	t.Helper()
	exe, err := exec.LookPath("dbus-daemon")
	if err != nil {
		t.Skipf("dbus-daemon is not installed (Debian package dbus-daemon): %v", err)
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "bus.conf")
	must.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`, filepath.Join(dir, "bus"))), 0o644))
	cmd := exec.Command(exe, "--config-file="+conf, "--nofork", "--print-address=1")
	out, err := cmd.StdoutPipe()
	must.NoError(t, err)
	must.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// The daemon prints its address once it listens.
	addr, err := bufio.NewReader(out).ReadString('\n')
	must.NoError(t, err, must.Sprint("dbus-daemon did not print its address"))
	return strings.TrimSpace(addr)
}

// fakeLogind serves the parts of org.freedesktop.login1 that LogindSource reads.
type fakeLogind struct {
	seat, session *prop.Properties
}

const fakeSessionPath = dbus.ObjectPath("/org/freedesktop/login1/session/_32")

func newFakeLogind(t testing.TB, addr string, withSeat bool) *fakeLogind {
	t.Helper()
	conn, err := dbus.Connect(addr)
	must.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	reply, err := conn.RequestName(logindName, dbus.NameFlagDoNotQueue)
	must.NoError(t, err)
	must.Eq(t, dbus.RequestNameReplyPrimaryOwner, reply)

	fl := &fakeLogind{}
	if withSeat {
		fl.seat, err = prop.Export(conn, "/org/freedesktop/login1/seat/seat0", prop.Map{
			logindSeat: {"ActiveSession": {Value: activeSession("2", fakeSessionPath), Writable: true, Emit: prop.EmitFalse}},
		})
		must.NoError(t, err)
	}
	fl.session, err = prop.Export(conn, fakeSessionPath, prop.Map{
		logindSession: {
			"Class":         {Value: "user", Writable: true, Emit: prop.EmitFalse},
			"IdleHint":      {Value: false, Writable: true, Emit: prop.EmitFalse},
			"IdleSinceHint": {Value: uint64(0), Writable: true, Emit: prop.EmitFalse},
			"LockedHint":    {Value: false, Writable: true, Emit: prop.EmitFalse},
		},
	})
	must.NoError(t, err)
	return fl
}

func activeSession(id string, path dbus.ObjectPath) any {
	return struct {
		ID   string
		Path dbus.ObjectPath
	}{id, path}
}

func TestLogindSource(t *testing.T) {
	addr := startBus(t)
	fl := newFakeLogind(t, addr, true)

	cases := []struct {
		name  string
		setup func()
		want  Sample
	}{
		{"present, not idle", func() {}, Sample{Has: HasSession | HasLocked, Session: true}},
		{"idle for ten minutes", func() {
			fl.session.SetMust(logindSession, "IdleHint", true)
			fl.session.SetMust(logindSession, "IdleSinceHint", uint64(t0.Add(-10*time.Minute).UnixMicro()))
		}, Sample{Has: HasSession | HasLocked | HasInput, Session: true, InputIdle: 10 * time.Minute}},
		{"locked", func() {
			fl.session.SetMust(logindSession, "LockedHint", true)
		}, Sample{Has: HasSession | HasLocked | HasInput, Session: true, Locked: true, InputIdle: 10 * time.Minute}},
		{"login screen", func() {
			fl.session.SetMust(logindSession, "Class", "greeter")
		}, Sample{Has: HasSession | HasLocked}},
		{"nobody logged in", func() {
			fl.seat.SetMust(logindSeat, "ActiveSession", activeSession("", "/"))
		}, Sample{Has: HasSession | HasLocked}},
		{"session gone", func() {
			fl.seat.SetMust(logindSeat, "ActiveSession", activeSession("9", "/org/freedesktop/login1/session/_39"))
		}, Sample{Has: HasSession | HasLocked}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.setup()
			tc.want.Time = t0
			must.Eq(t, tc.want, firstLogindSample(t, addr))
		})
	}
}

func TestLogindNoSeat(t *testing.T) {
	addr := startBus(t)
	newFakeLogind(t, addr, false)
	must.Eq(t, Sample{Time: t0, Has: HasSession | HasLocked}, firstLogindSample(t, addr))
}

func TestLogindNotRunning(t *testing.T) {
	addr := startBus(t)
	s := NewLogindSource(LogindConfig{Address: addr, Clock: NewFakeClock(t0)})
	err := s.Run(t.Context(), func(Sample) { t.Error("no sample expected without logind") })
	must.ErrorIs(t, err, ErrUnavailable)
}

// firstLogindSample runs a LogindSource against addr until its first sample. The source
// queries at once on start, so the fake clock never needs to move; should the query fail,
// the source would wait on that clock for ever, so the wait has a deadline.
func firstLogindSample(t *testing.T, addr string) Sample {
	t.Helper()
	s := NewLogindSource(LogindConfig{Address: addr, Clock: NewFakeClock(t0)})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got := make(chan Sample, 1)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, func(smp Sample) { got <- smp; cancel() }) }()
	must.NoError(t, <-done)
	select {
	case smp := <-got:
		return smp
	default:
		t.Fatal("the logind source gave no sample: its first query failed")
		return Sample{}
	}
}
