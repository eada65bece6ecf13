// Package yield decides how far a harvested VM must yield to the desktop's owner. It is pure
// decision code: it reads owner samples and the VM's memory figures and returns a target
// (CPU cap, balloon size, paused, checkpointed) that the driver applies. It does no I/O and
// reads no clock: time comes from the samples, so a fleet simulator can run the same code
// over a year of trace in seconds and get the decisions the driver would have made.
//
// The layers, each taken only when the one before is not enough:
//
//  1. CPU idle class: the VM's threads run SCHED_IDLE (cgroup v2 cpu.idle), always.
//  2. CPU cap: a hard quota that steps down as the owner's load rises and back up, one step
//     at a time, once they have been quieter for cap_recover_after.
//  3. Memory: the balloon hands memory back when the owner's MemAvailable falls below
//     memory_low_water, never below what the guest needs plus memory_floor.
//  4. Pause: after suspend_after of continuous owner activity.
//  5. Checkpoint (or restart, per the task's preemption mode): after checkpoint_after
//     paused, or when the owner needs memory the balloon cannot free.
//
// docs/yield.md describes each layer, the config keys and the state machine.
package yield
