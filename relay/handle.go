package relay

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// route is a config route made ready to serve. Connections keep the route
// they were given, so a reload never changes a connection in flight.
type route struct {
	label         string // metrics label: the match, "original" or "unknown"
	action        string // passthrough | terminate | reject
	pool          *pool  // passthrough upstreams; nil for "original"
	original      *Server
	proxyProtocol string
	term          *termRoute
	access        *clientRules // allow/deny (transparent_allow for "original"); nil = open
	plain         bool         // a protocol or silence route: no TLS
	quic          bool         // passthrough: QUIC too (quic: true|false)
	h3            bool         // terminate: HTTP/3 too (h3: true|false)
}

// dial connects to the route's upstream: its pool, or for the "original"
// route the client's original destination.
func (r *route) dial(ctx context.Context, timeout time.Duration, dst netip.AddrPort, onErr func(error)) (*net.TCPConn, string, error) {
	if r.original != nil {
		c, addr, err := r.original.dialOriginal(ctx, timeout, dst)
		if err != nil && onErr != nil {
			onErr(err)
		}
		return c, addr, err
	}
	return r.pool.dial(ctx, timeout, onErr)
}

// state is one configuration ready to serve, swapped atomically on reload.
type state struct {
	cfg        *config.Config
	table      *routeTable[*routeSet]
	routes     []*route          // in the order of cfg.Routes
	protocols  map[string]*route // match: {protocol: ...}
	silence    *route            // match: {silence: ...}; nil = none
	silenceFor time.Duration
	unknown    *route // unknown_sni naming a route; nil otherwise
	unknownSNI string // original | reject | route
	original   *route
	reject     *route
	names      *routeTable[bool] // every routed name, for the http port redirect
	closeIdle  []func()          // of terminate routes' upstream pools, called when replaced
	proxyFrom  []netip.Prefix    // listen.proxy_protocol_from
}

func (s *Server) buildState(cfg *config.Config) (*state, error) {
	st := &state{
		cfg:      cfg,
		table:    newRouteTable[*routeSet](),
		names:    newRouteTable[bool](),
		original: &route{label: labelOriginal, action: "passthrough", original: s},
		reject:   &route{label: labelUnknown, action: "reject"},
	}
	for i := range cfg.Routes {
		rc := &cfg.Routes[i]
		label := rc.Label()
		if rc.IsName() && len(rc.ALPN) == 0 {
			label = normalizeName(rc.Match)
		}
		r := &route{label: label, action: rc.Action(), proxyProtocol: rc.ProxyProtocol,
			quic: rc.QUICEnabled(), h3: rc.H3Enabled()}
		st.routes = append(st.routes, r)
		switch r.action {
		case "passthrough":
			r.pool = &pool{}
			for _, a := range rc.Passthrough {
				r.pool.ups = append(r.pool.ups, s.health.get(a))
			}
		case "terminate":
			if s.opts.Certs == nil {
				return nil, fmt.Errorf("route %s: terminate needs a certificate source (Options.Certs)", label)
			}
			certs, err := s.opts.Certs(rc)
			if err != nil {
				return nil, fmt.Errorf("route %s: certificates: %w", label, err)
			}
			if r.term, err = s.newTermRoute(r.label, rc.Terminate, certs); err != nil {
				return nil, fmt.Errorf("route %s: %w", label, err)
			}
			if r.term.closeIdle != nil {
				st.closeIdle = append(st.closeIdle, r.term.closeIdle)
			}
		}
		if !rc.IsName() {
			st.addProtocolRoute(rc, r)
			continue
		}
		rs, ok := st.table.lookupExactKey(rc.Match)
		if !ok {
			rs = &routeSet{byALPN: map[string]*route{}}
			st.table.add(rc.Match, rs)
		}
		if len(rc.ALPN) == 0 {
			rs.plain = r
		}
		if rs.first == nil {
			rs.first = r
		}
		for _, p := range rc.ALPN {
			rs.byALPN[p] = r
		}
		if r.action != "reject" {
			st.names.add(rc.Match, true)
		}
	}
	if err := st.buildAccess(cfg); err != nil {
		return nil, err
	}
	switch u := cfg.UnknownSNI; u {
	case "", "original":
		st.unknownSNI = "original"
	case "reject":
		st.unknownSNI = "reject"
	default:
		r, ok := lookupRoute(st.table, u, nil)
		if !ok {
			return nil, fmt.Errorf("unknown_sni: no route with match %q", u)
		}
		st.unknownSNI, st.unknown = "route", r
	}
	return st, nil
}

// addProtocolRoute records a route chosen by the first bytes (a protocol)
// or by their absence (silence) rather than by a TLS name.
func (st *state) addProtocolRoute(rc *config.Route, r *route) {
	r.plain = true
	if rc.Protocol != "" {
		if st.protocols == nil {
			st.protocols = map[string]*route{}
		}
		st.protocols[rc.Protocol] = r
		return
	}
	st.silence, st.silenceFor = r, rc.Silence.D()
}

// resolve picks the route for a server name. transit says the client
// addressed some other host (REDIRECTed), not this gateway.
func (st *state) resolve(name string, alpn []string, transit bool) *route {
	if r, ok := lookupRoute(st.table, name, alpn); ok {
		return r
	}
	switch st.unknownSNI {
	case "route":
		return st.unknown
	case "original":
		if transit {
			return st.original
		}
	}
	return st.reject
}

// destination returns where the client meant to go and whether that is
// another host (transit) rather than this gateway.
func (s *Server) destination(c *net.TCPConn) (netip.AddrPort, bool) {
	if s.opts.OriginalDst != nil {
		od, ok, err := s.opts.OriginalDst(c)
		if err != nil {
			s.log.Debug("original destination", "client", c.RemoteAddr(), "err", err)
		}
		if ok {
			od = netip.AddrPortFrom(od.Addr().Unmap(), od.Port())
			return od, !s.isLocal(od.Addr())
		}
	}
	la, ok := addrPort(c.LocalAddr())
	if !ok {
		return netip.AddrPort{}, false
	}
	la = netip.AddrPortFrom(la.Addr().Unmap(), la.Port())
	return la, !s.isLocal(la.Addr())
}

// alertUnrecognizedName is a fatal TLS alert record (unrecognized_name), so
// a rejected client sees a clear error instead of a bare reset.
var alertUnrecognizedName = []byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70}

// handleTLS serves one connection on the https port.
// It reports whether the connection lives on (handed to the kernel) and
// is released later.
func (s *Server) handleTLS(c net.Conn) (detached bool) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		s.log.Error("https listener returned a non-TCP connection", "type", fmt.Sprintf("%T", c))
		return
	}
	start := time.Now()
	st := s.state.Load()
	lim := st.cfg.Limits
	helloTimeout, ok := s.proxyIn(tc, st)
	if !ok {
		return
	}
	// The first bytes say TLS or another protocol (protocol routes, and
	// plain HTTP to redirect); a TLS record header is never read past.
	deadline := time.Now().Add(helloTimeout)
	var silence time.Duration
	if st.silence != nil {
		silence = st.silenceFor
	}
	proto, got, err := sniff(tc, silence, deadline)
	var hello *ClientHello
	switch {
	case err != nil:
	case proto != protoTLS:
		return s.servePlain(tc, st, proto, got, start, deadline)
	default:
		hello, err = ReadClientHello(&prefixConn{Conn: tc, pending: got}, time.Until(deadline), lim.MaxHelloBytes)
	}
	if err != nil {
		reason := HelloErrorReason(err)
		s.m.helloErrors.WithLabelValues(reason).Inc()
		s.log.Debug("clienthello", "client", s.peer(c), "reason", reason, "err", err)
		s.logEntry(s.connEntry(c, start, nil, nil), resultError, reason)
		return
	}
	// The slot bounds the work after the hello (dials, TLS handshakes).
	// Waiting for a hello is bounded by max_connections and hello_timeout
	// only: 1,000 slowloris clients would otherwise hold every slot for
	// hello_timeout and make the others wait.
	if !s.acquireHandshake(lim.HelloTimeout.D()) {
		s.m.limitRejections.WithLabelValues("max_handshakes").Inc()
		return
	}
	if !s.routed(c) {
		s.releaseHandshake()
		return
	}
	dst, transit := s.destination(tc)
	if s.opts.ALPNChallenges != nil && len(hello.ALPN) == 1 && hello.ALPN[0] == "acme-tls/1" {
		defer s.releaseHandshake()
		s.serveALPNChallenge(tc, hello)
		return
	}
	rt := st.resolve(hello.ServerName, hello.ALPN, transit)
	ent := s.connEntry(c, start, hello, rt)
	if rt.action != "reject" && s.refused(tc, rt, hello.ServerName, ent) {
		s.releaseHandshake()
		return false
	}
	switch rt.action {
	case "reject":
		s.releaseHandshake()
		s.m.connections.WithLabelValues(rt.label, "reject").Inc()
		tc.SetWriteDeadline(time.Now().Add(time.Second))
		tc.Write(alertUnrecognizedName)
		s.log.Debug("rejected", "route", rt.label, "client", s.peer(c), "sni", hello.ServerName, "dst", dst)
		s.logEntry(ent, resultRefused, "")
	case "passthrough":
		s.releaseHandshake()
		s.log.Debug("passthrough", "route", rt.label, "client", s.peer(c), "sni", hello.ServerName, "dst", dst, "transit", transit)
		return s.passthrough(tc, hello, rt, dst, ent)
	case "terminate":
		return s.terminate(tc, hello, rt, ent) // releases the handshake slot after the TLS handshake
	}
	return false
}

// acquireHandshake takes a max_handshakes slot, waiting at most wait.
func (s *Server) acquireHandshake(wait time.Duration) bool {
	select {
	case s.handshakes <- struct{}{}:
		return true
	default:
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case s.handshakes <- struct{}{}:
		return true
	case <-t.C:
		return false
	}
}

func (s *Server) releaseHandshake() { <-s.handshakes }
