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
	table      *routeTable[*route]
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
		table:    newRouteTable[*route](),
		names:    newRouteTable[bool](),
		original: &route{label: labelOriginal, action: "passthrough", original: s},
		reject:   &route{label: labelUnknown, action: "reject"},
	}
	for i := range cfg.Routes {
		rc := &cfg.Routes[i]
		r := &route{label: normalizeName(rc.Match), action: rc.Action(), proxyProtocol: rc.ProxyProtocol}
		switch r.action {
		case "passthrough":
			r.pool = &pool{}
			for _, a := range rc.Passthrough {
				r.pool.ups = append(r.pool.ups, s.health.get(a))
			}
		case "terminate":
			if s.opts.Certs == nil {
				return nil, fmt.Errorf("route %s: terminate needs a certificate source (Options.Certs)", rc.Match)
			}
			certs, err := s.opts.Certs(rc)
			if err != nil {
				return nil, fmt.Errorf("route %s: certificates: %w", rc.Match, err)
			}
			if r.term, err = s.newTermRoute(r.label, rc.Terminate, certs); err != nil {
				return nil, fmt.Errorf("route %s: %w", rc.Match, err)
			}
			if r.term.closeIdle != nil {
				st.closeIdle = append(st.closeIdle, r.term.closeIdle)
			}
		}
		st.table.add(rc.Match, r)
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
		r, ok := st.table.lookup(u)
		if !ok {
			return nil, fmt.Errorf("unknown_sni: no route with match %q", u)
		}
		st.unknownSNI, st.unknown = "route", r
	}
	return st, nil
}

// resolve picks the route for a server name. transit says the client
// addressed some other host (REDIRECTed), not this gateway.
func (st *state) resolve(name string, transit bool) *route {
	if r, ok := st.table.lookup(name); ok {
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
	st := s.state.Load()
	lim := st.cfg.Limits
	helloTimeout, ok := s.proxyIn(tc, st)
	if !ok {
		return
	}
	hello, err := ReadClientHello(tc, helloTimeout, lim.MaxHelloBytes)
	if err != nil {
		reason := HelloErrorReason(err)
		s.m.helloErrors.WithLabelValues(reason).Inc()
		s.log.Debug("clienthello", "client", s.peer(c), "reason", reason, "err", err)
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
	rt := st.resolve(hello.ServerName, transit)
	if rt.action != "reject" && s.refused(tc, rt, hello.ServerName) {
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
	case "passthrough":
		s.releaseHandshake()
		s.log.Debug("passthrough", "route", rt.label, "client", s.peer(c), "sni", hello.ServerName, "dst", dst, "transit", transit)
		return s.passthrough(tc, hello, rt, dst)
	case "terminate":
		return s.terminate(tc, hello, rt) // releases the handshake slot after the TLS handshake
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
