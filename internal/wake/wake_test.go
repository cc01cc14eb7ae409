package wake

import (
	"sync"
	"sync/atomic"
	"testing"
)

// TestNoLostWakeUp: passes never overlap, and the last pass starts after
// the last wake (a wake during a pass is not lost).
func TestNoLostWakeUp(t *testing.T) {
	for range 50 {
		var (
			w        Worker
			running  atomic.Int32
			wakes    atomic.Int64
			lastSeen atomic.Int64 // wakes counted when the latest pass started
			wg       sync.WaitGroup
		)
		work := func() {
			defer wg.Done()
			for {
				if running.Add(1) != 1 {
					t.Error("two workers at once")
				}
				lastSeen.Store(wakes.Load())
				running.Add(-1)
				if w.Done() {
					return
				}
			}
		}
		var wakers sync.WaitGroup
		for range 4 {
			wakers.Add(1)
			go func() {
				defer wakers.Done()
				for range 500 {
					wakes.Add(1)
					if w.Wake() {
						wg.Add(1)
						go work()
					}
				}
			}()
		}
		wakers.Wait()
		wg.Wait()
		if lastSeen.Load() != wakes.Load() {
			t.Fatalf("last pass saw %d wakes of %d: a wake-up was lost", lastSeen.Load(), wakes.Load())
		}
		if w.state.Load() != 0 {
			t.Fatalf("state %d after the workers ended, want idle", w.state.Load())
		}
	}
}
