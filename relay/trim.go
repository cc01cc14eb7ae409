package relay

import (
	"runtime/debug"
	"sync/atomic"
	"time"
)

// trimmer returns memory to the kernel once a burst of new connections
// has settled. The Go runtime keeps what a burst freed (the stacks of
// handshake and copy goroutines, buffers) until its periodic GC and
// background scavenger get to it, minutes later: memory a small gateway's
// other services go without meanwhile. Like malloc_trim after a burst of
// frees, one forced GC and scavenge gives it back.
type trimmer struct {
	burst int64         // connections opened since the last trim that make a burst
	quiet time.Duration // settled: fewer than burst/8 opened for this long
	trim  func()

	opened atomic.Int64
	armed  atomic.Bool
	mark   int64 // opened at the last check; owned by the armed timer
}

func newTrimmer() *trimmer {
	return &trimmer{burst: 256, quiet: 2 * time.Second, trim: debug.FreeOSMemory}
}

// conn counts a new connection; the burst that reaches t.burst arms the
// check.
func (t *trimmer) conn() {
	if n := t.opened.Add(1); n >= t.burst && t.armed.CompareAndSwap(false, true) {
		t.mark = n
		time.AfterFunc(t.quiet, t.check)
	}
}

func (t *trimmer) check() {
	if n := t.opened.Load(); n-t.mark >= t.burst/8 { // still busy
		t.mark = n
		time.AfterFunc(t.quiet, t.check)
		return
	}
	t.opened.Store(0)
	t.trim()
	t.armed.Store(false)
}
