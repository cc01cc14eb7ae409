package relay

import (
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Every splice(2) of the relay goes through one process-wide pool of pipes
// that a direction holds only while bytes sit in it: never while it waits
// for its source. io.Copy between two *net.TCPConn is not used because
// Go's net package holds a pipe for every goroutine blocked in ReadFrom
// and parks released pipes in a sync.Pool that only garbage collection
// empties: ~4 pipe ends per idle passthrough connection, still open
// minutes after the connections closed.
//
// The pool is bounded (maxPipes): past it a direction copies through a
// small user-space buffer instead, so the relay's descriptors stay
// countable (pipeReserveFDs) whatever the traffic.

// maxPipes bounds the pipes open at once, idle or in use.
const maxPipes = 128

// pipeReserveFDs is what the pool may hold in descriptors.
const pipeReserveFDs = 2 * maxPipes

// maxIdlePipes bounds the empty pipes kept for reuse; each counts against
// the user's pipe buffer quota (fs.pipe-user-pages-soft) even while empty.
const maxIdlePipes = 16

// pipeIdle is how long an empty pipe is kept for reuse: after a burst the
// relay's open files go back to their baseline within it.
const pipeIdle = 2 * time.Second

type splicePipe struct {
	r, w int
	used time.Time // when it was last put back
}

func (p *splicePipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

type pipePool struct {
	mu    sync.Mutex
	idle  []*splicePipe // most recently used last
	open  int           // idle or in use
	timer *time.Timer   // closes pipes idle for pipeIdle; nil: none armed
	limit int           // maxPipes; tests lower it (setLimit)
}

var pipes = pipePool{limit: maxPipes}

// closeIdle closes the pipes kept for reuse: the process is out of
// descriptors.
func closeIdlePipes() {
	pipes.mu.Lock()
	n := pipes.limit
	pipes.mu.Unlock()
	pipes.setLimit(n)
}

// setLimit changes the bound and closes the idle pipes.
func (pp *pipePool) setLimit(n int) {
	pp.mu.Lock()
	old := pp.idle
	pp.idle, pp.limit = nil, n
	pp.open -= len(old)
	pp.mu.Unlock()
	for _, p := range old {
		p.close()
	}
}

// get returns an empty pipe, or nil when maxPipes are open (or the
// kernel refuses one): then the caller copies through a buffer.
func (pp *pipePool) get() *splicePipe {
	pp.mu.Lock()
	if n := len(pp.idle); n > 0 {
		p := pp.idle[n-1]
		pp.idle[n-1] = nil
		pp.idle = pp.idle[:n-1]
		pp.mu.Unlock()
		return p
	}
	if pp.open >= pp.limit || underFDPressure() {
		pp.mu.Unlock()
		return nil
	}
	pp.open++
	pp.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		pp.mu.Lock()
		pp.open--
		pp.mu.Unlock()
		return nil
	}
	// Fewer, larger splices; a smaller pipe (quota reached) still works.
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, maxSplice)
	return &splicePipe{r: fds[0], w: fds[1]}
}

// put returns an empty pipe.
func (pp *pipePool) put(p *splicePipe) {
	p.used = time.Now()
	pp.mu.Lock()
	if len(pp.idle) < maxIdlePipes {
		pp.idle = append(pp.idle, p)
		if pp.timer == nil {
			pp.timer = time.AfterFunc(pipeIdle, pp.trim)
		}
		pp.mu.Unlock()
		return
	}
	pp.open--
	pp.mu.Unlock()
	p.close()
}

// drop closes a pipe that may still hold bytes.
func (pp *pipePool) drop(p *splicePipe) {
	pp.mu.Lock()
	pp.open--
	pp.mu.Unlock()
	p.close()
}

// trim closes the pipes unused for pipeIdle and re-arms while any remain.
func (pp *pipePool) trim() {
	now := time.Now()
	pp.mu.Lock()
	var old []*splicePipe
	i := 0
	for i < len(pp.idle) && now.Sub(pp.idle[i].used) >= pipeIdle {
		i++
	}
	old = append(old, pp.idle[:i]...)
	pp.idle = append(pp.idle[:0], pp.idle[i:]...)
	pp.open -= len(old)
	pp.timer = nil
	if len(pp.idle) > 0 {
		pp.timer = time.AfterFunc(pipeIdle-now.Sub(pp.idle[0].used), pp.trim)
	}
	pp.mu.Unlock()
	for _, p := range old {
		p.close()
	}
}

// openPipes is the number of pipes open (tests).
func (pp *pipePool) openPipes() int {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return pp.open
}

// copyBufSize is the buffer of a direction that found no pipe.
const copyBufSize = 16 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// copyConn copies src to dst until src's EOF (nil error) or an error, as
// io.Copy between two *net.TCPConn does, with splice(2) through a pooled
// pipe taken only once src is readable. A read deadline on src ends it
// (os.ErrDeadlineExceeded) only between transfers.
func copyConn(dst, src *net.TCPConn) (int64, error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	var total int64
	for {
		var (
			p    *splicePipe
			buf  *[]byte
			n    int
			serr error
		)
		// The callback is the readiness probe: a pipe is taken, and
		// given back on EAGAIN before the goroutine parks.
		rerr := srcRC.Read(func(fd uintptr) bool {
			if p = pipes.get(); p != nil {
				n, serr = spliceRetry(int(fd), p.w, maxSplice)
				if serr == unix.EAGAIN {
					pipes.put(p)
					p = nil
					return false
				}
				return true
			}
			buf = copyBufs.Get().(*[]byte)
			for {
				n, serr = unix.Read(int(fd), *buf)
				if serr != unix.EINTR {
					break
				}
			}
			if serr == unix.EAGAIN {
				copyBufs.Put(buf)
				buf = nil
				return false
			}
			return true
		})
		if rerr == nil && serr != nil {
			rerr = os.NewSyscallError("read", serr)
		}
		if rerr != nil || n <= 0 {
			if p != nil {
				pipes.put(p)
			}
			if buf != nil {
				copyBufs.Put(buf)
			}
			if rerr != nil {
				return total, rerr
			}
			return total, nil // EOF
		}
		if buf != nil {
			m, werr := dst.Write((*buf)[:n])
			copyBufs.Put(buf)
			total += int64(m)
			if werr != nil {
				return total, werr
			}
			continue
		}
		left := n
		var werr error
		for left > 0 && werr == nil {
			var m int
			werr = dstRC.Write(func(fd uintptr) bool {
				m, serr = spliceRetry(p.r, int(fd), left)
				return serr != unix.EAGAIN
			})
			if werr == nil && serr != nil {
				werr = os.NewSyscallError("write", serr)
			}
			if werr == nil {
				left -= m
				total += int64(m)
			}
		}
		if werr != nil {
			pipes.drop(p) // may hold bytes
			return total, werr
		}
		pipes.put(p)
	}
}

// spliceRetry is one non-blocking splice(2), retried on EINTR.
func spliceRetry(in, out, n int) (int, error) {
	for {
		m, err := unix.Splice(in, nil, out, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if err != unix.EINTR {
			return int(m), err // m is int64 or int, by architecture
		}
	}
}
