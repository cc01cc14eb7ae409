//go:build linux

package bpf

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"github.com/cilium/ebpf"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newTestSplicer loads the sockmap splice into a temporary bpffs and opens
// it as the relay would.
func newTestSplicer(t testing.TB) *Splicer {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads a BPF sk_skb verdict and a SOCKHASH")
	}
	fs := t.TempDir()
	if err := unix.Mount("bpf", fs, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(fs, unix.MNT_DETACH) })
	dir := filepath.Join(fs, "relay")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := applySplice(dir, true, os.Getuid(), os.Getgid()); err != nil {
		t.Fatalf("load splice: %v", err)
	}
	// Applying again (rules apply twice) keeps the maps and swaps the verdict.
	if err := applySplice(dir, true, os.Getuid(), os.Getgid()); err != nil {
		t.Fatalf("re-apply splice: %v", err)
	}
	s, err := OpenSplicer(dir)
	if err != nil {
		t.Fatalf("open splicer: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// splicedPair is client ⇄ relay(Splice) ⇄ upstream on loopback.
type splicedPair struct {
	client   *net.TCPConn // the test's client end
	upstream *net.TCPConn // the test's upstream (server) end
	relayIn  *net.TCPConn // the relay's socket facing the client (closed by Splice)
	cookie   uint64       // relayIn's socket cookie
	done     chan result
}

type result struct {
	up, down int64
	err      error
}

func newSplicedPair(t *testing.T, s *Splicer, pre []byte, idle time.Duration) *splicedPair {
	t.Helper()
	return newSplicedPairCtx(t, context.Background(), s, pre, idle)
}

func newSplicedPairCtx(t *testing.T, ctx context.Context, s *Splicer, pre []byte, idle time.Duration) *splicedPair {
	t.Helper()
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	relayLn, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer relayLn.Close()
	upLn, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer upLn.Close()
	d := net.Dialer{}
	d.SetMultipathTCP(false)
	c, err := d.Dial("tcp", relayLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	rc, err := relayLn.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ru, err := d.Dial("tcp", upLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	u, err := upLn.Accept()
	if err != nil {
		t.Fatal(err)
	}
	p := &splicedPair{client: c.(*net.TCPConn), upstream: u.(*net.TCPConn), relayIn: rc.(*net.TCPConn), done: make(chan result, 1)}
	// Splice closes relayIn (the pair has its own descriptor): its
	// cookie finds the pair afterwards.
	rcc, _ := rc.(*net.TCPConn).SyscallConn()
	rcc.Control(func(fd uintptr) { p.cookie, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
	err = s.Splice(ctx, rc.(*net.TCPConn), ru.(*net.TCPConn), pre, idle, func(up, down int64, err error) {
		rc.Close()
		ru.Close()
		p.done <- result{up, down, err}
	})
	if err != nil {
		t.Fatalf("splice: %v", err)
	}
	t.Cleanup(func() { c.Close(); u.Close() })
	// Splice has armed both sockets once the hello reached the upstream;
	// a client that speaks before that is relayed by splice(2) instead.
	for i := 0; ioctl(t, p.upstream, unix.SIOCINQ) < len(pre); i++ {
		if i > 1000 {
			t.Fatal("hello never reached the upstream")
		}
		time.Sleep(time.Millisecond)
	}
	return p
}

// TestSpliceIntegrity moves 64 MiB each way through the kernel splice, with
// a slow upstream at first so the verdict falls back to the relay copying
// and resumes redirecting, then checks every byte, the half-close each way
// and the counters.
func TestSpliceIntegrity(t *testing.T) {
	s := newTestSplicer(t)
	size := int64(64 << 20)
	if v, err := strconv.Atoi(os.Getenv("SPLICE_TEST_MIB")); err == nil {
		size = int64(v) << 20
	}
	pre := []byte("CLIENTHELLO")
	p := newSplicedPair(t, s, pre, time.Minute)
	upBefore, downBefore, _ := s.SplicedBytes()

	upData := make([]byte, size)
	downData := make([]byte, size)
	rand.Read(upData)
	rand.Read(downData)

	// Upstream: read the hello and everything the client sends (slowly
	// for the first 16 MiB), then answer after the client's half-close.
	upSum := make(chan [32]byte, 1)
	go func() {
		h := sha256.New()
		buf := make([]byte, 64<<10)
		var n int64
		for {
			k, err := p.upstream.Read(buf)
			h.Write(buf[:k])
			n += int64(k)
			if err != nil {
				break
			}
			if n < 16<<20 && os.Getenv("FAST") == "" {
				time.Sleep(200 * time.Microsecond)
			}
		}
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		upSum <- sum
		p.upstream.Write(downData)
		p.upstream.CloseWrite()
	}()
	go func() {
		p.client.Write(upData)
		p.client.CloseWrite()
	}()
	got, err := io.ReadAll(p.client)
	if err != nil {
		t.Fatalf("client read: %v", err)
	}
	if !bytes.Equal(got, downData) {
		t.Fatalf("upstream → client: got %d bytes, want %d, equal prefix %d", len(got), len(downData), commonPrefix(got, downData))
	}
	want := sha256.Sum256(append(append([]byte{}, pre...), upData...))
	if sum := <-upSum; sum != want {
		t.Fatal("client → upstream: bytes differ")
	}
	var r result
	select {
	case r = <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatal("Splice did not return after both half-closes")
	}
	if r.err != nil || r.up != size || r.down != size {
		t.Fatalf("Splice = %d, %d, %v; want %d, %d, nil", r.up, r.down, r.err, size, size)
	}
	upAfter, downAfter, err := s.SplicedBytes()
	if err != nil {
		t.Fatal(err)
	}
	// Bytes moved in the kernel each way; the rest were copied by the
	// relay while the receiver lagged (a bulk sender keeps the verdict
	// passing until it pauses: see docs/BENCHMARKS.md).
	if up, down := upAfter-upBefore, downAfter-downBefore; up == 0 || up > uint64(size) || down == 0 || down > uint64(size) {
		t.Fatalf("kernel counters moved %d up, %d down of %d each", up, down, size)
	} else {
		t.Logf("in the kernel: %.0f%% up (slow reader), %.0f%% down", 100*float64(up)/float64(size), 100*float64(down)/float64(size))
	}
	// Nothing left behind in the maps.
	var k uint64
	var v spliceSpliceCfg
	if s.cfg.Iterate().Next(&k, &v) {
		t.Fatalf("splice_cfg still has entry %d", k)
	}
}

func commonPrefix(a, b []byte) int {
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	return i
}

// TestSpliceMemoryBound pushes from a client into an upstream that never
// reads: the bytes held by the relay's two sockets (sent by the client,
// not in the upstream's receive queue) must stay bounded.
func TestSpliceMemoryBound(t *testing.T) {
	s := newTestSplicer(t)
	p := newSplicedPair(t, s, []byte("hello"), time.Minute)
	buf := make([]byte, 1<<20)
	var sent int64
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		p.client.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := p.client.Write(buf)
		sent += int64(n)
		if err != nil {
			break // blocked: the window closed
		}
	}
	time.Sleep(200 * time.Millisecond) // let in-flight segments settle
	clientOutq := ioctl(t, p.client, unix.SIOCOUTQ)
	upInq := ioctl(t, p.upstream, unix.SIOCINQ)
	held := sent - int64(clientOutq) - int64(upInq) - int64(len("hello"))
	// The bound: the in-flight limit (redirected and copied bytes the
	// upstream has not acknowledged) plus what waits in the relay's
	// receiving socket, whose buffer TCP autotunes up to tcp_rmem's
	// maximum (6 MiB by default).
	var rcvbuf int
	if q := s.pairOf(t, p); q.hold() {
		rcvbuf, _ = unix.GetsockoptInt(q.a.fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
		q.drop()
	}
	bound := int64(DefaultSpliceLimit) + int64(rcvbuf) + 256<<10
	t.Logf("client wrote %d MiB; %d KiB still in its send queue, %d KiB in the upstream's receive queue, %d KiB held by the relay (bound %d KiB: 2 MiB in flight + receive buffer %d KiB)",
		sent>>20, clientOutq>>10, upInq>>10, held>>10, bound>>10, rcvbuf>>10)
	if held > bound {
		t.Fatalf("relay holds %d bytes for a non-reading upstream; bound %d", held, bound)
	}
	if sent > 256<<20 {
		t.Fatalf("client could push %d MiB: no backpressure", sent>>20)
	}
	// Both ends go away: the pair ends (before the splicer is closed).
	p.client.Close()
	p.upstream.Close()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("pair did not end after both ends closed")
	}
}

func ioctl(t *testing.T, c *net.TCPConn, req uint) int {
	t.Helper()
	rc, _ := c.SyscallConn()
	var n int
	var err error
	rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), req) })
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSpliceIdleTimeout: a spliced pair on which nothing moves ends with
// ErrIdle once both sides were silent for the idle timeout (checked by
// the poller's once-a-second sweep).
func TestSpliceIdleTimeout(t *testing.T) {
	s := newTestSplicer(t)
	start := time.Now()
	p := newSplicedPair(t, s, []byte("hello"), time.Second)
	select {
	case r := <-p.done:
		if !errors.Is(r.err, ErrIdle) {
			t.Fatalf("pair ended with %v, want ErrIdle", r.err)
		}
		if d := time.Since(start); d < time.Second {
			t.Fatalf("pair ended after %v, before its 1s idle timeout", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("idle pair not ended within 10s")
	}
}

// TestSpliceCancel: canceling the context given to Splice (the relay's
// drain timeout) ends the pair at once: done runs, both sockets close and
// the maps forget it.
func TestSpliceCancel(t *testing.T) {
	s := newTestSplicer(t)
	ctx, cancel := context.WithCancel(context.Background())
	p := newSplicedPairCtx(t, ctx, s, []byte("hello"), time.Hour)
	p.client.Write([]byte("x"))
	io.ReadFull(p.upstream, make([]byte, len("hello")+1))
	cancel()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end the pair")
	}
	p.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := p.client.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client read after cancel: %v, want EOF or reset", err)
	}
	// The stat entries go right after done returns.
	var key uint64
	for i := 0; s.stat.NextKey(nil, &key) == nil || s.cfg.NextKey(nil, &key) == nil; i++ {
		if i == 100 {
			t.Fatal("splice maps still hold entries after cancel")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSpliceWrongPeer: a verdict that finds another connection's socket
// in its entry (a map value recycled under it, as the kernel's hash maps
// do with replaced values) must not redirect there: it passes the bytes
// and the relay copies them to the right peer.
func TestSpliceWrongPeer(t *testing.T) {
	s := newTestSplicer(t)
	a := newSplicedPair(t, s, []byte("A"), time.Minute)
	b := newSplicedPair(t, s, []byte("B"), time.Minute)
	find := func(p *splicedPair) *pair { return s.pairOf(t, p) }
	pa, pb := find(a), find(b)
	// A's client → upstream entry now names B's upstream socket.
	var bad spliceSpliceCfg
	if err := s.cfg.Lookup(pa.up.src.cookie, &bad); err != nil {
		t.Fatal(err)
	}
	bad.Peer = pb.up.dst.cookie
	if err := s.cfg.Update(pa.up.src.cookie, bad, ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	msg := []byte("for A's upstream only")
	if _, err := a.client.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1+len(msg))
	a.upstream.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(a.upstream, got); err != nil || string(got) != "A"+string(msg) {
		t.Fatalf("A's upstream read %q, %v; want %q", got, err, "A"+string(msg))
	}
	b.upstream.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	got, _ = io.ReadAll(b.upstream) // until the deadline
	if string(got) != "B" {
		t.Fatalf("B's upstream read %q: bytes of another connection", got)
	}
}

// pairOf is the Splicer's pair of a test pair.
func (s *Splicer) pairOf(t *testing.T, p *splicedPair) *pair {
	t.Helper()
	s.poll.mu.Lock()
	defer s.poll.mu.Unlock()
	for q := range s.poll.pairs {
		if q.a.cookie == p.cookie {
			return q
		}
	}
	t.Fatal("pair not found")
	return nil
}
