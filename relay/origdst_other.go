//go:build !linux

package relay

import (
	"net"
	"net/netip"
)

// SOOriginalDst is Linux-only; elsewhere no connection is redirected.
func SOOriginalDst(*net.TCPConn) (netip.AddrPort, bool, error) { return netip.AddrPort{}, false, nil }
