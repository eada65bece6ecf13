// Package eval scores the owner-return forecast on a trace, side by side with baselines.
//
// # Protocol
//
// The trace is split in time. The train phase reads only rows in [TrainFrom, TrainTo): it
// builds the fleet [predictor.Pool], each desktop's model and the baselines' tables. The
// test phase then reads only rows in [TestFrom, TestTo), which must not begin before the
// train phase ends. Nothing learned in the train phase ever sees a test row: the pool is
// frozen before the first test row is read, and the train phase's reader filters rows by
// time before anything else looks at them.
//
// During the test phase each desktop's model keeps learning online from its own past, as
// it would on its node (Config.Frozen turns that off): a forecast made at t only ever
// depends on rows before or at t, and a learning sample taken at t is learned from only once
// its outcome is known, after t+h. The hour-of-week baseline is updated the same way, so
// both adapt equally.
//
// # What is scored
//
// Every Every (5 minutes) on the wall clock, at every moment a desktop is harvestable (up,
// with its owner away: available or restarted), each method forecasts, for each horizon h,
// the probability that the owner is active within h: that an in-use period starts in
// (t, t+h]. Test moments run from TestFrom to TestTo minus the longest horizon, so every
// outcome is known from test rows; a moment whose outcome the desktop's trace never tells
// (its rows stop first) is not scored.
//
// # Baselines
//
//   - persistence: the outcome of the window just past, "an arrival in (t-h, t]".
//   - base-rate: the fleet's training frequency of arrivals within h.
//   - hour-of-week: the desktop's own frequency of arrivals within h at this hour of the
//     week, smoothed towards the fleet's with the weight of one hour of samples; updated
//     online in the test phase like the model.
//   - condor: HTCondor's desktop rule, "idle for 15 minutes or more means available": a
//     desktop idle for less than 15 minutes is forecast to see its owner back.
//
// The two rules give a class, not a probability; each class is given its training
// frequency of arrivals within h, so that the Brier score measures the rule and not an
// arbitrary scale. Ranking metrics do not depend on that choice.
package eval
