package relay

import (
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// idleFor returns how long ago c last received data, from the kernel's
// tcp_info (tcpi_last_data_recv). On error it returns 0 (never idle), so a
// failed probe keeps a connection rather than cutting it.
func idleFor(c *net.TCPConn) time.Duration {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var ms uint32
	ok := false
	rc.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if err == nil {
			ms, ok = info.Last_data_recv, true
		}
	})
	if !ok {
		return 0
	}
	return time.Duration(ms) * time.Millisecond
}
