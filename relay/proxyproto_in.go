package relay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"
)

// PROXY protocol in (listen.proxy_protocol_from): connections from a
// trusted proxy begin with a v1 line or a v2 header naming the client.

const (
	proxyV1Max    = 107  // the spec's longest v1 line, CRLF included
	proxyV2Header = 16   // signature, version/command, family, length
	proxyV2MaxLen = 2048 // address block + TLVs accepted (the spec allows 65535; proxies send < 300)
)

// Errors of readProxyHeader and parseProxyHeader.
var (
	errProxyIncomplete = errors.New("proxy header: incomplete")
	errProxyMalformed  = errors.New("proxy header: malformed")
	errNoProxyHeader   = errors.New("proxy header: missing (the connection came from a listen.proxy_protocol_from address without a PROXY v1/v2 header)")
)

// proxyInfo is what a PROXY header says. Local (v2 LOCAL, v1 UNKNOWN, or
// a family we don't route) means the proxy speaks for itself: the socket's
// peer stays the client.
type proxyInfo struct {
	src, dst netip.AddrPort
	local    bool
}

// parseProxyHeader parses a PROXY v1 or v2 header at the start of b. It
// returns the header's length, errProxyIncomplete when b is a prefix of a
// header that may still be valid, or errProxyMalformed/errNoProxyHeader.
func parseProxyHeader(b []byte) (proxyInfo, int, error) {
	switch {
	case len(b) >= len(proxyV2Sig) && bytes.Equal(b[:len(proxyV2Sig)], proxyV2Sig):
		return parseProxyV2(b)
	case len(b) < len(proxyV2Sig) && bytes.HasPrefix(proxyV2Sig, b):
		return proxyInfo{}, 0, errProxyIncomplete
	case len(b) >= 6 && string(b[:6]) == "PROXY ":
		return parseProxyV1(b)
	case len(b) < 6 && bytes.HasPrefix([]byte("PROXY "), b):
		return proxyInfo{}, 0, errProxyIncomplete
	}
	return proxyInfo{}, 0, errNoProxyHeader
}

func parseProxyV1(b []byte) (proxyInfo, int, error) {
	end := bytes.IndexByte(b, '\n')
	if end < 0 {
		if len(b) >= proxyV1Max {
			return proxyInfo{}, 0, fmt.Errorf("%w: v1 line longer than %d bytes", errProxyMalformed, proxyV1Max)
		}
		return proxyInfo{}, 0, errProxyIncomplete
	}
	n := end + 1
	if n > proxyV1Max || end == 0 || b[end-1] != '\r' {
		return proxyInfo{}, 0, fmt.Errorf("%w: v1 line not ended by CRLF within %d bytes", errProxyMalformed, proxyV1Max)
	}
	f := bytes.Split(b[6:end-1], []byte(" "))
	if string(f[0]) == "UNKNOWN" {
		return proxyInfo{local: true}, n, nil // the rest of the line is ignored (spec 2.1)
	}
	if len(f) != 5 || (string(f[0]) != "TCP4" && string(f[0]) != "TCP6") {
		return proxyInfo{}, 0, fmt.Errorf("%w: v1 line %q", errProxyMalformed, b[:end-1])
	}
	src, err1 := netip.ParseAddr(string(f[1]))
	dst, err2 := netip.ParseAddr(string(f[2]))
	sp, err3 := parsePort(f[3])
	dp, err4 := parsePort(f[4])
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return proxyInfo{}, 0, fmt.Errorf("%w: v1 line %q", errProxyMalformed, b[:end-1])
	}
	if v4 := string(f[0]) == "TCP4"; v4 != src.Is4() || v4 != dst.Is4() || src.Zone() != "" || dst.Zone() != "" {
		return proxyInfo{}, 0, fmt.Errorf("%w: v1 addresses do not match %s", errProxyMalformed, f[0])
	}
	return proxyInfo{src: netip.AddrPortFrom(src.Unmap(), sp), dst: netip.AddrPortFrom(dst.Unmap(), dp)}, n, nil
}

// parsePort parses a decimal port without sign or leading zeros.
func parsePort(b []byte) (uint16, error) {
	if len(b) == 0 || len(b) > 5 || (len(b) > 1 && b[0] == '0') {
		return 0, errProxyMalformed
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, errProxyMalformed
		}
	}
	v, err := strconv.Atoi(string(b))
	if err != nil || v > 65535 {
		return 0, errProxyMalformed
	}
	return uint16(v), nil
}

func parseProxyV2(b []byte) (proxyInfo, int, error) {
	if len(b) < proxyV2Header {
		return proxyInfo{}, 0, errProxyIncomplete
	}
	verCmd, fam := b[12], b[13]
	l := int(binary.BigEndian.Uint16(b[14:16]))
	if verCmd>>4 != 2 {
		return proxyInfo{}, 0, fmt.Errorf("%w: v2 version %d", errProxyMalformed, verCmd>>4)
	}
	if l > proxyV2MaxLen {
		return proxyInfo{}, 0, fmt.Errorf("%w: v2 header of %d bytes (at most %d)", errProxyMalformed, l, proxyV2MaxLen)
	}
	n := proxyV2Header + l
	if len(b) < n {
		return proxyInfo{}, 0, errProxyIncomplete
	}
	body := b[proxyV2Header:n]
	switch verCmd & 0xf {
	case 0x0: // LOCAL: health checks of the proxy itself
		return proxyInfo{local: true}, n, nil
	case 0x1: // PROXY
	default:
		return proxyInfo{}, 0, fmt.Errorf("%w: v2 command %d", errProxyMalformed, verCmd&0xf)
	}
	switch fam {
	case 0x11: // TCP over IPv4
		if len(body) < 12 {
			return proxyInfo{}, 0, fmt.Errorf("%w: v2 IPv4 block of %d bytes", errProxyMalformed, len(body))
		}
		src := netip.AddrFrom4([4]byte(body[0:4]))
		dst := netip.AddrFrom4([4]byte(body[4:8]))
		return proxyInfo{
			src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(body[8:10])),
			dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(body[10:12])),
		}, n, nil
	case 0x21: // TCP over IPv6
		if len(body) < 36 {
			return proxyInfo{}, 0, fmt.Errorf("%w: v2 IPv6 block of %d bytes", errProxyMalformed, len(body))
		}
		src := netip.AddrFrom16([16]byte(body[0:16])).Unmap()
		dst := netip.AddrFrom16([16]byte(body[16:32])).Unmap()
		return proxyInfo{
			src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(body[32:34])),
			dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(body[34:36])),
		}, n, nil
	}
	// UNSPEC, UDP, unix sockets: no client address we could use.
	return proxyInfo{local: true}, n, nil
}

// readProxyHeader reads exactly one PROXY header from c, never a byte of
// what follows it (the ClientHello is read next), by deadline.
func readProxyHeader(c *net.TCPConn, deadline time.Time) (proxyInfo, error) {
	if err := c.SetReadDeadline(deadline); err != nil {
		return proxyInfo{}, fmt.Errorf("proxy header: set deadline: %w", err)
	}
	defer c.SetReadDeadline(time.Time{})
	// 8 bytes tell v1 ("PROXY TC", "PROXY UN") from v2 and are never
	// more than a header: the shortest one, "PROXY UNKNOWN\r\n", has 15.
	buf := make([]byte, 8, proxyV2Header)
	if _, err := io.ReadFull(c, buf); err != nil {
		return proxyInfo{}, proxyReadErr(err)
	}
	if bytes.Equal(buf, proxyV2Sig[:8]) {
		buf = buf[:proxyV2Header]
		if _, err := io.ReadFull(c, buf[8:]); err != nil {
			return proxyInfo{}, proxyReadErr(err)
		}
		if info, _, err := parseProxyHeader(buf); !errors.Is(err, errProxyIncomplete) {
			return info, err // bad, or no address block
		}
		l := int(binary.BigEndian.Uint16(buf[14:16]))
		buf = append(buf, make([]byte, l)...)
		if _, err := io.ReadFull(c, buf[proxyV2Header:]); err != nil {
			return proxyInfo{}, proxyReadErr(err)
		}
		info, _, err := parseProxyHeader(buf)
		return info, err
	}
	if string(buf[:6]) != "PROXY " {
		return proxyInfo{}, errNoProxyHeader
	}
	// v1: read up to the LF without reading past it.
	tmp := make([]byte, proxyV1Max)
	for {
		n, err := readLine(c, tmp[:proxyV1Max-len(buf)])
		buf = append(buf, tmp[:n]...)
		if err != nil {
			return proxyInfo{}, proxyReadErr(err)
		}
		info, _, perr := parseProxyHeader(buf)
		if !errors.Is(perr, errProxyIncomplete) {
			return info, perr
		}
		if len(buf) >= proxyV1Max {
			return proxyInfo{}, fmt.Errorf("%w: v1 line longer than %d bytes", errProxyMalformed, proxyV1Max)
		}
	}
}

func proxyReadErr(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("proxy header: %w", ErrHelloTimeout)
	}
	return fmt.Errorf("proxy header: read: %w", err)
}

// proxyIn reads the PROXY header of a connection from a
// listen.proxy_protocol_from peer and makes its source the client's. It
// returns how much of limits.hello_timeout is left for the ClientHello;
// false: the connection is to be closed (counted, logged).
func (s *Server) proxyIn(c *net.TCPConn, st *state) (time.Duration, bool) {
	timeout := st.cfg.Limits.HelloTimeout.D()
	peer, ok := addrPort(c.RemoteAddr())
	if !ok || !st.fromProxy(peer.Addr()) {
		return timeout, true
	}
	deadline := time.Now().Add(timeout)
	info, err := readProxyHeader(c, deadline)
	if err != nil {
		reason := "proxy_header"
		if errors.Is(err, ErrHelloTimeout) {
			reason = "timeout"
		}
		s.m.helloErrors.WithLabelValues(reason).Inc()
		s.log.Debug("proxy header", "peer", peer, "reason", reason, "err", err)
		return 0, false
	}
	src := info.src
	if info.local || !src.IsValid() {
		src = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	}
	if !s.countClient(c, src, src, st.cfg.Limits.PerClient) {
		return 0, false
	}
	return time.Until(deadline), true
}

// fromProxy reports whether a is in listen.proxy_protocol_from.
func (st *state) fromProxy(a netip.Addr) bool {
	return len(st.proxyFrom) > 0 && matchAny(st.proxyFrom, a.Unmap())
}

// proxyListener reads the PROXY header of connections from
// listen.proxy_protocol_from peers on the http port before the HTTP server
// sees them, each on a goroutine of its own bounded by hello_timeout, so
// that a slow proxy never holds up the accept loop. Other connections
// pass straight through.
type proxyListener struct {
	net.Listener
	s       *Server
	results chan acceptResult
	done    chan struct{}
	once    sync.Once
}

type acceptResult struct {
	c   net.Conn
	err error
}

func (s *Server) proxyListener(ln net.Listener) net.Listener {
	pl := &proxyListener{Listener: ln, s: s, results: make(chan acceptResult), done: make(chan struct{})}
	go pl.loop()
	return pl
}

func (pl *proxyListener) loop() {
	for {
		c, err := pl.Listener.Accept()
		if err != nil {
			if !pl.deliver(acceptResult{err: err}) || errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		st := pl.s.state.Load()
		tc, ok := c.(*net.TCPConn)
		peer, _ := addrPort(c.RemoteAddr())
		if !ok || !st.fromProxy(peer.Addr()) {
			if !pl.deliver(acceptResult{c: c}) {
				c.Close()
				return
			}
			continue
		}
		go func() {
			info, err := readProxyHeader(tc, time.Now().Add(st.cfg.Limits.HelloTimeout.D()))
			if err != nil {
				pl.s.m.helloErrors.WithLabelValues("proxy_header").Inc()
				pl.s.log.Debug("proxy header on the http port", "peer", peer, "err", err)
				c.Close()
				return
			}
			var out net.Conn = tc
			if !info.local && info.src.IsValid() {
				out = &proxiedConn{TCPConn: tc, src: net.TCPAddrFromAddrPort(info.src)}
			}
			if !pl.deliver(acceptResult{c: out}) {
				c.Close()
			}
		}()
	}
}

func (pl *proxyListener) deliver(r acceptResult) bool {
	select {
	case pl.results <- r:
		return true
	case <-pl.done:
		return false
	}
}

func (pl *proxyListener) Accept() (net.Conn, error) {
	select {
	case r := <-pl.results:
		return r.c, r.err
	case <-pl.done:
		return nil, net.ErrClosed
	}
}

func (pl *proxyListener) Close() error {
	pl.once.Do(func() { close(pl.done) })
	return pl.Listener.Close()
}

// proxiedConn is an http port connection whose client a PROXY header
// named.
type proxiedConn struct {
	*net.TCPConn
	src net.Addr
}

func (c *proxiedConn) RemoteAddr() net.Addr { return c.src }
