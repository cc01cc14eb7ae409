package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relay-gw/relay/internal/config"
)

// passFDs duplicates the listeners' sockets to consecutive descriptors
// from first, as systemd passes them.
func passFDs(t *testing.T, first int, lns ...net.Listener) {
	t.Helper()
	for i, ln := range lns {
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var derr error
		rc.Control(func(fd uintptr) { derr = unix.Dup3(int(fd), first+i, unix.O_CLOEXEC) })
		if derr != nil {
			t.Fatal(derr)
		}
	}
}

func listenTCP(t *testing.T, mptcp bool) net.Listener {
	t.Helper()
	lc := &net.ListenConfig{}
	lc.SetMultipathTCP(mptcp)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func activationEnv(n int, names string) func(string) string {
	m := map[string]string{"LISTEN_PID": strconv.Itoa(os.Getpid()), "LISTEN_FDS": strconv.Itoa(n), "LISTEN_FDNAMES": names}
	return func(k string) string { return m[k] }
}

// TestListenFDs: sockets are known by FileDescriptorName or, unnamed, by
// the listen address they are bound to; a socket that is neither is an
// error that says what to write.
func TestListenFDs(t *testing.T) {
	const first = 200
	a, b, c := listenTCP(t, false), listenTCP(t, false), listenTCP(t, false)
	cfg := config.Default()
	cfg.Listen.HTTP = b.Addr().String()
	cfg.Listen.Metrics = c.Addr().String()

	passFDs(t, first, a, b, c)
	got, err := listenFDs(cfg, activationEnv(3, "https:relay.socket:relay.socket"), first, false)
	if err != nil {
		t.Fatal(err)
	}
	defer got.close()
	for name, want := range map[string]net.Addr{"https": a.Addr(), "http": b.Addr(), "metrics": c.Addr()} {
		if got[name] == nil || got[name].Addr().String() != want.String() {
			t.Errorf("%s: got %v, want the socket on %s", name, got[name], want)
		}
	}
	// The descriptors passed were given to the listeners (closed).
	if _, err := unix.FcntlInt(first, unix.F_GETFD, 0); err == nil {
		t.Errorf("fd %d still open after listenFDs", first)
	}

	// One name for all (FileDescriptorName= of one unit): by address.
	cfg.Listen.HTTPS = a.Addr().String()
	passFDs(t, first, c, a, b)
	got, err = listenFDs(cfg, activationEnv(3, "https:https:https"), first, false)
	if err != nil {
		t.Fatal(err)
	}
	defer got.close()
	for name, want := range map[string]net.Addr{"https": a.Addr(), "http": b.Addr(), "metrics": c.Addr()} {
		if got[name] == nil || got[name].Addr().String() != want.String() {
			t.Errorf("shared name: %s: got %v, want the socket on %s", name, got[name], want)
		}
	}

	passFDs(t, first, a, b)
	cfg.Listen.HTTPS = ":8443"
	cfg.Listen.HTTP = "127.0.0.1:1"
	_, err = listenFDs(cfg, activationEnv(2, "https"), first, false)
	if err == nil || !strings.Contains(err.Error(), "FileDescriptorName=https") {
		t.Errorf("unnamed socket on an address that is no listen.*: err %v", err)
	}
	for fd := first; fd < first+2; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			t.Errorf("fd %d left open after an error", fd)
		}
	}

	// Not for this process (LISTEN_PID of another): ignored.
	if got, err := listenFDs(cfg, func(k string) string {
		return map[string]string{"LISTEN_PID": "1", "LISTEN_FDS": "1"}[k]
	}, first, false); got != nil || err != nil {
		t.Errorf("LISTEN_PID of another process: %v, %v", got, err)
	}
}

// TestListenFDsMPTCP: an MPTCP socket from systemd is refused with a
// message saying why (it cannot enter the BPF steering sockmap).
func TestListenFDsMPTCP(t *testing.T) {
	ln := listenTCP(t, true)
	rc, _ := ln.(*net.TCPListener).SyscallConn()
	var proto int
	rc.Control(func(fd uintptr) { proto, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) })
	if proto != unix.IPPROTO_MPTCP {
		t.Skip("MPTCP not available on this kernel (net.mptcp.enabled=0?): the listener fell back to TCP")
	}
	passFDs(t, 210, ln)
	cfg := config.Default()
	_, err := listenFDs(cfg, activationEnv(1, "https"), 210, false)
	if err == nil || !strings.Contains(err.Error(), "MPTCP") {
		t.Fatalf("MPTCP socket: err %v, want a refusal naming MPTCP", err)
	}
}

// TestSocketActivation runs the relay under systemd-socket-activate (the
// sockets systemd's relay.socket would pass), then hands those sockets
// over to a relay started by hand while connections keep coming.
func TestSocketActivation(t *testing.T) {
	sa, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skip("systemd-socket-activate not installed (Debian package systemd; scripts/deps.sh installs it)")
	}
	dir, state := restartDir(t)
	up := echoUpstream(t)
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
unknown_sni: reject
routes:
  - match: echo.test
    passthrough: %s
`, state, https, httpp, metrics, up)), 0o644)
	addr := fmt.Sprintf("127.0.0.1:%d", https)
	hello := clientHello(t, "echo.test")

	a := startRelayProc(t, "A (socket-activated)", []string{sa,
		"-l", addr, "-l", fmt.Sprintf("127.0.0.1:%d", httpp), "-l", fmt.Sprintf("127.0.0.1:%d", metrics),
		"--fdname=https:http:metrics",
		relayctlBin, "serve", "-c", cfg})
	a.waitLog(t, fmt.Sprintf("Listening on 127.0.0.1:%d", metrics), 30*time.Second)
	// systemd-socket-activate starts the relay on the first connection,
	// which waits in the socket's queue meanwhile.
	c, err := dialEcho(addr, hello)
	if err != nil {
		t.Fatalf("first connection (starts the relay): %v", err)
	}
	c.Close()
	for _, name := range []string{"https", "http", "metrics"} {
		a.waitLog(t, `msg="socket activation: listener from systemd" name=`+name, 30*time.Second)
	}
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	if strings.Contains(a.logs.String(), "listen https on") {
		t.Fatal("the relay bound its own https socket")
	}

	// A relay started by hand takes the systemd sockets over.
	fresh := startNewConns(tcpDialer(addr), hello, 10*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	b := startRelayProc(t, "B", []string{relayctlBin, "serve", "-c", cfg})
	b.waitLog(t, "hand-over done", 60*time.Second)
	time.Sleep(500 * time.Millisecond)
	fresh.finish()
	select {
	case <-a.done:
	case <-time.After(60 * time.Second):
		t.Fatal("the socket-activated relay did not exit after the hand-over")
	}
	c, err = dialEcho(addr, hello)
	if err != nil {
		t.Fatalf("after the hand-over: %v", err)
	}
	c.Close()
	t.Logf("new connections: %d ok", fresh.ok.Load())
	fresh.fail.check(t, "new connections")
}

// TestSocketActivationRestart is `systemctl restart relay` with
// relay.socket, played by the test: it holds the listening sockets as
// systemd does, stops relay A with SIGTERM while A has open connections
// and clients keep connecting, and starts relay B on the same sockets
// once A has exited. Connections that arrive in between wait in the
// sockets' queue: none is refused or reset, A's connections finish on A.
func TestSocketActivationRestart(t *testing.T) {
	dir, state := restartDir(t)
	up := echoUpstream(t)
	lns := []net.Listener{listenTCP(t, false), listenTCP(t, false), listenTCP(t, false)}
	var files []*os.File
	for _, ln := range lns {
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "%s", http: "%s", metrics: "%s"}
unknown_sni: reject
limits: {drain_timeout: 1m}
routes:
  - match: echo.test
    passthrough: %s
`, state, lns[0].Addr(), lns[1].Addr(), lns[2].Addr(), up)), 0o644)
	addr := lns[0].Addr().String()
	hello := clientHello(t, "echo.test")
	// What systemd does between fork and exec: LISTEN_PID is the
	// service's own pid.
	activated := func(name string) *relayProc {
		p := &relayProc{name: name, logs: &lockedBuffer{}, done: make(chan struct{})}
		p.cmd = exec.Command("sh", "-c", `LISTEN_PID=$$ exec "$0" serve -c "$1"`, relayctlBin, cfg)
		p.cmd.Env = append(os.Environ(), "LISTEN_FDS=3", "LISTEN_FDNAMES=relay.socket:relay.socket:relay.socket")
		p.cmd.ExtraFiles = files
		p.cmd.Stderr = p.logs
		if os.Geteuid() == 0 {
			p.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		}
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { p.err = p.cmd.Wait(); close(p.done) }()
		t.Cleanup(func() {
			p.cmd.Process.Signal(syscall.SIGTERM)
			<-p.done
			if t.Failed() {
				t.Logf("relay %s log:\n%s", p.name, p.logs.String())
			}
		})
		return p
	}

	a := activated("A")
	a.waitLog(t, "relay serving", 30*time.Second)
	long := openLongConns(t, tcpDialer(addr), hello, 300, 100*time.Millisecond)
	defer long.closeAll()
	fresh := startNewConns(tcpDialer(addr), hello, 10*time.Millisecond)
	time.Sleep(500 * time.Millisecond)

	a.cmd.Process.Signal(syscall.SIGTERM) // systemctl restart: stop ...
	a.waitLog(t, "msg=draining", 30*time.Second)
	time.Sleep(500 * time.Millisecond)
	if a.exited() {
		t.Fatalf("relay A exited (%v) while its connections were open", a.err)
	}
	long.finish() // A's connections still work during its drain, then end
	select {
	case <-a.done:
		if a.err != nil {
			t.Errorf("relay A: %v", a.err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("relay A did not exit after its connections finished")
	}
	b := activated("B") // ... then start, on the same sockets
	b.waitLog(t, "relay serving", 30*time.Second)
	time.Sleep(500 * time.Millisecond)
	fresh.finish()
	t.Logf("new connections: %d ok", fresh.ok.Load())
	long.fail.check(t, "A's connections")
	fresh.fail.check(t, "new connections")
	if strings.Contains(b.logs.String(), "listen https on") {
		t.Error("relay B bound its own https socket")
	}
}
