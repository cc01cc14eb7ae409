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
