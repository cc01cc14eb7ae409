//go:build !linux

package relay

import (
	"net"
	"net/netip"
)

func enableGRO(*net.UDPConn) {}

func groSegment([]byte) int { return 0 }

func writeTrain(c *net.UDPConn, b []byte, _ int, to netip.AddrPort) error {
	var err error
	if to.IsValid() {
		_, err = c.WriteToUDPAddrPort(b, to)
	} else {
		_, err = c.Write(b)
	}
	return err
}

func readTrain(c *net.UDPConn, done func(b []byte, seg int)) error {
	b := make([]byte, quicUpBuf)
	n, err := c.Read(b)
	if err != nil {
		return err
	}
	done(b[:n], 0)
	return nil
}
