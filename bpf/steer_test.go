//go:build linux

package bpf

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// inFreshNetns runs f on a locked OS thread moved into a new network
// namespace (with lo up), and a temporary bpffs; both are gone afterwards.
func inFreshNetns(t *testing.T, f func(pinDir string)) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads and attaches BPF programs in a new network namespace")
	}
	fs := t.TempDir()
	if err := unix.Mount("bpf", fs, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(fs, unix.MNT_DETACH) })
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The thread is left locked on purpose: it dies with the goroutine
		// instead of returning to the pool in a foreign namespace.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare netns: %v", err)
			return
		}
		lo, err := net.InterfaceByName("lo")
		if err == nil {
			setUp(lo.Index)
		}
		f(filepath.Join(fs, "relay"))
	}()
	<-done
}

// setUp brings an interface up with an ioctl (no iproute2 needed).
func setUp(index int) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	ifr, _ := unix.NewIfreq("lo")
	ifr.SetUint16(unix.IFF_UP | unix.IFF_LOOPBACK | unix.IFF_RUNNING)
	unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

func TestSteeringLoadRegisterCountDelete(t *testing.T) {
	inFreshNetns(t, func(pinDir string) {
		opts := Options{PinDir: pinDir, Ports: []Port{{443, SlotHTTPS}, {80, SlotHTTP}}, OwnerUID: 65534, OwnerGID: 65534, NetNS: "/proc/thread-self/ns/net",
			AcctPorts: []uint16{443, 80, 8443}}
		st, err := Apply(opts)
		if err != nil || len(st.Warnings) > 0 {
			t.Errorf("apply: %v %v", err, st)
			return
		}
		for name, want := range map[string]struct {
			uid  uint32
			mode os.FileMode
		}{pinListeners: {65534, 0o600}, pinLink: {0, 0o600}, pinPorts: {0, 0o644}, pinCounters: {0, 0o644},
			pinAcctLink: {0, 0o600}, pinAcct: {0, 0o644}, pinAcctPorts: {0, 0o644}} {
			fi, err := os.Stat(filepath.Join(pinDir, name))
			if err != nil {
				t.Errorf("pin %s: %v", name, err)
				continue
			}
			if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != want.uid || fi.Mode().Perm() != want.mode {
				t.Errorf("pin %s: uid %d mode %v, want uid %d mode %v", name, uid, fi.Mode().Perm(), want.uid, want.mode)
			}
		}

		// Re-apply updates the program in place: same link, new program.
		st2, err := Apply(opts)
		if err != nil || !st2.Updated || st2.LinkID != st.LinkID || st2.ProgID == st.ProgID {
			t.Errorf("re-apply: %+v (first %+v) err %v; want the same link with a new program", st2, st, err)
		}
		if _, err := ebpf.NewProgramFromID(ebpf.ProgramID(st.ProgID)); err == nil {
			t.Errorf("old program %d still loaded after the update", st.ProgID)
		}

		s, err := Open(pinDir)
		if err != nil {
			t.Errorf("open: %v", err)
			return
		}
		defer s.Close()
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", "[::]:0") // dual-stack, any port: steering is by map
		if err != nil {
			t.Errorf("listen: %v", err)
			return
		}
		defer ln.Close()
		if err := s.Register(SlotHTTPS, ln.(*net.TCPListener)); err != nil {
			t.Errorf("register: %v", err)
			return
		}
		for _, addr := range []string{"127.0.0.1:443", "[::1]:443"} {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Errorf("dial %s: %v (not steered)", addr, err)
				continue
			}
			a, err := ln.Accept()
			if err != nil {
				t.Errorf("accept: %v", err)
				continue
			}
			// The accepted socket's local address is what the client
			// dialled: no NAT involved.
			if la := a.LocalAddr().(*net.TCPAddr); la.Port != 443 {
				t.Errorf("accepted socket local address %v, want port 443", la)
			}
			// 1000 bytes in, 500 out, for the kernel's accounting.
			c.Write(make([]byte, 1000))
			io.ReadFull(a, make([]byte, 1000))
			a.Write(make([]byte, 500))
			io.ReadFull(c, make([]byte, 500))
			a.Close()
			c.Close()
		}
		// The kernel accounted both connections at close.
		want := PortAccount{Port: 443, Accepted: 2, Closed: 2, BytesIn: 2000, BytesOut: 1000}
		var acct []PortAccount
		for i := 0; i < 100; i++ {
			acct, err = ReadAccounting(pinDir)
			if err == nil && len(acct) == 3 && acct[1] == want {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil || len(acct) != 3 || acct[1] != want || acct[0].Accepted != 0 {
			t.Errorf("kernel accounting %+v (%v), want 80, %+v, 8443", acct, err, want)
		}
		acctLink, err := link.LoadPinnedLink(filepath.Join(pinDir, pinAcctLink), nil)
		if err != nil {
			t.Errorf("accounting link pin: %v", err)
			return
		}
		acctInfo, _ := acctLink.Info()
		acctLink.Close()
		pcs, err := s.Counters()
		if err != nil || len(pcs) != 2 || pcs[1].Port != 443 || pcs[1].Steered != 2 || pcs[0].Steered != 0 {
			t.Errorf("counters %+v (%v), want exactly 2 steered on 443", pcs, err)
		}
		// No listener in the HTTP slot: port 80 falls through (fail-open)
		// and is counted.
		if _, err := net.Dial("tcp", "127.0.0.1:80"); err == nil {
			t.Error("port 80 answered with no listener anywhere")
		}
		if pcs, _ := s.Counters(); pcs[0].NoSocket != 1 {
			t.Errorf("port 80 no_socket = %d, want 1", pcs[0].NoSocket)
		}

		if err := Delete(pinDir); err != nil {
			t.Errorf("delete: %v", err)
		}
		if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin dir left behind: %v", err)
		}
		if _, err := ebpf.NewProgramFromID(ebpf.ProgramID(st2.ProgID)); err == nil {
			t.Error("program still loaded after delete")
		}
		if l, err := link.NewFromID(acctInfo.ID); err == nil {
			l.Close()
			t.Error("sock_ops accounting still attached after delete")
		}
		if _, err := Show(pinDir); !errors.Is(err, ErrNotLoaded) {
			t.Errorf("show after delete: %v, want ErrNotLoaded", err)
		}
		if err := Delete(pinDir); err != nil {
			t.Errorf("second delete: %v", err)
		}
	})
}
