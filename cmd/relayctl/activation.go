package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/relay-gw/relay/internal/config"
)

// listenerNames are the names a listener is known by, in systemd's
// FileDescriptorName= and in the hand-over.
var listenerNames = []string{"https", "http", "metrics"}

// inheritedListeners are listening sockets this process did not bind
// itself: from systemd (relay.socket) or from the relay it takes over
// from. Keyed by listenerNames.
type inheritedListeners map[string]net.Listener

func (l inheritedListeners) close() {
	for _, ln := range l {
		ln.Close()
	}
}

// systemdListeners reads the sockets systemd passes (sd_listen_fds(3):
// LISTEN_PID, LISTEN_FDS from fd 3 on, LISTEN_FDNAMES). A socket named
// https, http or metrics (FileDescriptorName=) is that listener; one
// without such a name of its own (one relay.socket with several
// ListenStream=, which share the unit's name) is the listener whose
// listen.* address it is bound to. nil
// without socket activation. The variables are removed so that children
// do not inherit them.
func systemdListeners(cfg *config.Config) (inheritedListeners, error) {
	return listenFDs(cfg, os.Getenv, 3, true)
}

func listenFDs(cfg *config.Config, getenv func(string) string, first int, unset bool) (inheritedListeners, error) {
	pid, nfds, names := getenv("LISTEN_PID"), getenv("LISTEN_FDS"), getenv("LISTEN_FDNAMES")
	if pid == "" || nfds == "" {
		return nil, nil
	}
	if unset {
		os.Unsetenv("LISTEN_PID")
		os.Unsetenv("LISTEN_FDS")
		os.Unsetenv("LISTEN_FDNAMES")
	}
	if p, err := strconv.Atoi(pid); err != nil || p != os.Getpid() {
		return nil, nil // meant for another process (a wrapper that did not exec)
	}
	n, err := strconv.Atoi(nfds)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%q is not a count", nfds)
	}
	nameList := strings.Split(names, ":")
	out := inheritedListeners{}
	fail := func(i int, err error) (inheritedListeners, error) {
		out.close()
		for fd := first + i; fd < first+n; fd++ {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	for i := 0; i < n; i++ {
		fd := first + i
		unix.CloseOnExec(fd)
		name := ""
		if i < len(nameList) {
			name = nameList[i]
		}
		ln, err := listenerFromFD(fd, "systemd socket "+strconv.Itoa(i))
		if err != nil {
			return fail(i+1, err)
		}
		// A name shared by several sockets (FileDescriptorName= names
		// every socket of its unit) says nothing: go by the address.
		if !knownListener(name) || strings.Count(":"+names+":", ":"+name+":") > 1 {
			name = ""
			for _, cand := range listenerNames {
				if out[cand] == nil && addrMatches(listenAddr(cfg, cand), ln.Addr()) {
					name = cand
					break
				}
			}
		}
		if name == "" {
			ln.Close()
			return fail(i+1, fmt.Errorf("the socket on %s is none of listen.https (%s), listen.http (%s), listen.metrics (%s): make relay.socket's ListenStream= the listen addresses, or name it with FileDescriptorName=https, http or metrics",
				ln.Addr(), cfg.Listen.HTTPS, cfg.Listen.HTTP, cfg.Listen.Metrics))
		}
		if out[name] != nil {
			ln.Close()
			return fail(i+1, fmt.Errorf("two sockets for %s (%s and %s)", name, out[name].Addr(), ln.Addr()))
		}
		out[name] = ln
	}
	return out, nil
}

func knownListener(name string) bool {
	for _, n := range listenerNames {
		if n == name {
			return true
		}
	}
	return false
}

// listenerFromFD makes a net.Listener of a listening socket fd and closes
// fd (the listener holds its own duplicate). The socket must be a
// listening plain TCP stream socket: MPTCP sockets cannot go into the BPF
// steering sockmap (EOPNOTSUPP).
func listenerFromFD(fd int, name string) (net.Listener, error) {
	if err := checkTCPListener(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s socket: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("%s socket: %w", name, err)
	}
	return ln, nil
}

// errMPTCP says why an MPTCP listener is refused.
var errMPTCP = errors.New("socket is MPTCP, not TCP: set no MPTCP for it (systemd: do not use SocketProtocol=mptcp in relay.socket); the BPF steering sockmap only takes TCP sockets")

func checkTCPListener(fd int) error {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("read socket type: %w", err)
	}
	if typ != unix.SOCK_STREAM {
		return fmt.Errorf("socket type %d is not a stream socket: use ListenStream=", typ)
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return fmt.Errorf("read socket protocol: %w", err)
	}
	switch proto {
	case unix.IPPROTO_TCP:
	case unix.IPPROTO_MPTCP:
		return errMPTCP
	default:
		return fmt.Errorf("socket protocol %d is not TCP", proto)
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		return errors.New("socket is not listening")
	}
	return nil
}

// addrMatches reports whether a configured listen address (":8443",
// "127.0.0.1:9090") names the socket bound at got.
func addrMatches(cfgAddr string, got net.Addr) bool {
	ta, ok := got.(*net.TCPAddr)
	if !ok {
		return false
	}
	host, port, err := net.SplitHostPort(cfgAddr)
	if err != nil {
		return false
	}
	p, err := net.LookupPort("tcp", port)
	if err != nil || p != ta.Port {
		return false
	}
	if host == "" {
		return ta.IP.IsUnspecified()
	}
	if ip := net.ParseIP(host); ip != nil {
		return ip.Equal(ta.IP) || (ip.IsUnspecified() && ta.IP.IsUnspecified())
	}
	ips, err := net.LookupIP(host)
	if err != nil {
		return false
	}
	for _, ip := range ips {
		if ip.Equal(ta.IP) {
			return true
		}
	}
	return false
}
