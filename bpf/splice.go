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
	maps := map[string]*ebpf.Map{}
	if _, err := os.Stat(filepath.Join(pinDir, pinSpliceSocks)); err == nil {
		for _, name := range splicePins {
			m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
			if err != nil {
				return fmt.Errorf("open pinned %s (remove %s to start over): %w", name, pinDir, err)
			}
			defer m.Close()
			maps[name] = m
		}
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
	pins := []struct {
		name     string
		m        *ebpf.Map
		uid, gid int
		mode     os.FileMode
	}{
		{pinSpliceCfg, objs.SpliceCfg, uid, gid, 0o600},
		{pinSpliceStat, objs.SpliceStat, uid, gid, 0o600},
		{pinSpliceBytes, objs.SplicedBytes, 0, 0, 0o644},
		{pinSpliceSocks, objs.SpliceSocks, uid, gid, 0o600}, // last: its presence means complete
	}
	for _, p := range pins {
		path := filepath.Join(pinDir, p.name)
		if err := p.m.Pin(path); err != nil {
			removePins(pinDir, splicePins)
			return fmt.Errorf("pin %s: %w", p.name, err)
		}
		if err := os.Chown(path, p.uid, p.gid); err != nil {
			removePins(pinDir, splicePins)
			return fmt.Errorf("chown pin %s: %w", p.name, err)
		}
		if err := os.Chmod(path, p.mode); err != nil {
			removePins(pinDir, splicePins)
			return fmt.Errorf("chmod pin %s: %w", p.name, err)
		}
	}
	return nil
}

func removePins(dir string, names []string) error {
	var errs []error
	for _, name := range names {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
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

// ErrSpliceNotLoaded: no sockmap splice pinned.
var ErrSpliceNotLoaded = errors.New("BPF sockmap splice is not loaded (set `splice: sockmap` and run `relayctl rules apply` with steer.bpf: auto or on)")

// Splicer is the relay's (unprivileged) handle on the pinned sockmap
// splice: it hands connection pairs to the kernel.
type Splicer struct {
	socks, cfg, stat, bytes *ebpf.Map
	// Limit is the per-socket bound on bytes in flight (DefaultSpliceLimit).
	Limit uint32
	bufs  sync.Pool
}

// OpenSplicer opens the splice pins in pinDir; ErrSpliceNotLoaded when absent.
func OpenSplicer(pinDir string) (*Splicer, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
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

// Close releases the maps.
func (s *Splicer) Close() error {
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

// end is one socket of a spliced pair.
type end struct {
	c      *net.TCPConn
	rc     syscall.RawConn
	fd     int
	cookie uint64
}

func newEnd(c *net.TCPConn) (*end, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	e := &end{c: c, rc: rc}
	var serr error
	err = rc.Control(func(fd uintptr) {
		e.fd = int(fd)
		e.cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return nil, fmt.Errorf("socket cookie: %w", err)
	}
	return e, nil
}

// inq is the bytes waiting in the socket's receive queue.
func (e *end) inq() int {
	n := -1
	e.rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	return n
}

// queued is every byte ever written into the socket: acknowledged plus
// still in the send queue. TCP_INFO is read first, so an ACK landing in
// between makes it an underestimate, never an over one.
func (e *end) queued() (uint64, error) {
	var (
		info *unix.TCPInfo
		outq int
		err  error
	)
	cerr := e.rc.Control(func(fd uintptr) {
		if info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err != nil {
			return
		}
		outq, err = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
	})
	if cerr != nil {
		return 0, cerr
	}
	if err != nil {
		return 0, err
	}
	return info.Bytes_acked + uint64(outq), nil
}

// Splice hands client and upstream to the kernel: bytes go from one to
// the other without entering this process until a peer stops reading
// (then the process copies, bounded by a blocking write). pre is written
// to upstream first (the peeked ClientHello). It returns when both
// directions ended, with the bytes moved each way (pre not included).
// ErrSpliceFallback: nothing happened, relay the pair another way.
func (s *Splicer) Splice(ctx context.Context, client, upstream *net.TCPConn, pre []byte, idle time.Duration) (up, down int64, err error) {
	ce, err := newEnd(client)
	if err != nil {
		return 0, 0, errors.Join(ErrSpliceFallback, err)
	}
	ue, err := newEnd(upstream)
	if err != nil {
		return 0, 0, errors.Join(ErrSpliceFallback, err)
	}
	// Bytes already queued on a socket when it is inserted bypass the
	// verdict's bookkeeping; a client that sent more than its hello
	// (0-RTT) is relayed by splice(2).
	if ce.inq() != 0 || ue.inq() != 0 {
		return 0, 0, ErrSpliceFallback
	}
	cfgUp := spliceSpliceCfg{Peer: ue.cookie, Written: uint64(len(pre)), Limit: s.Limit, Dir: 0}
	cfgDown := spliceSpliceCfg{Peer: ce.cookie, Limit: s.Limit, Dir: 1}
	cleanup := func() {
		for _, e := range []*end{ce, ue} {
			s.socks.Delete(e.cookie)
			s.cfg.Delete(e.cookie)
			s.stat.Delete(e.cookie)
		}
	}
	if err := s.arm(ce, cfgUp); err != nil {
		cleanup()
		return 0, 0, errors.Join(ErrSpliceFallback, err)
	}
	// The upstream goes in before it has the hello, so it is quiet: its
	// answer can only come through the verdict. Until the client is in
	// too, that answer is passed and waits for the copier below.
	if err := s.arm(ue, cfgDown); err != nil {
		cleanup()
		return 0, 0, errors.Join(ErrSpliceFallback, err)
	}
	defer cleanup()
	upstream.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := upstream.Write(pre); err != nil {
		return 0, 0, fmt.Errorf("replay hello: %w", err)
	}
	upstream.SetWriteDeadline(time.Time{})

	p := &pair{s: s, idle: idle, a: ce, b: ue}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		down = p.copy(ue, ce, &cfgDown)
	}()
	up = p.copy(ce, ue, &cfgUp)
	wg.Wait()
	return up, down, p.err()
}

// arm creates the socket's bookkeeping, then inserts it (in that order:
// the verdict passes sockets it has no entry for).
func (s *Splicer) arm(e *end, cfg spliceSpliceCfg) error {
	if err := s.stat.Put(e.cookie, spliceSpliceStat{}); err != nil {
		return fmt.Errorf("splice stat: %w", err)
	}
	if err := s.cfg.Put(e.cookie, cfg); err != nil {
		return fmt.Errorf("splice cfg: %w", err)
	}
	if err := s.socks.Put(e.cookie, uint64(e.fd)); err != nil {
		return fmt.Errorf("insert socket into the splice SOCKHASH: %w", err)
	}
	return nil
}

type pair struct {
	s      *Splicer
	idle   time.Duration
	a, b   *end
	once   sync.Once
	first  error
	closed atomic.Bool
}

func (p *pair) fail(err error) {
	p.once.Do(func() { p.first = err })
	if p.closed.CompareAndSwap(false, true) {
		p.a.c.Close()
		p.b.c.Close()
	}
}

func (p *pair) err() error {
	if p.first == nil || errors.Is(p.first, net.ErrClosed) || errors.Is(p.first, syscall.ECONNRESET) || errors.Is(p.first, syscall.EPIPE) {
		return nil
	}
	return p.first
}

// ErrIdle ends a spliced pair on which neither side received data for the idle timeout.
var ErrIdle = errors.New("idle timeout")

// copy serves one direction: it waits for what the verdict passes (data
// under pressure, or the FIN), writes it to dst once every redirected
// byte is in dst's send queue (so nothing is reordered), and passes the
// half-close on after the same drain. It never reads more than the
// verdict passed, so it cannot take bytes the verdict has not seen. It
// returns the bytes moved.
func (p *pair) copy(src, dst *end, cfg *spliceSpliceCfg) int64 {
	tick := min(p.idle, time.Minute)
	var copied uint64
	done := func(err error) int64 {
		if err != nil && !p.closed.Load() {
			p.fail(err)
		}
		return int64(p.redirected(src) + copied)
	}
	for {
		var (
			n     int
			rerr  error
			buf   *[]byte
			fin   bool
			stErr error
		)
		src.c.SetReadDeadline(time.Now().Add(tick))
		err := src.rc.Read(func(fd uintptr) bool {
			var st spliceSpliceStat
			if stErr = p.s.stat.Lookup(src.cookie, &st); stErr != nil {
				return true
			}
			if want := st.Passed - cfg.Consumed; want > 0 {
				buf = p.s.bufs.Get().(*[]byte)
				n, rerr = unix.Read(int(fd), (*buf)[:min(uint64(len(*buf)), want)])
				if rerr == unix.EAGAIN { // counted, not queued yet
					p.s.bufs.Put(buf)
					buf = nil
					return false
				}
				return true
			}
			// Nothing passed: a wake-up means the FIN or an error.
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
			if k, _ := unix.Poll(pfd, 0); k > 0 {
				if pfd[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
					_, rerr = unix.Read(int(fd), nil)
					if rerr == nil {
						rerr = syscall.ECONNRESET
					}
					return true
				}
				fin = pfd[0].Revents&unix.POLLRDHUP != 0
				return fin
			}
			return false
		})
		if err == nil {
			err = errors.Join(rerr, stErr)
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			if idleFor(p.a) >= p.idle && idleFor(p.b) >= p.idle {
				p.fail(ErrIdle)
				return done(nil)
			}
			continue
		case err != nil:
			if buf != nil {
				p.s.bufs.Put(buf)
			}
			// src failed (e.g. reset); what it redirected before still
			// goes out before dst is closed.
			if !p.closed.Load() {
				p.drain(src, dst, cfg, time.Second)
			}
			return done(err)
		case fin:
			// The FIN comes after every byte before it was redirected or
			// passed; passed ones were all consumed (Passed == Consumed).
			if err := p.drain(src, dst, cfg, 0); err != nil {
				return done(err)
			}
			dst.c.CloseWrite()
			return done(nil)
		case n == 0:
			p.s.bufs.Put(buf)
			return done(errors.New("sockmap splice: the socket ended before the bytes its verdict passed"))
		}
		werr := p.drain(src, dst, cfg, 0)
		if werr == nil {
			_, werr = dst.c.Write((*buf)[:n])
		}
		p.s.bufs.Put(buf)
		if werr != nil {
			return done(werr)
		}
		copied += uint64(n)
		cfg.Written += uint64(n)
		cfg.Consumed += uint64(n)
		if err := p.s.cfg.Put(src.cookie, *cfg); err != nil {
			return done(fmt.Errorf("splice cfg: %w", err))
		}
	}
}

func (p *pair) redirected(src *end) uint64 {
	var st spliceSpliceStat
	if err := p.s.stat.Lookup(src.cookie, &st); err != nil {
		return 0
	}
	return st.Redirected
}

// drain waits until every byte redirected from src so far sits in dst's
// send queue (or was acknowledged), so that what the process writes next,
// or the FIN, comes after it. max > 0 bounds the wait.
func (p *pair) drain(src, dst *end, cfg *spliceSpliceCfg, max time.Duration) error {
	wait := 50 * time.Microsecond
	var until time.Time
	if max > 0 {
		until = time.Now().Add(max)
	}
	for {
		var st spliceSpliceStat
		if err := p.s.stat.Lookup(src.cookie, &st); err != nil {
			return fmt.Errorf("splice stat: %w", err)
		}
		q, err := dst.queued()
		if err != nil {
			return err
		}
		if q >= st.Redirected+cfg.Written {
			return nil
		}
		if p.closed.Load() {
			return net.ErrClosed
		}
		if !until.IsZero() && time.Now().After(until) {
			return errors.New("sockmap splice: redirected bytes not sent in time")
		}
		time.Sleep(wait)
		wait = min(2*wait, 5*time.Millisecond)
	}
}

// idleFor is how long ago the socket last received data (tcp_info).
func idleFor(e *end) time.Duration {
	var d time.Duration
	e.rc.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if err == nil {
			d = time.Duration(info.Last_data_recv) * time.Millisecond
		}
	})
	return d
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
