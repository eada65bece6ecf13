package harvest

import (
	"math"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
)

func TestFleetDensity(t *testing.T) {
	h := func(d int, hours float64) time.Time {
		return day0.AddDate(0, 0, d).Add(time.Duration(hours * float64(time.Hour)))
	}
	// Desktop a: away (harvestable) from 04:00 on day 0, its first event, and back at 10:00
	// every day for an hour, for 40 days: 23 harvestable hours and one arrival a day, 19
	// hours on the first day.
	var a []Event
	a = append(a, Event{h(0, 4), predictor.Available})
	for d := range 40 {
		a = append(a, Event{h(d, 10), predictor.InUse}, Event{h(d, 11), predictor.Available})
	}
	// Desktop b: off, then up and idle for 2 days from day 10, then silent for 9 days (out
	// of the fleet: counts nothing), then in use on day 21 (an arrival).
	b := []Event{{h(0, 0), predictor.Offline}, {h(10, 0), predictor.Restarted}, {h(12, 0), predictor.Available}, {h(21, 0), predictor.InUse}}
	d := NewFleetDensity([][]Event{a, b})

	must.Eq(t, 19, d.hours[0])
	must.Eq(t, 23, d.hours[5])
	must.Eq(t, 23+24, d.hours[10], must.Sprint("b restarted all of day 10"))
	must.Eq(t, 23, d.hours[12], must.Sprint("b's nine silent days count nothing"))
	must.Eq(t, 1, d.arrivals[0])
	must.Eq(t, 2, d.arrivals[21])

	must.Eq(t, 0, d.At(h(20, 0)), must.Sprint("fewer than four weeks known"))
	must.Eq(t, 0, d.At(h(-3, 0)))
	// The 30 days before day 30: 30 + 1 arrivals over 19 + 29×23 + 48 hours.
	want := 31.0 / (19 + 29*23 + 48)
	must.Less(t, 1e-12, math.Abs(d.At(h(30, 12))-want))
	// Days past the last are the last known year.
	must.Eq(t, d.At(h(40, 0)), d.At(h(90, 0)))
}

func TestForecastScaledByDensity(t *testing.T) {
	p := DefaultForecast()
	p.ArrivalDensity = 0.2
	half := p.Scaled(0.5)
	must.Eq(t, p.StartBelow/2, half.StartBelow)
	must.Eq(t, p.ShrinkAbove/2, half.ShrinkAbove)
	must.Eq(t, p.FloorStartBelow, half.FloorStartBelow, must.Sprint("starts at the floor are not scaled"))
	must.Eq(t, p.Scaled(0.25), p.Scaled(0.01), must.Sprint("the scale is held above a quarter"))
	big := p.Scaled(20)
	must.Eq(t, 4*p.ShrinkAbove, big.ShrinkAbove, must.Sprint("the scale is held below 4"))
	must.Eq(t, p.FloorStartBelow, big.FloorStartBelow)
	off := p
	off.FloorStartBelow = off.StartBelow
	must.Eq(t, 4*p.StartBelow, off.Scaled(4).FloorStartBelow, must.Sprint("floor start raised to start"))

	drains := NewForecast(10*time.Minute, 0.01, 0.02, 0.1)
	drains.FloorStartBelow = 0.08
	d := drains.Scaled(0.5)
	must.Eq(t, Forecast{Lead: drains.Lead, StartBelow: 0.005, ShrinkAbove: 0.01, FloorStartBelow: 0.05, DrainAbove: 0.05,
		MinIdle: drains.MinIdle, MinFloor: drains.MinFloor, Fallback: drains.Fallback}, d, must.Sprint("drains scale; floor start kept at most the drain"))
	must.NoError(t, d.Validate(nil))
	noFloor := NewForecast(10*time.Minute, 0.01, 0.1, 0.1)
	for _, k := range []float64{0.3, 3} {
		must.Eq(t, noFloor.Scaled(k).DrainAbove, noFloor.Scaled(k).ShrinkAbove, must.Sprint("a floor layer that is off stays off"))
	}
	must.Eq(t, 0.005, NewForecast(10*time.Minute, 0.01, 0.02, 2).Scaled(0.5).FloorStartBelow, must.Sprint("starts at the floor that are off stay off"))
	must.Eq(t, 2, NewForecast(10*time.Minute, 0.01, 0.02, 2).Scaled(0.3).DrainAbove, must.Sprint("never drain stays never"))

	now := day0.Add(12 * time.Hour)
	// About 0.0099 within 10 minutes: below the shrink threshold, above it halved.
	s := Situation{Now: now, Phase: Running, Harvestable: true, Forecast: forecastWith(0.001)}
	must.Eq(t, Hold, p.Decide(s))
	s.ArrivalDensity = 0.2
	must.Eq(t, Hold, p.Decide(s), must.Sprint("at the reference density the thresholds hold"))
	s.ArrivalDensity = 0.1
	must.Eq(t, Shrink, p.Decide(s), must.Sprint("half the density, half the threshold"))
	p.ArrivalDensity = 0
	must.Eq(t, Hold, p.Decide(s), must.Sprint("no reference: fixed thresholds"))
}

func TestSimulateScalesByDensity(t *testing.T) {
	// The density reaches the policy: told that owners come back a third less often than
	// when its thresholds were chosen, the policy shrinks sooner and grows later, so its VMs
	// spend less time at full size and meet fewer owners there.
	desktops := fleet(8, 10)
	opt := Options{From: day0.AddDate(0, 0, 35), Density: NewFleetDensity(desktops)}
	p := NewForecast(10*time.Minute, 0.02, 0.05, math.Inf(1))
	p.FloorStartBelow = 0.1
	fixed, err := Simulate(t.Context(), p, desktops, opt)
	must.NoError(t, err)
	p.ArrivalDensity = 1.5 * opt.Density.At(opt.From)
	scaled, err := Simulate(t.Context(), p, desktops, opt)
	must.NoError(t, err)
	t.Logf("fixed: %.0f h full, %d collisions; scaled: %.0f h full, %d collisions", fixed.FullHours, fixed.Collisions, scaled.FullHours, scaled.Collisions)
	must.Less(t, fixed.FullHours, scaled.FullHours)
	must.Less(t, fixed.Collisions, scaled.Collisions)
	must.Eq(t, fixed.Arrivals, scaled.Arrivals)
}
