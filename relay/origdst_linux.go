package relay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (IPv4, SOL_IP) and IP6T_SO_ORIGINAL_DST
// (IPv6, SOL_IPV6): both 80.
const soOriginalDst = 80

// SOOriginalDst reads the destination a client dialed before an iptables
// REDIRECT, from conntrack (SO_ORIGINAL_DST). It works for IPv4 and IPv6
// on a dual-stack listener. ok is false when the connection was not NATed
// (the kernel answers ENOENT) or the original equals the local address.
func SOOriginalDst(c *net.TCPConn) (netip.AddrPort, bool, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, false, err
	}
	local, _ := addrPort(c.LocalAddr())
	var dst netip.AddrPort
	var serr error
	cerr := rc.Control(func(fd uintptr) {
		if local.Addr().Unmap().Is4() {
			// IPv4 flow, also on an AF_INET6 socket (v4-mapped).
			var sa unix.RawSockaddrInet4
			l := uint32(unsafe.Sizeof(sa))
			if serr = getsockopt(int(fd), unix.SOL_IP, soOriginalDst, unsafe.Pointer(&sa), &l); serr == nil {
				port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
				dst = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
			}
			return
		}
		var sa unix.RawSockaddrInet6
		l := uint32(unsafe.Sizeof(sa))
		if serr = getsockopt(int(fd), unix.SOL_IPV6, soOriginalDst, unsafe.Pointer(&sa), &l); serr == nil {
			port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
			dst = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port)
		}
	})
	if cerr != nil {
		return netip.AddrPort{}, false, cerr
	}
	if serr != nil {
		if errors.Is(serr, unix.ENOENT) || errors.Is(serr, unix.ENOPROTOOPT) {
			return netip.AddrPort{}, false, nil // not NATed (or no conntrack): not redirected
		}
		return netip.AddrPort{}, false, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", serr)
	}
	if dst.Addr() == local.Addr().Unmap() && dst.Port() == local.Port() {
		return dst, false, nil
	}
	return dst, true, nil
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, l *uint32) error {
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(l)), 0)
	if e != 0 {
		return e
	}
	return nil
}
