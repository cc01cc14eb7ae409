// Package wake runs at most one worker at a time for something that is
// woken repeatedly (a socket's direction in the splice engines), without a
// lock and without losing a wake-up that comes while the worker runs.
package wake

import "sync/atomic"

// Worker is the run state of one thing's worker. The zero value is idle.
type Worker struct {
	state atomic.Int32 // 0 idle, 1 running, 2 running and woken again
}

// Wake reports whether the caller must start the worker (it was idle);
// false: a worker runs and will look again before it ends.
func (w *Worker) Wake() bool {
	for {
		switch w.state.Load() {
		case 0:
			if w.state.CompareAndSwap(0, 1) {
				return true
			}
		case 1:
			if w.state.CompareAndSwap(1, 2) {
				return false
			}
		default:
			return false
		}
	}
}

// Done is called by the worker after each pass: true, it is idle now and
// must end; false, it was woken during the pass and must look again.
func (w *Worker) Done() bool {
	if w.state.CompareAndSwap(1, 0) {
		return true
	}
	w.state.Store(1)
	return false
}
