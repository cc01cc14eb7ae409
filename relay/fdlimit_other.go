//go:build !linux

package relay

import "net"

func openFileLimit() uint64 { return 0 }

func acceptAndClose(net.Listener) bool { return false }
