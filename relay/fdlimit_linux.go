package relay

import (
	"net"

	"golang.org/x/sys/unix"
)

// openFileLimit is RLIMIT_NOFILE's soft limit (Go raises it to the hard
// limit at start); 0 when unknown.
func openFileLimit() uint64 {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == unix.RLIM_INFINITY {
		return 0
	}
	return rl.Cur
}

// acceptAndClose takes one connection off ln's queue without waiting and
// closes it; false when there was none (or ln is not a TCP listener).
func acceptAndClose(ln net.Listener) bool {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return false
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return false
	}
	took := false
	rc.Control(func(fd uintptr) {
		for {
			nfd, _, err := unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
			if err == unix.EINTR || err == unix.ECONNABORTED {
				continue
			}
			if err == nil {
				unix.Close(nfd)
				took = true
			}
			return
		}
	})
	return took
}
