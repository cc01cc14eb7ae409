//go:build !linux

package relay

import (
	"io"
	"net"
)

// copyConn copies src to dst; without splice(2) io.Copy holds no pipes.
func copyConn(dst, src *net.TCPConn) (int64, error) { return io.Copy(dst, src) }

// pipeReserveFDs is what the splice pipes may hold in descriptors.
const pipeReserveFDs = 0

func closeIdlePipes() {}
