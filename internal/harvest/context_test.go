package harvest

import (
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
)

func TestFleetContext(t *testing.T) {
	at := func(d, h, m int) time.Time {
		return day0.AddDate(0, 0, d).Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute)
	}
	desktops := [][]Event{
		{{at(0, 0, 0), predictor.Available}, {at(0, 0, 7), predictor.InUse}, {at(0, 0, 20), predictor.Available}},
		{{at(0, 0, 2), predictor.InUse}}, // its first row: in use, but not an arrival
		{{at(0, 0, 3), predictor.Available}, {at(0, 0, 10), predictor.InUse}, {at(8, 0, 0), predictor.Available}},
	}
	c, err := NewFleetContext(desktops, []string{"A", "A", "B"})
	must.NoError(t, err)
	third, twoThirds := float64(float32(1.0/3)), float64(float32(2.0/3))
	flow := float64(float32(8.0 / 3)) // two arrivals in a quarter hour over three desktops, per desktop-hour
	unknown := predictor.NoContext
	tests := []struct {
		name    string
		desktop int
		t       time.Time
		want    predictor.Context
	}{
		{"before the first tick", 0, at(0, 0, 4), unknown},
		{"first tick", 0, at(0, 0, 5), predictor.Context{FleetInUse: third, FleetArrivals: 0, GroupInUse: 0.5}},
		{"first tick, other group", 2, at(0, 0, 5), predictor.Context{FleetInUse: third, FleetArrivals: 0, GroupInUse: 0}},
		{"between ticks: the last one's", 2, at(0, 0, 9), predictor.Context{FleetInUse: third, FleetArrivals: 0, GroupInUse: 0}},
		{"a row at a tick counts at it", 2, at(0, 0, 10), predictor.Context{FleetInUse: 1, FleetArrivals: flow, GroupInUse: 1}},
		{"arrivals still within the quarter hour", 0, at(0, 0, 20), predictor.Context{FleetInUse: twoThirds, FleetArrivals: flow, GroupInUse: 0.5}},
		{"arrivals past", 0, at(0, 0, 25), predictor.Context{FleetInUse: twoThirds, FleetArrivals: 0, GroupInUse: 0.5}},
		{"sessions with no end logged for a day", 0, at(1, 0, 15), predictor.Context{FleetInUse: 0, FleetArrivals: 0, GroupInUse: 0}},
		{"a week of silence takes a desktop out", 0, at(7, 1, 0), unknown},
		{"back, in the other group", 0, at(8, 0, 0), predictor.Context{FleetInUse: 0, FleetArrivals: 0, GroupInUse: -1}},
		{"after the last tick: the last one's", 2, at(9, 0, 0), predictor.Context{FleetInUse: 0, FleetArrivals: 0, GroupInUse: 0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			must.Eq(t, tc.want, c.at(tc.desktop, tc.t))
		})
	}

	one, err := NewFleetContext(desktops, nil)
	must.NoError(t, err)
	must.Eq(t, predictor.Context{FleetInUse: third, FleetArrivals: 0, GroupInUse: third}, one.at(2, at(0, 0, 5)),
		must.Sprint("with no groups, a desktop's group is the fleet"))

	_, err = NewFleetContext(desktops, []string{"A"})
	must.ErrorContains(t, err, "1 groups for 3 desktops")
	empty, err := NewFleetContext(nil, nil)
	must.NoError(t, err)
	must.Eq(t, unknown, empty.at(0, at(0, 0, 5)))
}

func TestSimulateWithFleetContext(t *testing.T) {
	desktops := fleet(7, 6)
	c, err := NewFleetContext(desktops, nil)
	must.NoError(t, err)
	opt := Options{From: day0.AddDate(0, 0, 14), Context: c}
	for _, np := range policies()[1:] {
		t.Run(np.name, func(t *testing.T) {
			opt.Workers = 1
			a, err := Simulate(t.Context(), np.p, desktops, opt)
			must.NoError(t, err)
			opt.Workers = 3
			b, err := Simulate(t.Context(), np.p, desktops, opt)
			must.NoError(t, err)
			must.Eq(t, a, b, must.Sprint("reports do not depend on the workers"))
			must.Positive(t, a.MachineHours)
			must.Eq(t, a.Arrivals, a.Collisions+a.ArrivalsAtFloor+a.ArrivalsVacant)
		})
	}
	_, err = Simulate(t.Context(), DefaultForecast(), desktops[:3], opt)
	must.ErrorContains(t, err, "fleet context made for 7 desktops, given 3")
}
