package relay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

// What the first bytes on the https port say.
const (
	protoTLS     = "tls"
	protoSSH     = "ssh"
	protoOpenVPN = "openvpn"
	protoHTTP    = "http"
	protoSilence = "silence" // nothing within the silence route's time
)

// maxSniff bounds the bytes read to tell a protocol that is not TLS.
const maxSniff = 16

var httpMethods = [][]byte{[]byte("GET "), []byte("HEAD "), []byte("POST "), []byte("PUT "), []byte("DELETE "),
	[]byte("OPTIONS "), []byte("PATCH "), []byte("CONNECT "), []byte("TRACE ")}

var sshIDs = [][]byte{[]byte("SSH-2.0-"), []byte("SSH-1.99-")}

// OpenVPN's TCP packets are a 2-byte length, then opcode (high 5 bits)
// and key id; a client opens with a hard reset.
const (
	ovpnHardResetClientV2 = 7
	ovpnHardResetClientV3 = 10   // tls-crypt-v2
	ovpnMinResetLen       = 14   // opcode + session id + ack array length + packet id
	ovpnMaxResetLen       = 2048 // tls-crypt-v2 resets carry the wrapped client key
)

// classify reads b, the first bytes of a connection: the protocol, or
// "" once no protocol can match; more says that more bytes may decide.
func classify(b []byte) (proto string, more bool) {
	if len(b) == 0 {
		return "", true
	}
	if b[0] == recordTypeHandshake {
		return protoTLS, false
	}
	possible := false
	for _, id := range sshIDs {
		if bytes.HasPrefix(b, id) {
			return protoSSH, false
		}
		possible = possible || bytes.HasPrefix(id, b)
	}
	for _, m := range httpMethods {
		if bytes.HasPrefix(b, m) {
			return protoHTTP, false
		}
		possible = possible || bytes.HasPrefix(m, b)
	}
	if len(b) >= 3 {
		n := int(b[0])<<8 | int(b[1])
		if op := b[2] >> 3; (op == ovpnHardResetClientV2 || op == ovpnHardResetClientV3) && n >= ovpnMinResetLen && n <= ovpnMaxResetLen {
			return protoOpenVPN, false
		}
	} else if int(b[0])<<8 <= ovpnMaxResetLen {
		possible = true
	}
	return "", possible && len(b) < maxSniff
}

// sniff reads the first bytes of c until they name a protocol, waiting
// at most silence (when > 0) for the first byte and until deadline for
// the rest. It returns what it read, to be replayed.
func sniff(c net.Conn, silence time.Duration, deadline time.Time) (proto string, got []byte, err error) {
	buf := make([]byte, 0, maxSniff)
	first := deadline
	if silence > 0 && time.Now().Add(silence).Before(deadline) {
		first = time.Now().Add(silence)
	}
	if err := c.SetReadDeadline(first); err != nil {
		return "", nil, fmt.Errorf("sniff: set deadline: %w", err)
	}
	defer c.SetReadDeadline(time.Time{})
	for {
		// A TLS record header is 5 bytes: reading no more than that
		// first never reads past the ClientHello.
		want := recordHeaderLen
		if len(buf) > 0 {
			want = maxSniff
		}
		n, rerr := c.Read(buf[len(buf):want])
		buf = buf[:len(buf)+n]
		if len(buf) == 0 && rerr != nil {
			if errors.Is(rerr, os.ErrDeadlineExceeded) && silence > 0 && first.Before(deadline) {
				return protoSilence, nil, nil
			}
			return "", nil, readErr(rerr, 0)
		}
		if len(buf) > 0 && first != deadline {
			first = deadline
			c.SetReadDeadline(deadline)
		}
		p, more := classify(buf)
		if p != "" || !more {
			if p == "" {
				return "", buf, fmt.Errorf("%w (first bytes %q)", ErrNotTLS, buf)
			}
			return p, buf, nil
		}
		if rerr != nil {
			return "", buf, readErr(rerr, len(buf))
		}
	}
}

// prefixConn replays bytes already read before reading from the conn.
type prefixConn struct {
	net.Conn
	pending []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// redirectPlainHTTP answers a plain HTTP request on the https port: 308 to
// https://HOST/PATH for a routed name. It reports false (nothing sent)
// for any other request.
func (s *Server) redirectPlainHTTP(c *net.TCPConn, got []byte, st *state, deadline time.Time, ent *accessEntry) bool {
	lim := st.cfg.Limits
	c.SetReadDeadline(deadline)
	br := bufio.NewReaderSize(io.LimitReader(&prefixConn{Conn: c, pending: got}, int64(lim.MaxHelloBytes)), 4096)
	req, err := http.ReadRequest(br)
	c.SetReadDeadline(time.Time{})
	if err != nil {
		return false
	}
	host := hostOnly(req.Host)
	rt, routed := lookupRoute(st.table, host, nil)
	if !routed || rt.action == "reject" {
		return false
	}
	if ent != nil {
		ent.Route, ent.Action, ent.Method, ent.Host, ent.Path = rt.label, "redirect", req.Method, req.Host, req.URL.Path
		ent.UserAgent, ent.Referer = req.UserAgent(), req.Referer()
	}
	c.SetWriteDeadline(time.Now().Add(time.Second))
	if rt.access != nil {
		if ok, reason := rt.access.check(s.clientAddr(c).Addr()); !ok {
			s.m.accessDenied.WithLabelValues(rt.label, reason).Inc()
			io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
			if ent != nil {
				ent.Status = http.StatusForbidden
			}
			s.logEntry(ent, resultAccessDenied, reason)
			return true
		}
	}
	s.m.connections.WithLabelValues(rt.label, "redirect").Inc()
	target := "https://" + host + req.URL.RequestURI()
	fmt.Fprintf(c, "HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", target)
	if ent != nil {
		ent.Status = http.StatusPermanentRedirect
	}
	s.logEntry(ent, resultOK, "")
	return true
}

// protocolRoute is the route of a non-TLS protocol; nil = none.
func (st *state) protocolRoute(proto string) *route {
	if proto == protoSilence {
		return st.silence
	}
	return st.protocols[proto]
}

// servePlain handles a connection whose first bytes are not TLS: a
// protocol route passes it through; plain HTTP for a routed name gets a
// redirect; anything else is counted as not_tls and closed. It holds no
// max_handshakes slot: those are taken after a TLS ClientHello only.
func (s *Server) servePlain(tc *net.TCPConn, st *state, proto string, got []byte, start, deadline time.Time) (detached bool) {
	rt := st.protocolRoute(proto)
	if rt == nil {
		ent := s.connEntry(tc, start, nil, nil)
		if proto == protoHTTP && s.redirectPlainHTTP(tc, got, st, deadline, ent) {
			return false
		}
		s.m.helloErrors.WithLabelValues("not_tls").Inc()
		s.log.Debug("clienthello", "client", s.peer(tc), "reason", "not_tls", "protocol", proto)
		s.logEntry(ent, resultError, "not_tls")
		return false
	}
	if !s.routed(tc) {
		return false
	}
	dst, _ := s.destination(tc)
	ent := s.connEntry(tc, start, nil, rt)
	if s.refused(tc, rt, "", ent) {
		return false
	}
	s.log.Debug("passthrough", "route", rt.label, "client", s.peer(tc), "protocol", proto, "dst", dst)
	return s.passthrough(tc, &ClientHello{Raw: got}, rt, dst, ent)
}
