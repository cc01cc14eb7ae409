package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relay-gw/relay/internal/wake"
	"golang.org/x/sys/unix"
)

// engine relays handed-off passthrough connections with splice(2) without
// a goroutine per connection: one epoll set watches every socket, and a
// short-lived worker moves a direction's bytes when its source becomes
// readable or, with bytes held in its pipe, its destination writable. An
// idle connection costs its sockets and ~0.5 KB of bookkeeping
// (BenchmarkEngineIdleMemory); with a blocked io.Copy per direction it
// cost two goroutine stacks (~8 KB).
//
// The epoll set's own descriptor sits in the runtime's netpoller, so the
// loop parks like any network read.
type engine struct {
	epfd     int
	ep       *os.File
	shut     atomic.Bool
	loopDone chan struct{}

	mu      sync.Mutex
	socks   map[int32]*engineSock
	pairs   map[*enginePair]time.Time // next idle check
	watches map[*engineWatch]struct{} // armed

	workers sync.WaitGroup
	ctx     context.Context
	stop    func() bool // the context registration
}

// engineSock is one watched socket: the direction it feeds and the one it
// drains, or a parked connection waiting for its next bytes.
type engineSock struct {
	src, dst *engineDir
	w        *engineWatch
}

// engineWatch is a connection parked without a goroutine (an idle
// keep-alive TLS connection) until its socket is readable.
type engineWatch struct {
	fd       int
	deadline time.Time // zero: none
	wr       watcher
	sock     *engineSock // in socks while the connection lives
}

// watcher is the parked connection.
type watcher interface {
	// parked reports whether the connection still wants the wake-up
	// (it was not closed meanwhile).
	parked() bool
	// ready is called once per watch, from the engine's loop: the
	// socket is readable (or the peer closed it), or timedOut when
	// the deadline passed first. It must not block.
	ready(timedOut bool)
}

// watch arms w for one wake-up. The socket stays in the epoll set between
// watches (re-armed, one syscall); unwatch must run before it is closed.
func (e *engine) watch(w *engineWatch) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.shut.Load() || e.ctx.Err() != nil {
		return net.ErrClosed
	}
	if !w.wr.parked() { // closed meanwhile: its closer has unwatched it
		return errNotParked
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(w.fd)}
	op := unix.EPOLL_CTL_MOD
	if w.sock == nil {
		op = unix.EPOLL_CTL_ADD
	}
	if err := unix.EpollCtl(e.epfd, op, w.fd, &ev); err != nil {
		return fmt.Errorf("epoll: %w", err)
	}
	if w.sock == nil {
		w.sock = &engineSock{w: w}
		e.socks[int32(w.fd)] = w.sock
	}
	e.watches[w] = struct{}{}
	return nil
}

// unwatch forgets w; its socket leaves the epoll set when it is closed.
func (e *engine) unwatch(w *engineWatch) {
	e.mu.Lock()
	if w.sock != nil && e.socks[int32(w.fd)] == w.sock {
		delete(e.socks, int32(w.fd))
	}
	delete(e.watches, w)
	e.mu.Unlock()
}

// newEngine starts an engine whose pairs all end when ctx is done (one
// registration for all: ~200 bytes less per connection than one each).
func newEngine(ctx context.Context) (*engine, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	// Non-blocking, so that os.NewFile registers it with the netpoller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll: %w", err)
	}
	e := &engine{epfd: epfd, ep: os.NewFile(uintptr(epfd), "relay-epoll"), loopDone: make(chan struct{}),
		socks: map[int32]*engineSock{}, pairs: map[*enginePair]time.Time{}, watches: map[*engineWatch]struct{}{}}
	if err := e.ep.SetReadDeadline(time.Time{}); err != nil {
		e.ep.Close()
		return nil, fmt.Errorf("epoll set not pollable: %w", err)
	}
	e.ctx = ctx
	go e.loop()
	e.stop = context.AfterFunc(ctx, func() { e.finishAll(context.Cause(ctx)) })
	return e, nil
}

// finishAll ends every pair with err.
func (e *engine) finishAll(err error) {
	e.mu.Lock()
	pairs := make([]*enginePair, 0, len(e.pairs))
	for p := range e.pairs {
		pairs = append(pairs, p)
	}
	e.mu.Unlock()
	for _, p := range pairs {
		p.finish(err)
	}
}

// close ends every pair (closing its sockets), waits for the workers and
// releases the epoll set (pipes go back to the process-wide pool).
func (e *engine) close() {
	e.stop()
	e.mu.Lock()
	e.shut.Store(true)
	e.mu.Unlock()
	e.finishAll(net.ErrClosed)
	// The loop ends before the wait, so that no wake-up starts a worker
	// during it.
	e.ep.Close()
	<-e.loopDone
	e.workers.Wait()
}

// splice hands client and upstream (the hello already replayed) to the
// engine and returns; done is called once, from another goroutine, when
// both directions ended (half-close passed on), one failed, neither side
// received data for idle, or the engine's context ended, with the bytes
// moved each way. done must close both sockets. upC and downC advance as
// bytes move.
func (e *engine) splice(client, upstream *net.TCPConn, idle time.Duration, upC, downC adder, done func(up, down int64, err error)) error {
	p := &enginePair{e: e, idle: idle, done: done}
	for i, c := range []*net.TCPConn{client, upstream} {
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var fd int
		if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
			return err
		}
		p.ends[i] = engineEnd{c: c, rc: rc, fd: fd}
	}
	a, b := &p.ends[0], &p.ends[1]
	p.up = engineDir{p: p, src: a, dst: b, c: upC}
	p.down = engineDir{p: p, src: b, dst: a, c: downC}
	e.mu.Lock()
	if e.shut.Load() || e.ctx.Err() != nil { // finishAll has run or will not see p
		e.mu.Unlock()
		return net.ErrClosed
	}
	// Edge-triggered: a wake-up means new bytes, new room, the FIN or an
	// error. Both sockets are quiet here (the upstream has the hello, the
	// client waits for its answer), and bytes that came before the add
	// are reported by it anyway.
	for i, s := range []*engineSock{{src: &p.up, dst: &p.down}, {src: &p.down, dst: &p.up}} {
		fd := p.ends[i].fd
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
		if err := unix.EpollCtl(e.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			if i == 1 {
				unix.EpollCtl(e.epfd, unix.EPOLL_CTL_DEL, a.fd, nil)
				delete(e.socks, int32(a.fd))
			}
			e.mu.Unlock()
			return fmt.Errorf("epoll add: %w", err)
		}
		e.socks[int32(fd)] = s
	}
	e.pairs[p] = time.Now().Add(idleCheck(idle))
	e.mu.Unlock()
	return nil
}

// idleCheck is how often a pair's idleness is looked at.
func idleCheck(idle time.Duration) time.Duration {
	return min(max(idle/4, time.Second), time.Minute)
}

func (e *engine) loop() {
	defer close(e.loopDone)
	rc, err := e.ep.SyscallConn()
	if err != nil {
		return
	}
	var (
		events = make([]unix.EpollEvent, 128)
		swept  time.Time
		run    []*engineDir
		idle   []*enginePair
		woken  []*engineWatch
		late   []*engineWatch
	)
	// One epoll_wait per wake-up: the callback handles what it finds and
	// asks to be called again when the set is next readable (the runtime
	// keeps a wake-up that comes while it runs), so the loop stays inside
	// Read except for the once-a-second sweep.
	handle := func(fd uintptr) bool {
		n, err := unix.EpollWait(int(fd), events, 0)
		if err != nil {
			// Called again from the top: events may be waiting, and
			// no new wake-up would come for them.
			if err != unix.EINTR {
				time.Sleep(10 * time.Millisecond) // a failing set: don't spin
			}
			return true
		}
		now := time.Now()
		e.mu.Lock()
		for _, ev := range events[:n] {
			s := e.socks[ev.Fd]
			if s == nil {
				continue
			}
			if s.w != nil {
				if _, armed := e.watches[s.w]; armed {
					delete(e.watches, s.w)
					woken = append(woken, s.w)
				}
				continue
			}
			if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
				run = append(run, s.src)
			}
			// Room matters only to a direction holding bytes (EPOLLOUT
			// comes with every event on a writable socket).
			if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 && s.dst.held.Load() {
				run = append(run, s.dst)
			}
		}
		if now.Sub(swept) >= time.Second {
			swept = now
			for p, next := range e.pairs {
				if now.After(next) {
					e.pairs[p] = now.Add(idleCheck(p.idle))
					idle = append(idle, p)
				}
			}
			for w := range e.watches {
				if !w.deadline.IsZero() && now.After(w.deadline) {
					delete(e.watches, w)
					late = append(late, w)
				}
			}
		}
		e.mu.Unlock()
		for _, w := range woken {
			w.wr.ready(false)
		}
		for _, w := range late {
			w.wr.ready(true)
		}
		for _, d := range run {
			d.runHere()
		}
		for _, p := range idle {
			if idleFor(p.ends[0].c) >= p.idle && idleFor(p.ends[1].c) >= p.idle {
				p.finish(ErrIdle)
			}
		}
		clear(run)
		clear(idle)
		clear(woken)
		clear(late)
		run, idle, woken, late = run[:0], idle[:0], woken[:0], late[:0]
		return n == len(events) // a full batch: more may wait
	}
	for {
		// The deadline wakes an idle loop for the sweep.
		e.ep.SetReadDeadline(time.Now().Add(time.Second))
		err := rc.Read(handle)
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			if e.shut.Load() {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// enginePair is a client (ends[0]) and its upstream (ends[1]).
type enginePair struct {
	e        *engine
	idle     time.Duration
	ends     [2]engineEnd
	up, down engineDir
	closed   atomic.Bool
	ended    atomic.Int32 // directions that passed their FIN on
	once     sync.Once
	done     func(up, down int64, err error)
}

type engineEnd struct {
	c  *net.TCPConn
	rc syscall.RawConn
	fd int // for epoll only; syscalls go through rc, which pins it
}

// finish ends the pair once: the engine forgets it, on error both sockets
// are closed, and done gets the byte counts. Workers see closed and drop
// their pipes.
func (p *enginePair) finish(err error) {
	p.once.Do(func() {
		p.closed.Store(true)
		e := p.e
		// The sockets leave the epoll set when they are closed, here
		// or by done's caller; events until then find no entry.
		e.mu.Lock()
		if _, ok := e.pairs[p]; ok {
			for _, end := range p.ends {
				delete(e.socks, int32(end.fd))
			}
			delete(e.pairs, p)
		}
		e.mu.Unlock()
		if err != nil {
			p.ends[0].c.Close()
			p.ends[1].c.Close()
		}
		// A worker holding a pipe releases it when it sees closed.
		p.up.schedule()
		p.down.schedule()
		if errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
			err = nil
		}
		p.done(p.up.moved.Load(), p.down.moved.Load(), err)
	})
}

// engineDir is one direction: bytes from src go through pipe to dst.
type engineDir struct {
	p        *enginePair
	src, dst *engineEnd
	c        adder
	pipe     *splicePipe // the worker's; nil while nothing is held
	buf      *[]byte     // the worker's, instead of pipe when the pool had none
	off      int         // the worker's: where buf's held bytes start
	inPipe   int         // the worker's: bytes held in pipe or buf
	eof      bool        // the worker's: src sent its FIN
	finned   bool        // the worker's: and it was passed on to dst
	held     atomic.Bool // bytes wait in pipe for room in dst
	moved    atomic.Int64
	worker   wake.Worker
}

// schedule runs a worker for d, or tells the running one to look again.
func (d *engineDir) schedule() {
	if d.worker.Wake() {
		d.p.e.workers.Add(1)
		go d.work()
	}
}

func (d *engineDir) work() {
	defer d.p.e.workers.Done()
	for {
		d.process(0)
		if d.worker.Done() {
			return
		}
	}
}

// hereBudget is the splice calls a wake-up may cost the loop itself:
// enough for a message (into the pipe, out, and the EAGAIN that ends it).
// Beyond it the direction goes on in a worker, so a bulk transfer cannot
// hold up the others.
const hereBudget = 4

// runHere does d's work in the loop's goroutine when it is small, which
// spares interactive traffic a goroutine hand-off per message; a running
// worker is told to look again instead.
func (d *engineDir) runHere() {
	if !d.worker.Wake() {
		return // the running worker looks again
	}
	d.p.e.workers.Add(1)
	for {
		if d.process(hereBudget) {
			go d.work() // inherits the running state and the Add
			return
		}
		if d.worker.Done() {
			d.p.e.workers.Done()
			return
		}
	}
}

// maxSplice bounds one splice(2) into the pipe (the pipe's size).
const maxSplice = 1 << 20

// process moves what src has to dst until src has nothing more or dst has
// no room, passes the FIN on after the last byte, and returns. With a
// budget (> 0) it stops after that many splice calls and reports whether
// it stopped early.
func (d *engineDir) process(budget int) (more bool) {
	p := d.p
	if p.closed.Load() {
		d.dropPipe()
		return false
	}
	if d.finned {
		return false
	}
	for calls := 0; ; calls++ {
		if p.closed.Load() {
			d.dropPipe()
			return false
		}
		if budget > 0 && calls >= budget {
			return true
		}
		if d.inPipe > 0 {
			// Set before the attempt: room that comes after it wakes us.
			d.held.Store(true)
			n, err := d.pump()
			if err == unix.EAGAIN {
				return false
			}
			if err != nil {
				p.finish(err)
				return false
			}
			d.inPipe -= n
			d.moved.Add(int64(n))
			if d.c != nil {
				d.c.Add(float64(n))
			}
			continue
		}
		d.held.Store(false)
		if d.eof {
			d.putPipe()
			d.finned = true
			d.dst.c.CloseWrite()
			if p.ended.Add(1) == 2 {
				p.finish(nil)
			}
			return false
		}
		if d.pipe == nil && d.buf == nil {
			// Taken only now that src has something (or its FIN).
			if d.pipe = pipes.get(); d.pipe == nil {
				d.buf, d.off = copyBufs.Get().(*[]byte), 0
			}
		}
		n, err := d.drain()
		switch {
		case err == unix.EAGAIN:
			d.putPipe()
			return false
		case err != nil:
			p.finish(err)
			return false
		case n == 0:
			d.eof = true
		default:
			d.inPipe += n
		}
	}
}

// drain moves from src into the pipe (or the buffer).
func (d *engineDir) drain() (int, error) {
	if d.pipe == nil {
		d.off = 0 // empty: inPipe is 0 here
		return rawIO(d.src.rc, func(fd int) (int, error) { return unix.Read(fd, *d.buf) })
	}
	return spliceSock(d.src.rc, func(sock int) (int, int) { return sock, d.pipe.w }, maxSplice)
}

// pump moves from the pipe (or the buffer) into dst.
func (d *engineDir) pump() (int, error) {
	if d.pipe == nil {
		n, err := rawIO(d.dst.rc, func(fd int) (int, error) { return unix.Write(fd, (*d.buf)[d.off:d.off+d.inPipe]) })
		if n > 0 {
			d.off += n
		}
		return n, err
	}
	return spliceSock(d.dst.rc, func(sock int) (int, int) { return d.pipe.r, sock }, d.inPipe)
}

// spliceSock moves up to n bytes between a pipe and the socket behind rc,
// which stays open for the call; ends orders them given the socket's fd.
func spliceSock(rc syscall.RawConn, ends func(sock int) (in, out int), n int) (int, error) {
	return rawIO(rc, func(fd int) (int, error) {
		in, out := ends(fd)
		return spliceRetry(in, out, n)
	})
}

// rawIO runs one non-blocking call on the socket behind rc (which stays
// open for it), retried on EINTR.
func rawIO(rc syscall.RawConn, f func(fd int) (int, error)) (int, error) {
	var (
		moved int
		err   error
	)
	cerr := rc.Control(func(fd uintptr) {
		for {
			moved, err = f(int(fd))
			if err != unix.EINTR {
				return
			}
		}
	})
	if cerr != nil {
		return 0, cerr
	}
	return moved, err
}

// putPipe gives back an empty pipe or buffer.
func (d *engineDir) putPipe() {
	if d.pipe != nil {
		pipes.put(d.pipe)
		d.pipe = nil
	}
	if d.buf != nil {
		copyBufs.Put(d.buf)
		d.buf, d.off = nil, 0
	}
}

// dropPipe releases what may still hold bytes of an ended pair.
func (d *engineDir) dropPipe() {
	d.held.Store(false)
	if d.pipe != nil && d.inPipe > 0 {
		pipes.drop(d.pipe)
		d.pipe = nil
	}
	d.putPipe()
	d.inPipe = 0
}
