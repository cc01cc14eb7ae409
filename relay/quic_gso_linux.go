package relay

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// UDP GRO and GSO (Linux ≥ 5.0): quic-go's endpoints send up to 64
// datagrams of one flow with one sendmsg (UDP_SEGMENT); with UDP_GRO the
// relay reads such a train with one recvmsg and forwards it with one
// sendmsg, instead of a read and a write per datagram.

// gsoOff is set when the kernel refused a GSO send (a device without
// checksum offload): from then on trains are split and sent one by one.
var gsoOff atomic.Bool

// enableGRO asks the kernel to coalesce a flow's datagrams on c.
func enableGRO(c *net.UDPConn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1) })
}

// groSegment returns the segment size of a coalesced read (0: one datagram).
func groSegment(oob []byte) int {
	for len(oob) >= unix.CmsgSpace(0) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < unix.CmsgLen(0) || l > len(oob) {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && l >= unix.CmsgLen(4) {
			return int(binary.NativeEndian.Uint32(oob[unix.CmsgLen(0):]))
		}
		oob = oob[min(unix.CmsgSpace(l-unix.CmsgLen(0)), len(oob)):]
	}
	return 0
}

func gsoControl(seg int) []byte {
	b := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], uint16(seg))
	return b
}

// writeTrain sends b, datagrams of seg bytes (the last may be shorter),
// to `to` (zero on a connected socket), with one GSO send when it can.
func writeTrain(c *net.UDPConn, b []byte, seg int, to netip.AddrPort) error {
	if seg > 0 && len(b) > seg && !gsoOff.Load() {
		_, _, err := c.WriteMsgUDPAddrPort(b, gsoControl(seg), to)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EIO) && !errors.Is(err, unix.EINVAL) {
			return err
		}
		gsoOff.Store(true)
	}
	if seg <= 0 {
		seg = len(b)
	}
	var err error
	for off := 0; off < len(b); off += seg {
		d := b[off:min(off+seg, len(b))]
		if to.IsValid() {
			_, err = c.WriteToUDPAddrPort(d, to)
		} else {
			_, err = c.Write(d)
		}
	}
	return err
}

// trainBufs hold one coalesced read while it is forwarded: taken only
// once the socket is readable, so an idle flow holds none.
var trainBufs = sync.Pool{New: func() any { b := make([]byte, 65536); return &b }}

// readTrain waits until c is readable and reads one datagram or train
// into a pooled buffer; done gets it and returns it to the pool.
func readTrain(c *net.UDPConn, done func(b []byte, seg int)) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var oob [64]byte
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		bp := trainBufs.Get().(*[]byte)
		n, oobn, _, _, e := unix.Recvmsg(int(fd), *bp, oob[:], unix.MSG_DONTWAIT)
		if e == unix.EAGAIN || e == unix.EINTR {
			trainBufs.Put(bp)
			return false
		}
		if e != nil {
			trainBufs.Put(bp)
			rerr = e
			return true
		}
		done((*bp)[:n], groSegment(oob[:oobn]))
		trainBufs.Put(bp)
		return true
	})
	if err != nil {
		return err
	}
	return rerr
}
