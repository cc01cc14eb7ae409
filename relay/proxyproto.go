package relay

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// proxyHeaderV1 returns a PROXY protocol v1 line for a connection from src
// to dst.
func proxyHeaderV1(src net.Addr, dst netip.AddrPort) []byte {
	s, ok := addrPort(src)
	if !ok || !dst.IsValid() {
		return []byte("PROXY UNKNOWN\r\n")
	}
	s, d := s, dst
	fam := "TCP4"
	if s.Addr().Unmap().Is4() && d.Addr().Unmap().Is4() {
		s = netip.AddrPortFrom(s.Addr().Unmap(), s.Port())
		d = netip.AddrPortFrom(d.Addr().Unmap(), d.Port())
	} else {
		fam = "TCP6"
		s = netip.AddrPortFrom(as16(s.Addr()), s.Port())
		d = netip.AddrPortFrom(as16(d.Addr()), d.Port())
	}
	return fmt.Appendf(nil, "PROXY %s %s %s %d %d\r\n", fam, s.Addr(), d.Addr(), s.Port(), d.Port())
}

func as16(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.As16()) }

var proxyV2Sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

// PROXY v2 TLV types (spec section 2.2).
const (
	pp2TypeALPN      = 0x01
	pp2TypeAuthority = 0x02
)

// proxyHeaderV2 returns a PROXY protocol v2 header; it carries the
// ClientHello's SNI (authority) and first ALPN as TLVs so the upstream
// learns the requested name without decrypting.
func proxyHeaderV2(src net.Addr, dst netip.AddrPort, hello *ClientHello) []byte {
	h := append([]byte(nil), proxyV2Sig...)
	s, ok := addrPort(src)
	var addrs []byte
	famProto := byte(0x00) // AF_UNSPEC
	switch {
	case !ok || !dst.IsValid():
	case s.Addr().Unmap().Is4() && dst.Addr().Unmap().Is4():
		famProto = 0x11 // TCP over IPv4
		a, b := s.Addr().Unmap().As4(), dst.Addr().Unmap().As4()
		addrs = append(append(addrs, a[:]...), b[:]...)
		addrs = binary.BigEndian.AppendUint16(addrs, s.Port())
		addrs = binary.BigEndian.AppendUint16(addrs, dst.Port())
	default:
		famProto = 0x21 // TCP over IPv6
		a, b := s.Addr().As16(), dst.Addr().As16()
		addrs = append(append(addrs, a[:]...), b[:]...)
		addrs = binary.BigEndian.AppendUint16(addrs, s.Port())
		addrs = binary.BigEndian.AppendUint16(addrs, dst.Port())
	}
	var tlvs []byte
	if hello != nil && len(hello.ALPN) > 0 {
		tlvs = appendTLV(tlvs, pp2TypeALPN, []byte(hello.ALPN[0]))
	}
	if hello != nil && hello.ServerName != "" {
		tlvs = appendTLV(tlvs, pp2TypeAuthority, []byte(hello.ServerName))
	}
	cmd := byte(0x21) // version 2, PROXY
	if famProto == 0 {
		cmd = 0x20 // LOCAL: no address information
	}
	h = append(h, cmd, famProto)
	h = binary.BigEndian.AppendUint16(h, uint16(len(addrs)+len(tlvs)))
	h = append(h, addrs...)
	return append(h, tlvs...)
}

func appendTLV(b []byte, typ byte, v []byte) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

func addrPort(a net.Addr) (netip.AddrPort, bool) {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort(), true
	}
	if a == nil {
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(strings.TrimSpace(a.String()))
	return ap, err == nil
}
