package relay

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestTrimmerAfterBurst: memory is trimmed once after a burst settles,
// not while connections keep coming, and not for a trickle.
func TestTrimmerAfterBurst(t *testing.T) {
	var trims atomic.Int32
	tr := &trimmer{burst: 16, quiet: 200 * time.Millisecond, trim: func() { trims.Add(1) }}
	for range 15 {
		tr.conn()
	}
	time.Sleep(500 * time.Millisecond)
	if n := trims.Load(); n != 0 {
		t.Fatalf("%d trims below the burst size, want 0", n)
	}
	// A burst that goes on for 3 quiet periods (a connection every 5 ms,
	// still busy at 2 per period): no trim until it stops.
	for range 120 {
		tr.conn()
		time.Sleep(5 * time.Millisecond)
	}
	if n := trims.Load(); n != 0 {
		t.Fatalf("%d trims while the burst went on, want 0", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for trims.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if n := trims.Load(); n != 1 {
		t.Fatalf("%d trims after the burst settled, want 1", n)
	}
	if tr.opened.Load() != 0 || tr.armed.Load() {
		t.Errorf("after the trim: opened %d, armed %v; want 0, false", tr.opened.Load(), tr.armed.Load())
	}
}
