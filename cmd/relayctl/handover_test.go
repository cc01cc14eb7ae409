package main

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Restart and upgrade tests: real relayctl processes, a passthrough route
// to an echo upstream, long connections moving data and a client opening
// new connections steadily. Every failure is counted by kind; the
// tests want them all at zero.

// lockedBuffer collects a child's stderr while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// relayProc is a running `relayctl serve`.
type relayProc struct {
	name string
	cmd  *exec.Cmd
	logs *lockedBuffer
	done chan struct{}
	err  error // valid after done
}

func startRelayProc(t *testing.T, name string, argv []string) *relayProc {
	t.Helper()
	// As an ordinary user: the hand-over socket, SO_PEERCRED and the
	// listeners must work without privilege.
	return startProc(t, name, argv, os.Geteuid() == 0)
}

// startProc starts argv; asNobody runs it as uid/gid 65534.
func startProc(t *testing.T, name string, argv []string, asNobody bool) *relayProc {
	t.Helper()
	p := &relayProc{name: name, logs: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Stderr = p.logs
	if asNobody {
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(60 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("relay %s log:\n%s", p.name, p.logs.String())
		}
	})
	return p
}

func (p *relayProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitLog waits until the relay logged s; it fails if the relay exits first.
func (p *relayProc) waitLog(t *testing.T, s string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if strings.Contains(p.logs.String(), s) {
			return
		}
		if p.exited() {
			t.Fatalf("relay %s exited (%v) before logging %q", p.name, p.err, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("relay %s did not log %q within %s", p.name, s, within)
}

// restartDir is a world-readable temp dir (the relay may run as nobody)
// with a state_dir that user owns.
func restartDir(t *testing.T) (dir, state string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "r18-restart")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	state = filepath.Join(dir, "state")
	os.Mkdir(state, 0o700)
	if os.Geteuid() == 0 {
		os.Chown(state, 65534, 65534)
	}
	return dir, state
}

// echoUpstream echoes every byte back.
func echoUpstream(t *testing.T) net.Addr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr()
}

// clientHello returns a real ClientHello record for name (the relay routes
// on it and passes it on; the echo upstream sends it back).
func clientHello(t *testing.T, name string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer b.Close()
	go tls.Client(a, &tls.Config{ServerName: name, InsecureSkipVerify: true}).Handshake()
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		t.Fatal(err)
	}
	a.Close()
	return append(hdr, body...)
}

// failures counts what went wrong, by kind.
type failures struct {
	refused, reset, closed, corrupted, other atomic.Int64
	mu                                       sync.Mutex
	examples                                 []string
}

func (f *failures) add(what string, err error) {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		f.refused.Add(1)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		f.reset.Add(1)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		f.closed.Add(1)
	case errors.Is(err, errCorrupted):
		f.corrupted.Add(1)
	default:
		f.other.Add(1)
	}
	f.mu.Lock()
	if len(f.examples) < 5 {
		f.examples = append(f.examples, fmt.Sprintf("%s: %v", what, err))
	}
	f.mu.Unlock()
}

func (f *failures) check(t *testing.T, what string) {
	t.Helper()
	if n := f.refused.Load() + f.reset.Load() + f.closed.Load() + f.corrupted.Load() + f.other.Load(); n != 0 {
		t.Errorf("%s: %d refused, %d reset, %d closed early, %d corrupted, %d other; e.g. %q", what,
			f.refused.Load(), f.reset.Load(), f.closed.Load(), f.corrupted.Load(), f.other.Load(), f.examples)
	}
}

// longConnCount is how many connections move data through a restart or
// reload (the goal: 1,000).
const longConnCount = 1000

var errCorrupted = errors.New("echo differs from what was sent")

// exchange writes p and reads its echo.
func exchange(c net.Conn, p []byte) error {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(p); err != nil {
		return err
	}
	got := make([]byte, len(p))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, p) {
		return errCorrupted
	}
	return nil
}

// dialer opens a connection to the relay.
type dialer func() (net.Conn, error)

func tcpDialer(addr string) dialer {
	return func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 10*time.Second) }
}

// dialEcho opens a passthrough connection through the relay and checks
// the echo of the ClientHello.
func dialEcho(addr string, hello []byte) (net.Conn, error) {
	return dialEchoWith(tcpDialer(addr), hello)
}

func dialEchoWith(dial dialer, hello []byte) (net.Conn, error) {
	c, err := dial()
	if err != nil {
		return nil, err
	}
	if err := exchange(c, hello); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// longConns are connections kept open, each exchanging a chunk of a
// per-connection pattern every interval until stop.
type longConns struct {
	conns  []net.Conn
	fail   failures
	rounds atomic.Int64
	stop   chan struct{}
	wg     sync.WaitGroup
}

func openLongConns(t *testing.T, dial dialer, hello []byte, n int, every time.Duration) *longConns {
	t.Helper()
	l := &longConns{stop: make(chan struct{})}
	for i := 0; i < n; i++ {
		c, err := dialEchoWith(dial, hello)
		if err != nil {
			l.closeAll()
			t.Fatalf("long connection %d: %v", i, err)
		}
		l.conns = append(l.conns, c)
	}
	for i, c := range l.conns {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			chunk := make([]byte, 1024)
			for j := 0; ; j++ {
				select {
				case <-l.stop:
					return
				case <-time.After(every):
				}
				for k := range chunk {
					chunk[k] = byte(i*7 + j*13 + k)
				}
				if err := exchange(c, chunk); err != nil {
					l.fail.add("long connection", err)
					return
				}
				l.rounds.Add(1)
			}
		}()
	}
	return l
}

// finish stops the exchanges, does one last one on each connection and
// closes them.
func (l *longConns) finish() {
	close(l.stop)
	l.wg.Wait()
	for _, c := range l.conns {
		if err := exchange(c, []byte("last words")); err != nil {
			l.fail.add("long connection, last exchange", err)
		}
	}
	l.closeAll()
}

func (l *longConns) closeAll() {
	for _, c := range l.conns {
		c.Close()
	}
}

// newConns opens a connection every interval, exchanges a little and
// closes it, until stop.
type newConns struct {
	fail   failures
	ok     atomic.Int64
	marked atomic.Int64 // connections started after mark was set
	mark   atomic.Bool
	stop   chan struct{}
	wg     sync.WaitGroup
}

func startNewConns(dial dialer, hello []byte, every time.Duration) *newConns {
	n := &newConns{stop: make(chan struct{})}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-n.stop:
				return
			case <-tick.C:
			}
			marked := n.mark.Load()
			n.wg.Add(1)
			go func() {
				defer n.wg.Done()
				c, err := dialEchoWith(dial, hello)
				if err != nil {
					n.fail.add("new connection", err)
					return
				}
				defer c.Close()
				if err := exchange(c, []byte(fmt.Sprintf("request %d", i))); err != nil {
					n.fail.add("new connection", err)
					return
				}
				n.ok.Add(1)
				if marked {
					n.marked.Add(1)
				}
			}()
		}
	}()
	return n
}

func (n *newConns) finish() {
	close(n.stop)
	n.wg.Wait()
}

// metricValue returns the value of one series line of /metrics ("" when
// absent).
func metricValue(t *testing.T, port int, series string) string {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return v
		}
	}
	return ""
}

// TestHandoverUpgrade is a binary upgrade without systemd: relay B starts
// with A's config and state_dir while A serves 1,000 connections moving
// data and a client opens 100 new connections a second. Nothing may be
// refused, reset or corrupted; the old connections finish on A, which
// then exits; new connections go to B.
func TestHandoverUpgrade(t *testing.T) {
	dir, state := restartDir(t)
	up := echoUpstream(t)
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
unknown_sni: reject
limits: {drain_timeout: 2m}
routes:
  - match: echo.test
    passthrough: %s
`, state, https, httpp, metrics, up)), 0o644)
	addr := fmt.Sprintf("127.0.0.1:%d", https)
	hello := clientHello(t, "echo.test")

	a := startRelayProc(t, "A", []string{relayctlBin, "serve", "-c", cfg})
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	long := openLongConns(t, tcpDialer(addr), hello, longConnCount, 100*time.Millisecond)
	defer long.closeAll()
	fresh := startNewConns(tcpDialer(addr), hello, 10*time.Millisecond)
	time.Sleep(time.Second)

	b := startRelayProc(t, "B", []string{relayctlBin, "serve", "-c", cfg})
	b.waitLog(t, "hand-over done", 60*time.Second)
	fresh.mark.Store(true) // A stopped accepting before B logged that
	a.waitLog(t, "the new relay serves; draining", 10*time.Second)
	time.Sleep(2 * time.Second)
	fresh.finish()
	if a.exited() {
		t.Fatalf("relay A exited (%v) while its connections were open", a.err)
	}
	rounds := long.rounds.Load()
	long.finish()
	select {
	case <-a.done:
		if a.err != nil {
			t.Errorf("relay A: %v", a.err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("relay A did not exit after its connections finished")
	}
	// After A is gone, B serves alone.
	for i := 0; i < 20; i++ {
		c, err := dialEcho(addr, hello)
		if err != nil {
			t.Fatalf("after A exited: %v", err)
		}
		c.Close()
	}
	total := metricValue(t, metrics, `relay_connections_total{action="passthrough",route="echo.test"}`)
	var onB int64
	fmt.Sscan(total, &onB)
	t.Logf("long connections: %d, %d exchanges; new connections: %d ok (%d after the hand-over); B accepted %d",
		longConnCount, rounds, fresh.ok.Load(), fresh.marked.Load(), onB)
	long.fail.check(t, "long connections")
	fresh.fail.check(t, "new connections")
	if onB < fresh.marked.Load()+20 {
		t.Errorf("B accepted %d connections, fewer than the %d opened after the hand-over", onB, fresh.marked.Load()+20)
	}
	if fresh.marked.Load() == 0 {
		t.Error("no new connection after the hand-over")
	}
}

// TestHandoverFailedStart: a new relay that fails after it received the
// listeners (here: its new metrics address is taken) gives them back; the
// old relay keeps serving without a single failed connection, and a later
// good start takes over.
func TestHandoverFailedStart(t *testing.T) {
	dir, state := restartDir(t)
	up := echoUpstream(t)
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	conf := func(metricsAddr string) string {
		return fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "%s"}
unknown_sni: reject
routes:
  - match: echo.test
    passthrough: %s
`, state, https, httpp, metricsAddr, up)
	}
	good, bad := filepath.Join(dir, "good.yaml"), filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte(conf(fmt.Sprintf("127.0.0.1:%d", metrics))), 0o644)
	os.WriteFile(bad, []byte(conf(busy.Addr().String())), 0o644)
	addr := fmt.Sprintf("127.0.0.1:%d", https)
	hello := clientHello(t, "echo.test")

	a := startRelayProc(t, "A", []string{relayctlBin, "serve", "-c", good})
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	fresh := startNewConns(tcpDialer(addr), hello, 10*time.Millisecond)
	b := startRelayProc(t, "B", []string{relayctlBin, "serve", "-c", bad})
	select {
	case <-b.done:
	case <-time.After(60 * time.Second):
		t.Fatal("relay B with a taken metrics address did not fail")
	}
	if !strings.Contains(b.logs.String(), "address already in use") {
		t.Errorf("relay B failed for another reason: %s", b.logs.String())
	}
	a.waitLog(t, "hand-over abandoned", 10*time.Second)
	time.Sleep(500 * time.Millisecond)
	if a.exited() {
		t.Fatalf("relay A exited (%v) after a failed hand-over", a.err)
	}
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics)) // A still has all its listeners

	c := startRelayProc(t, "C", []string{relayctlBin, "serve", "-c", good})
	c.waitLog(t, "hand-over done", 60*time.Second)
	time.Sleep(500 * time.Millisecond)
	fresh.finish()
	select {
	case <-a.done:
	case <-time.After(60 * time.Second):
		t.Fatal("relay A did not exit after relay C took over")
	}
	t.Logf("new connections: %d ok", fresh.ok.Load())
	fresh.fail.check(t, "new connections")
}

// TestHandoverOtherUser: listeners go only to a relay of the same user
// (SO_PEERCRED on both sides); root is no exception.
func TestHandoverOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs the old relay as nobody and the new one as root")
	}
	dir, state := restartDir(t)
	up := echoUpstream(t)
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
routes:
  - match: echo.test
    passthrough: %s
`, state, https, httpp, metrics, up)), 0o644)
	a := startProc(t, "A (nobody)", []string{relayctlBin, "serve", "-c", cfg}, true)
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	b := startProc(t, "B (root)", []string{relayctlBin, "serve", "-c", cfg}, false)
	select {
	case <-b.done:
	case <-time.After(60 * time.Second):
		t.Fatal("relay B (root) did not fail")
	}
	if !strings.Contains(b.logs.String(), "peer runs as uid 65534, not 0") {
		t.Errorf("relay B (root) failed for another reason:\n%s", b.logs.String())
	}
	if a.exited() {
		t.Fatalf("relay A exited: %v", a.err)
	}
	c, err := dialEcho(fmt.Sprintf("127.0.0.1:%d", https), clientHello(t, "echo.test"))
	if err != nil {
		t.Fatalf("relay A after the refused hand-over: %v", err)
	}
	c.Close()
}
