// Package owner senses the person who owns a desktop that deskcloud harvests: how much CPU
// they use apart from deskcloud's VMs, how much memory they have left, how long since they
// last touched the keyboard or mouse, and whether their screen is locked. It turns those
// observations into a state, away, idle or active, that the yield policy and the forecaster
// act on.
//
// Each kind of observation comes from a [Source]: [ProcSource] reads /proc, [InputSource]
// reads keyboard and mouse events from /dev/input, [LogindSource] asks systemd-logind over
// D-Bus, and [Replay] plays a recorded trace. A [Sampler] merges several sources into one
// stream of [Sample] values, and a [Classifier] turns samples into a [Status].
//
// Nothing here knows of Nomad; time comes from a [Clock], so tests, demos and simulators can
// run on a [FakeClock] or replay a trace as fast as they can consume it.
package owner
