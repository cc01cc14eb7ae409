package relay

import (
	"bytes"
	"io"
	"net"
	"syscall"
)

// readLine reads from c up to and including the first LF, at most len(p)
// bytes, never past the LF: it peeks (MSG_PEEK) and then reads only what
// belongs to the line, so a v1 PROXY line costs two system calls instead
// of one per byte.
func readLine(c *net.TCPConn, p []byte) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, _, perr = syscall.Recvfrom(int(fd), p, syscall.MSG_PEEK)
			if perr != syscall.EINTR {
				return perr != syscall.EAGAIN
			}
		}
	})
	if err == nil {
		err = perr
	}
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	if i := bytes.IndexByte(p[:n], '\n'); i >= 0 {
		n = i + 1
	}
	return io.ReadFull(c, p[:n])
}
