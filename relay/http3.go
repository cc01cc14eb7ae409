package relay

import (
	"net"
	"net/netip"
)

// h3Server serves HTTP/3 for terminate routes on flows the QUIC listener
// hands it.
type h3Server struct{}

func (s *Server) newH3Server(pc *net.UDPConn) *h3Server { return nil }

func (h *h3Server) deliver(d []byte, client netip.AddrPort) {}

func (h *h3Server) forget(client netip.AddrPort) {}
