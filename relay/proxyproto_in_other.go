//go:build !linux

package relay

import (
	"io"
	"net"
)

// readLine reads from c up to and including the first LF, at most len(p)
// bytes, one byte at a time (no MSG_PEEK here) so as never to read past it.
func readLine(c *net.TCPConn, p []byte) (int, error) {
	for i := range p {
		if _, err := io.ReadFull(c, p[i:i+1]); err != nil {
			return i, err
		}
		if p[i] == '\n' {
			return i + 1, nil
		}
	}
	return len(p), nil
}
