//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/relay-gw/relay/internal/wake"
	"golang.org/x/sys/unix"
)

// Pins of the sockmap splice. The relay user owns the maps it writes.
const (
	pinSpliceSocks = "splice_socks"
	pinSpliceCfg   = "splice_cfg"
	pinSpliceStat  = "splice_stat"
	pinSpliceBytes = "spliced_bytes"
)

var splicePins = []string{pinSpliceSocks, pinSpliceCfg, pinSpliceStat, pinSpliceBytes}

// DefaultSpliceLimit bounds the bytes in flight from one socket to its
// peer (redirected but not yet acknowledged). Past it the kernel stops
// redirecting and the socket's own receive window closes, so a connection
// holds at most this plus its receive buffer, whatever its peers do.
const DefaultSpliceLimit = 2 << 20

// SpliceSupported reports whether this kernel can run the sockmap splice.
func SpliceSupported() error {
	if !kernelAtLeast(6, 8) {
		return errors.New("the sockmap splice needs Linux 6.8+ (SIOCINQ on sockmap sockets); this kernel relays with splice(2)")
	}
	spec, err := loadSplice()
	if err != nil {
		return err
	}
	var objs spliceObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return fmt.Errorf("kernel cannot load the sockmap splice verdict (SOCKHASH, sk_skb, bpf_skc_to_tcp_sock: Linux 5.9+ with BTF): %w", err)
	}
	return objs.Close()
}

// applySplice loads the sockmap splice into pinDir (want) or removes it.
// Re-applying attaches the new verdict to the pinned SOCKHASH, which
// replaces the old one for sockets inserted from then on; spliced
// connections keep theirs until they end.
func applySplice(pinDir string, want bool, uid, gid int) error {
	if !want {
		return removePins(pinDir, splicePins)
	}
	spec, err := loadSplice()
	if err != nil {
		return fmt.Errorf("load BPF object: %w", err)
	}
	var maps map[string]*ebpf.Map
	if _, err := os.Stat(filepath.Join(pinDir, pinSpliceSocks)); err == nil {
		var closeAll func()
		if maps, closeAll, err = openPinned(pinDir, splicePins...); err != nil {
			return err
		}
		defer closeAll()
	}
	var objs spliceObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return fmt.Errorf("load sockmap splice verdict: %w", err)
	}
	defer objs.Close()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  objs.SpliceSocks.FD(),
		Program: objs.SpliceVerdict,
		Attach:  ebpf.AttachSkSKBStreamVerdict,
	}); err != nil {
		return fmt.Errorf("attach sockmap splice verdict: %w", err)
	}
	if len(maps) > 0 {
		for _, name := range []string{pinSpliceSocks, pinSpliceCfg, pinSpliceStat} {
			if err := os.Chown(filepath.Join(pinDir, name), uid, gid); err != nil {
				return fmt.Errorf("chown pin %s: %w", name, err)
			}
		}
		return nil
	}
	err = pinAll(pinDir, []pinned{
		{pinSpliceCfg, objs.SpliceCfg.Pin, uid, gid, 0o600},
		{pinSpliceStat, objs.SpliceStat.Pin, uid, gid, 0o600},
		{pinSpliceBytes, objs.SplicedBytes.Pin, 0, 0, 0o644},
		{pinSpliceSocks, objs.SpliceSocks.Pin, uid, gid, 0o600}, // last: its presence means complete
	})
	if err != nil {
		removePins(pinDir, splicePins)
	}
	return err
}

// readSplicedBytes sums the per-CPU counters: client → upstream, upstream → client.
func readSplicedBytes(m *ebpf.Map) (up, down uint64, err error) {
	for i, dst := range []*uint64{&up, &down} {
		var per []uint64
		if err := m.Lookup(uint32(i), &per); err != nil {
			return 0, 0, fmt.Errorf("read spliced bytes: %w", err)
		}
		for _, v := range per {
			*dst += v
		}
	}
	return up, down, nil
}

// kernelAtLeast compares the running kernel's release with major.minor.
func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return false
	}
	var ma, mi int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

// ErrSpliceNotLoaded: no sockmap splice pinned.
var ErrSpliceNotLoaded = errors.New("BPF sockmap splice is not loaded (set `splice: sockmap` and run `relayctl rules apply` with steer.bpf: auto or on)")

// Splicer is the relay's (unprivileged) handle on the pinned sockmap
// splice: it hands connection pairs to the kernel.
type Splicer struct {
	socks, cfg, stat, bytes *ebpf.Map
	// Limit is the per-socket bound on bytes in flight (DefaultSpliceLimit).
	Limit uint32
	bufs  sync.Pool
	poll  poller
	// workers are the running copy workers; Close waits for them.
	workers sync.WaitGroup
	// inUse is held (shared) by each pair's finish, which may run on
	// after done, so that Close releases the maps only after it.
	inUse    sync.RWMutex
	released bool // the maps are closed (under inUse)
}

// OpenSplicer opens the splice pins in pinDir; ErrSpliceNotLoaded when absent.
func OpenSplicer(pinDir string) (*Splicer, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if !kernelAtLeast(6, 8) {
		return nil, errors.New("the sockmap splice needs Linux 6.8+; relaying with splice(2)")
	}
	s := &Splicer{Limit: DefaultSpliceLimit}
	s.bufs.New = func() any { b := make([]byte, 64<<10); return &b }
	for _, p := range []struct {
		name string
		m    **ebpf.Map
		ro   bool
	}{{pinSpliceSocks, &s.socks, false}, {pinSpliceCfg, &s.cfg, false}, {pinSpliceStat, &s.stat, false}, {pinSpliceBytes, &s.bytes, true}} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, p.name), &ebpf.LoadPinOptions{ReadOnly: p.ro})
		if err != nil {
			s.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, ErrSpliceNotLoaded
			}
			return nil, fmt.Errorf("open pinned %s (is it owned by this user? `rules apply` chowns it to the config's user): %w", filepath.Join(pinDir, p.name), err)
		}
		*p.m = m
	}
	return s, nil
}

// Close ends every spliced pair (closing its sockets), waits for their
// workers, and releases the maps.
func (s *Splicer) Close() error {
	s.poll.mu.Lock()
	var pairs []*pair
	for p := range s.poll.pairs {
		pairs = append(pairs, p)
	}
	s.poll.mu.Unlock()
	for _, p := range pairs {
		p.finish(net.ErrClosed)
	}
	s.workers.Wait()
	s.poll.close()
	s.inUse.Lock()
	defer s.inUse.Unlock()
	s.released = true
	for _, m := range []*ebpf.Map{s.socks, s.cfg, s.stat, s.bytes} {
		if m != nil {
			m.Close()
		}
	}
	return nil
}

// SplicedBytes reports the bytes redirected in the kernel, all connections.
func (s *Splicer) SplicedBytes() (up, down uint64, err error) { return readSplicedBytes(s.bytes) }

// ErrSpliceFallback means the pair was not handed to the kernel and
// nothing was written or read: the caller should relay it another way.
var ErrSpliceFallback = fmt.Errorf("sockmap splice not possible for this connection: %w", errors.ErrUnsupported)

// end is one socket of a spliced pair, held by a descriptor of the
// pair's own: the caller's *net.TCPConn is closed once the pair is armed,
// so an idle pair keeps none of the Go runtime's per-socket state (netFD,
// poll descriptor, netpoller registration). Its methods run only while
// the pair is held (pair.hold), which keeps fd from being closed and its
// number reused under them.
type end struct {
	fd     int
	cookie uint64
}

// newEnd duplicates c's descriptor; the copy shares the socket and its
// non-blocking mode.
func newEnd(c *net.TCPConn) (*end, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	e := &end{fd: -1}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if e.cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE); serr != nil {
			serr = fmt.Errorf("socket cookie: %w", serr)
			return
		}
		if e.fd, serr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0); serr != nil {
			e.fd = -1
			serr = fmt.Errorf("dup socket: %w", serr)
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return nil, err
	}
	return e, nil
}

func (e *end) close() {
	if e != nil && e.fd >= 0 {
		unix.Close(e.fd)
		e.fd = -1
	}
}

// inq is the bytes waiting in the socket's receive queue.
func (e *end) inq() int {
	n, err := unix.IoctlGetInt(e.fd, unix.SIOCINQ)
	if err != nil {
		return -1
	}
	return n
}

// queued is every byte ever written into the socket: acknowledged plus
// still in the send queue. TCP_INFO is read first, so an ACK landing in
// between makes it an underestimate, never an over one.
func (e *end) queued() (uint64, error) {
	acked, err := e.acked()
	if err != nil {
		return 0, err
	}
	outq, err := unix.IoctlGetInt(e.fd, unix.SIOCOUTQ)
	if err != nil {
		return 0, err
	}
	return acked + uint64(outq), nil
}

// write writes all of b, waiting for room in the send queue (in steps,
// so that a pair ended meanwhile stops it).
func (p *pair) write(e *end, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(e.fd, b)
		if n > 0 {
			b = b[n:]
		}
		switch {
		case err == unix.EAGAIN:
			if p.closed.Load() {
				return net.ErrClosed
			}
			unix.Poll([]unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLOUT}}, 50)
		case err != nil && err != unix.EINTR:
			return err
		}
	}
	return nil
}

// Splice hands client and upstream to the kernel: bytes go from one to
// the other without entering this process until a peer stops reading
// (then the process copies, bounded by its in-flight limit). pre is
// written to upstream first (the peeked ClientHello). Splice returns once
// the pair is armed; done is called once, from another goroutine, when
// both directions have ended (with the bytes moved each way, pre not
// included), or the pair failed, went idle for idle, or ctx was canceled.
// No goroutine waits on an armed pair: one poller watches every handed-off
// socket and starts a short-lived worker only when the verdict passed
// something (data under pressure, or the FIN).
//
// On success the pair owns both sockets: client and upstream are closed
// at once (the sockets live on under descriptors of the pair's own, which
// it closes when it ends, removing them from the SOCKHASH).
//
// ErrSpliceFallback: nothing happened, relay the pair another way. Any
// other error: the pair is unusable and done is not called.
func (s *Splicer) Splice(ctx context.Context, client, upstream *net.TCPConn, pre []byte, idle time.Duration, done func(up, down int64, err error)) error {
	ce, err := newEnd(client)
	if err != nil {
		return errors.Join(ErrSpliceFallback, err)
	}
	ue, err := newEnd(upstream)
	if err != nil {
		ce.close()
		return errors.Join(ErrSpliceFallback, err)
	}
	// Bytes already queued on a socket when it is inserted bypass the
	// verdict's bookkeeping; a client that sent more than its hello
	// (0-RTT) is relayed by splice(2).
	if ce.inq() != 0 || ue.inq() != 0 {
		ce.close()
		ue.close()
		return ErrSpliceFallback
	}
	if err := s.poll.init(); err != nil {
		ce.close()
		ue.close()
		return errors.Join(ErrSpliceFallback, err)
	}
	p := &pair{s: s, idle: idle, a: ce, b: ue, done: done}
	p.refs.Store(1)
	p.up = &dir{p: p, src: ce, dst: ue, cfg: spliceSpliceCfg{Peer: ue.cookie, Written: uint64(len(pre)), Limit: s.Limit, Dir: 0}}
	p.down = &dir{p: p, src: ue, dst: ce, cfg: spliceSpliceCfg{Peer: ce.cookie, Limit: s.Limit, Dir: 1}}
	// The upstream goes in before it has the hello, so it is quiet: its
	// answer can only come through the verdict.
	if err := s.arm(p); err != nil {
		s.forgetMaps(p)
		ce.close()
		ue.close()
		return errors.Join(ErrSpliceFallback, err)
	}
	// Watched before the hello goes out: until then neither side can
	// have anything to say (the client waits for the server's answer), so
	// no wake-up is missed.
	p.stop = context.AfterFunc(ctx, func() { p.finish(context.Cause(ctx)) })
	if err := s.poll.watch(p); err != nil {
		p.stop()
		s.forgetMaps(p)
		ce.close()
		ue.close()
		return errors.Join(ErrSpliceFallback, err)
	}
	upstream.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := upstream.Write(pre); err != nil {
		// A worker may already be finishing the pair (reset): only one
		// of them reports; done must not run for a pair returned as failed.
		if p.abandon() {
			return fmt.Errorf("replay hello: %w", err)
		}
		return nil
	}
	// From here the pair's own descriptors carry the sockets.
	client.Close()
	upstream.Close()
	return nil
}

// hold keeps the pair's descriptors open until the matching drop; false
// once the pair has ended and let them go.
func (p *pair) hold() bool {
	for {
		n := p.refs.Load()
		if n == 0 {
			return false
		}
		if p.refs.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// drop ends a hold; the last one, after finish, closes the sockets and
// then drops their stat entries: the verdict writes to those until the
// sockets leave the SOCKHASH, and a value deleted while a verdict still
// wrote to it would be recycled into another pair's entry.
func (p *pair) drop() {
	if p.refs.Add(-1) != 0 {
		return
	}
	p.a.close()
	p.b.close()
	p.s.inUse.RLock()
	defer p.s.inUse.RUnlock()
	if !p.s.released {
		deleteKeys(p.s.stat, p.keys())
	}
}

// abandon ends the pair without calling done; false when it had already
// ended (done was or will be called).
func (p *pair) abandon() bool {
	abandoned := false
	p.once.Do(func() {
		abandoned = true
		p.closed.Store(true)
		p.s.poll.forget(p)
		p.stop()
		p.s.forgetMaps(p)
		p.drop()
	})
	return abandoned
}

// arm creates both sockets' bookkeeping, then inserts them (in that
// order: the verdict passes sockets it has no entry for). One batch per
// map: every syscall counts on a short connection.
func (s *Splicer) arm(p *pair) error {
	keys := p.keys()
	if _, err := s.stat.BatchUpdate(keys, []spliceSpliceStat{{}, {}}, nil); err != nil {
		return fmt.Errorf("splice stat: %w", err)
	}
	if _, err := s.cfg.BatchUpdate(keys, []spliceSpliceCfg{p.up.cfg, p.down.cfg}, nil); err != nil {
		return fmt.Errorf("splice cfg: %w", err)
	}
	for _, d := range []*dir{p.up, p.down} {
		if err := s.socks.Put(d.src.cookie, uint64(d.src.fd)); err != nil {
			return fmt.Errorf("insert socket into the splice SOCKHASH: %w", err)
		}
	}
	return nil
}

// keys are the map keys of the pair's sockets: up's source, then down's.
func (p *pair) keys() []uint64 { return []uint64{p.up.src.cookie, p.down.src.cookie} }

// forgetMaps removes the pair from every map, entry by entry (a batch
// stops at the first missing key): for pairs that failed to arm or were
// abandoned, whose sockets stay open or were partly inserted.
func (s *Splicer) forgetMaps(p *pair) {
	for _, e := range []*end{p.a, p.b} {
		s.socks.Delete(e.cookie)
		s.cfg.Delete(e.cookie)
		s.stat.Delete(e.cookie)
	}
}

// poller watches the sockets of every spliced pair with one epoll set
// (beside the Go runtime's own), edge-triggered: a wake-up means the
// verdict passed something, the FIN came, or an error. The set's own
// descriptor sits in the runtime's netpoller, so the loop parks like any
// network read instead of holding a thread in epoll_wait (a thread blocked
// in a syscall keeps the runtime's sysmon waking every 20 µs).
type poller struct {
	once  sync.Once
	err   error
	epfd  int
	ep    *os.File // epfd, registered with the netpoller
	shut  atomic.Bool
	mu    sync.Mutex
	dirs  map[int32]*dir
	pairs map[*pair]time.Time // next idle check
}

func (pl *poller) init() error {
	pl.once.Do(func() {
		pl.epfd, pl.err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if pl.err != nil {
			pl.err = fmt.Errorf("epoll: %w", pl.err)
			return
		}
		// Non-blocking, so that os.NewFile registers it with the netpoller.
		if err := unix.SetNonblock(pl.epfd, true); err != nil {
			unix.Close(pl.epfd)
			pl.err = fmt.Errorf("epoll: %w", err)
			return
		}
		pl.ep = os.NewFile(uintptr(pl.epfd), "splice-epoll")
		if err := pl.ep.SetReadDeadline(time.Time{}); err != nil {
			pl.ep.Close()
			pl.err = fmt.Errorf("epoll set not pollable: %w", err)
			return
		}
		pl.dirs = map[int32]*dir{}
		pl.pairs = map[*pair]time.Time{}
		go pl.loop()
	})
	return pl.err
}

// close ends the loop and releases the epoll set.
func (pl *poller) close() {
	pl.once.Do(func() { pl.err = net.ErrClosed }) // no set made after this
	pl.shut.Store(true)
	if pl.ep != nil {
		pl.ep.Close()
	}
}

func (pl *poller) watch(p *pair) error {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for i, d := range []*dir{p.up, p.down} {
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(d.src.fd)}
		if err := unix.EpollCtl(pl.epfd, unix.EPOLL_CTL_ADD, d.src.fd, &ev); err != nil {
			if i == 1 {
				unix.EpollCtl(pl.epfd, unix.EPOLL_CTL_DEL, p.up.src.fd, nil)
				delete(pl.dirs, int32(p.up.src.fd))
			}
			return fmt.Errorf("epoll add: %w", err)
		}
		pl.dirs[int32(d.src.fd)] = d
	}
	pl.pairs[p] = time.Now().Add(idleCheck(p.idle))
	return nil
}

// forget stops watching p; called before its sockets are closed, so a
// descriptor number reused later never reaches p.
func (pl *poller) forget(p *pair) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if _, ok := pl.pairs[p]; !ok {
		return
	}
	for _, d := range []*dir{p.up, p.down} {
		unix.EpollCtl(pl.epfd, unix.EPOLL_CTL_DEL, d.src.fd, nil)
		delete(pl.dirs, int32(d.src.fd))
	}
	delete(pl.pairs, p)
}

func idleCheck(idle time.Duration) time.Duration {
	return min(max(idle/4, time.Second), time.Minute)
}

func (pl *poller) loop() {
	events := make([]unix.EpollEvent, 256)
	var ready []*dir
	var swept time.Time
	rc, err := pl.ep.SyscallConn()
	if err != nil {
		return // closed already
	}
	for {
		// Wakes at least once a second for the idle sweep.
		pl.ep.SetReadDeadline(time.Now().Add(time.Second))
		var n int
		err := rc.Read(func(fd uintptr) bool {
			var werr error
			for {
				n, werr = unix.EpollWait(int(fd), events, 0)
				if werr != unix.EINTR {
					break
				}
			}
			if werr != nil {
				n = 0
			}
			return n > 0 // none: park until the set is readable
		})
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			if pl.shut.Load() {
				return
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		now := time.Now()
		// Idle checks are due at most once a second (idleCheck's
		// granularity): scanning every pair on each wake-up would put
		// O(pairs) work on the data path.
		sweep := now.Sub(swept) >= time.Second
		var idle []*pair
		pl.mu.Lock()
		for i := 0; i < n; i++ {
			if d := pl.dirs[events[i].Fd]; d != nil {
				ready = append(ready, d)
			}
		}
		if sweep {
			swept = now
			for p, next := range pl.pairs {
				if now.After(next) {
					pl.pairs[p] = now.Add(idleCheck(p.idle))
					idle = append(idle, p)
				}
			}
		}
		pl.mu.Unlock()
		for _, d := range ready {
			d.schedule()
		}
		clear(ready)
		ready = ready[:0]
		for _, p := range idle {
			if !p.hold() {
				continue
			}
			quiet := idleFor(p.a) >= p.idle && idleFor(p.b) >= p.idle
			p.drop()
			if quiet {
				p.finish(ErrIdle)
			}
		}
	}
}

// pair is a client and an upstream socket handed to the kernel.
type pair struct {
	s        *Splicer
	idle     time.Duration
	a, b     *end
	up, down *dir
	closed   atomic.Bool
	refs     atomic.Int32 // holds on a and b's descriptors (finish drops the first)
	once     sync.Once
	done     func(up, down int64, err error)
	stop     func() bool
}

// ErrIdle ends a spliced pair on which neither side received data for the idle timeout.
var ErrIdle = errors.New("idle timeout")

// finish ends the pair once: the poller forgets it, the maps drop it,
// done gets the byte counts, and its sockets are closed (by the last
// holder, when a worker still has them).
func (p *pair) finish(err error) {
	p.once.Do(func() {
		if finishHook != nil {
			finishHook(p, err)
		}
		p.s.inUse.RLock()
		p.closed.Store(true)
		p.s.poll.forget(p)
		if p.stop != nil {
			p.stop()
		}
		// Without their cfg the verdict passes whatever still comes and
		// leaves the stat alone; the stat goes with the sockets (drop).
		deleteKeys(p.s.cfg, p.keys())
		up, down := p.up.bytes(), p.down.bytes()
		p.s.inUse.RUnlock()
		if errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
			err = nil
		}
		p.drop()
		p.done(int64(up), int64(down), err)
	})
}

// deleteKeys removes keys from m in one batch, or one by one when the
// batch stopped at a key already gone (the LRU may have evicted it).
func deleteKeys(m *ebpf.Map, keys []uint64) {
	if n, err := m.BatchDelete(keys, nil); err != nil && n < len(keys) {
		for _, k := range keys[n:] {
			m.Delete(k)
		}
	}
}

// finishHook, when set (tests), sees why each pair ends, before the
// error is mapped.
var finishHook func(p *pair, err error)

// copyHook, when set (tests), sees every chunk the process copies.
var copyHook func(d *dir, b []byte)

// dir is one direction of a pair: bytes arriving on src go to dst.
type dir struct {
	p        *pair
	src, dst *end
	cfg      spliceSpliceCfg // the worker's; written to the map after each copy
	copied   atomic.Uint64   // by the process (under pressure)
	worker   wake.Worker
	ended    atomic.Bool // FIN passed on
}

// bytes returns the bytes of this direction: redirected in the kernel
// plus copied by the process.
func (d *dir) bytes() uint64 {
	var st spliceSpliceStat
	d.p.s.stat.Lookup(d.src.cookie, &st)
	return st.Redirected + d.copied.Load()
}

// schedule runs a worker for d, or tells the running one to look again.
func (d *dir) schedule() {
	if d.worker.Wake() {
		d.p.s.workers.Add(1)
		go d.work()
	}
}

func (d *dir) work() {
	defer d.p.s.workers.Done()
	held := d.p.hold()
	if held {
		defer d.p.drop()
	}
	for {
		if held && !d.ended.Load() && !d.p.closed.Load() {
			d.process()
		}
		if d.worker.Done() {
			return
		}
	}
}

// process copies what the verdict passed (never more, so it cannot take
// bytes the verdict has not seen) to dst once every redirected byte is in
// dst's send queue, so nothing is reordered, and passes the half-close on
// after the same drain. It returns when nothing more is ready.
func (d *dir) process() {
	p := d.p
	for {
		// Read only from the socket's sockmap queue, every byte of which
		// the verdict passed (SIOCINQ reports its length on a sockmap
		// socket, Linux 6.8+). With it empty, recv would fall back to the
		// TCP receive queue, whose head the verdict may not have seen
		// yet, and a partial read there makes the kernel deliver those
		// bytes twice. Most wake-ups are for redirected bytes: this ioctl
		// and a poll are all they cost.
		if queued := d.src.inq(); queued > 0 {
			buf := p.s.bufs.Get().(*[]byte)
			var (
				n    int
				rerr error
			)
			n, rerr = unix.Read(d.src.fd, (*buf)[:min(len(*buf), queued)])
			switch {
			case rerr == unix.EAGAIN || rerr == unix.EINTR:
				p.s.bufs.Put(buf)
				return
			case rerr != nil:
				p.s.bufs.Put(buf)
				p.finish(rerr)
				return
			case n == 0:
				p.s.bufs.Put(buf)
				p.finish(errors.New("sockmap splice: the socket ended before the bytes its verdict passed"))
				return
			}
			if copyHook != nil {
				copyHook(d, (*buf)[:n])
			}
			err := p.drain(d, 0)
			if err == nil {
				err = p.room(d, uint64(n))
			}
			if err == nil {
				err = p.write(d.dst, (*buf)[:n])
			}
			p.s.bufs.Put(buf)
			if err != nil {
				p.finish(err)
				return
			}
			d.copied.Add(uint64(n))
			d.cfg.Written += uint64(n)
			d.cfg.Consumed += uint64(n)
			if err := p.s.cfg.Update(d.src.cookie, d.cfg, ebpf.UpdateExist); err != nil {
				p.finish(fmt.Errorf("splice cfg: %w", err))
				return
			}
			continue
		}
		// Nothing passed: the FIN, an error, or a wake-up for redirected bytes.
		var (
			revents int16
			soErr   int
		)
		pfd := []unix.PollFd{{Fd: int32(d.src.fd), Events: unix.POLLRDHUP}}
		if k, _ := unix.Poll(pfd, 0); k > 0 {
			revents = pfd[0].Revents
		}
		if revents&unix.POLLERR != 0 {
			soErr, _ = unix.GetsockoptInt(d.src.fd, unix.SOL_SOCKET, unix.SO_ERROR)
		}
		switch {
		case revents&(unix.POLLERR|unix.POLLNVAL) != 0:
			// Reset: what src redirected before still goes out first.
			p.drain(d, time.Second)
			err := error(syscall.ECONNRESET)
			if soErr != 0 {
				err = syscall.Errno(soErr)
			}
			p.finish(err)
		case revents&(unix.POLLRDHUP|unix.POLLHUP) != 0:
			// The half-close shows before the verdict has run on the
			// segment that carried the FIN (often the last data):
			// SIOCINQ takes the socket lock, held until it has, so the
			// stat read after it counts those bytes too.
			if d.src.inq() > 0 {
				continue
			}
			// The FIN comes after every byte before it was redirected or
			// passed; passed bytes may still be on their way to the
			// sockmap queue (their arrival wakes us again).
			var st spliceSpliceStat
			if err := p.s.stat.Lookup(d.src.cookie, &st); err != nil {
				p.finish(fmt.Errorf("splice stat: %w", err))
				return
			}
			if st.Passed != d.cfg.Consumed {
				return
			}
			if err := p.drainFrom(d, 0, &st); err != nil {
				p.finish(err)
				return
			}
			unix.Shutdown(d.dst.fd, unix.SHUT_WR)
			d.ended.Store(true)
			if p.up.ended.Load() && p.down.ended.Load() {
				p.finish(nil)
			}
		}
		return
	}
}

// drain waits until every byte redirected from d.src so far sits in
// d.dst's send queue (or was acknowledged), so that what the process
// writes next, or the FIN, comes after it. max > 0 bounds the wait.
func (p *pair) drain(d *dir, max time.Duration) error { return p.drainFrom(d, max, nil) }

// drainFrom is drain with src's stat already read (nil: not yet).
func (p *pair) drainFrom(d *dir, max time.Duration, st *spliceSpliceStat) error {
	return p.await(d, max, "redirected bytes not sent in time", st, func(redirected uint64) (bool, error) {
		q, err := d.dst.queued()
		return q >= redirected+d.cfg.Written, err
	})
}

// room waits until n more bytes keep d within its in-flight limit (bytes
// given to dst and not acknowledged), the bound the verdict applies to
// redirected bytes: the process's own copies obey it too, so a peer that
// never reads holds at most the limit plus src's receive buffer.
func (p *pair) room(d *dir, n uint64) error {
	return p.await(d, 0, "", nil, func(redirected uint64) (bool, error) {
		acked, err := d.dst.acked()
		return redirected+d.cfg.Written+n <= acked+uint64(d.cfg.Limit), err
	})
}

// await polls ready, given the bytes redirected from d.src so far, with
// a growing pause, until it holds, the pair ends, or max (> 0) passes.
// known is src's stat if just read (nil: read it first).
func (p *pair) await(d *dir, max time.Duration, timeout string, known *spliceSpliceStat, ready func(redirected uint64) (bool, error)) error {
	wait := 50 * time.Microsecond
	var until time.Time
	if max > 0 {
		until = time.Now().Add(max)
	}
	var st spliceSpliceStat
	if known != nil {
		st = *known
	}
	for read := known == nil; ; read = true {
		if read {
			if err := p.s.stat.Lookup(d.src.cookie, &st); err != nil {
				return fmt.Errorf("splice stat: %w", err)
			}
		}
		if ok, err := ready(st.Redirected); ok || err != nil {
			return err
		}
		if p.closed.Load() {
			return net.ErrClosed
		}
		if !until.IsZero() && time.Now().After(until) {
			return errors.New("sockmap splice: " + timeout)
		}
		time.Sleep(wait)
		wait = min(2*wait, 5*time.Millisecond)
	}
}

// acked is the bytes of the socket's stream the peer acknowledged.
func (e *end) acked() (uint64, error) {
	info, err := unix.GetsockoptTCPInfo(e.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, err
	}
	return info.Bytes_acked, nil
}

// idleFor is how long ago the socket last received data (tcp_info).
func idleFor(e *end) time.Duration {
	info, err := unix.GetsockoptTCPInfo(e.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0
	}
	return time.Duration(info.Last_data_recv) * time.Millisecond
}

// ReadSplicedBytes reads the kernel byte counters of the pinned sockmap
// splice (the pin is world-readable); ErrSpliceNotLoaded when absent.
func ReadSplicedBytes(pinDir string) (up, down uint64, err error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinSpliceBytes), &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, ErrSpliceNotLoaded
	}
	if err != nil {
		return 0, 0, fmt.Errorf("open pinned %s: %w", pinSpliceBytes, err)
	}
	defer m.Close()
	return readSplicedBytes(m)
}
