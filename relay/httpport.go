package relay

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"
)

const acmeChallengePrefix = "/.well-known/acme-challenge/"

// newHTTPPortServer serves the http port: ACME HTTP-01 tokens, then a 308
// to https for every routed name (no port: users reach the relay on 443),
// else 404.
func (s *Server) newHTTPPortServer() *http.Server {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := hostOnly(r.Host)
		st := s.state.Load()
		var ent *accessEntry
		if s.alog.on() {
			ap, _ := netip.ParseAddrPort(r.RemoteAddr)
			ent = &accessEntry{Time: time.Now(), Client: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), Route: labelUnknown, Action: "http",
				Method: r.Method, Host: r.Host, Path: r.URL.Path, Referer: r.Referer(), UserAgent: r.UserAgent()}
			if len(ent.Path) > maxLoggedPath {
				ent.Path = ent.Path[:maxLoggedPath]
			}
			sw := &statusWriter{ResponseWriter: w}
			w = sw
			defer func() {
				res := sw.result
				if res == "" && sw.status == http.StatusNotFound {
					res = resultRefused
				}
				s.requestDone(ent, sw.status, max(r.ContentLength, 0), sw.n, res, sw.reason)
			}()
		}
		rt, routed := lookupRoute(st.table, host, nil)
		if !routed { // a name with alpn routes only is routed all the same
			if e, w, okE, okW := st.table.lookupBoth(host); okE {
				rt, routed = e.first, true
			} else if okW {
				rt, routed = w.first, true
			}
		}
		label := labelUnknown
		if routed {
			label = rt.label
		}
		if ent != nil {
			ent.Route = label
		}
		if token, ok := strings.CutPrefix(r.URL.Path, acmeChallengePrefix); ok && s.opts.HTTPChallenges != nil {
			if ka, ok := s.opts.HTTPChallenges.HTTP01(host, token); ok {
				s.m.connections.WithLabelValues(label, "http").Inc()
				w.Header().Set("Content-Type", "text/plain")
				io.WriteString(w, ka)
				return
			}
		}
		if routed && rt.action != "reject" {
			if s.refusedHTTP(w, r, rt) {
				return
			}
			if ent != nil {
				ent.Action = "redirect"
			}
			s.m.connections.WithLabelValues(label, "redirect").Inc()
			target := "https://" + host + r.URL.RequestURI()
			http.Redirect(w, r, target, http.StatusPermanentRedirect)
			return
		}
		s.m.connections.WithLabelValues(labelUnknown, "http").Inc()
		http.NotFound(w, r)
	})
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: s.state.Load().cfg.Limits.HelloTimeout.D(),
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){}, // plain HTTP/1 only
	}
}

// hostOnly strips the port and trailing dot from a Host header and
// lowercases it.
func hostOnly(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	return normalizeName(h)
}

// serveALPNChallenge answers an ACME TLS-ALPN-01 validation handshake.
func (s *Server) serveALPNChallenge(c *net.TCPConn, hello *ClientHello) {
	cert, ok := s.opts.ALPNChallenges.TLSALPN01(hello.ServerName)
	if !ok {
		s.log.Info("tls-alpn-01 handshake for a name with no pending challenge", "sni", hello.ServerName)
		return
	}
	conf := &tls.Config{
		Certificates: []tls.Certificate{*cert},
		NextProtos:   []string{"acme-tls/1"},
	}
	cc := &termConn{Conn: c, pending: hello.Raw}
	tc := tls.Server(cc, conf)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		s.log.Info("tls-alpn-01 handshake", "sni", hello.ServerName, "err", err)
	}
	tc.Close()
}
