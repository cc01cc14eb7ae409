package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// termRoute is a terminate route: TLS config and where decrypted traffic
// goes (an HTTP reverse proxy, or raw TCP).
type termRoute struct {
	label   string
	tlsConf *tls.Config
	handler http.Handler // http:// or https:// upstream, for h2 clients
	proxy   *httpProxy   // the upstream with the relay's own proxy; nil: handler serves all
	tcpAddr string       // tcp:// upstream
	// closeIdle closes the idle upstream connections (the route was
	// replaced by a reload); nil for tcp:// upstreams.
	closeIdle func()
	auth      *routeAuth // basic_auth, forward_auth; nil = none
}

func (s *Server) newTermRoute(label string, t *config.Terminate, certs CertSource) (*termRoute, error) {
	u, err := url.Parse(t.Upstream)
	if err != nil {
		return nil, fmt.Errorf("terminate.upstream %q: %w", t.Upstream, err)
	}
	getCert := certs.GetCertificate
	if !strings.ContainsAny(label, "*{}: ") {
		// No SNI (unknown_sni naming this route): the certificate for
		// the route's own name.
		getCert = func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if h.ServerName == "" {
				named := *h
				named.ServerName = label
				h = &named
			}
			return certs.GetCertificate(h)
		}
	}
	tr := &termRoute{
		label:   label,
		tlsConf: tlsProfile(getCert),
	}
	if err := clientAuthConfig(tr.tlsConf, t.ClientAuth); err != nil { // mTLS
		return nil, err
	}
	if tr.auth, err = s.newRouteAuth(label, t); err != nil {
		return nil, err
	}
	switch u.Scheme {
	case "tcp":
		tr.tcpAddr = u.Host
		return tr, nil
	case "http", "https":
	default:
		return nil, fmt.Errorf("terminate.upstream %q: scheme must be http, https or tcp", t.Upstream)
	}
	tr.tlsConf.NextProtos = []string{"h2", "http/1.1"}
	hsts := ""
	if t.HSTS > 0 {
		hsts = "max-age=" + strconv.FormatInt(int64(t.HSTS.D()/time.Second), 10)
	}
	var upTLS *tls.Config
	if u.Scheme == "https" {
		upTLS = &tls.Config{InsecureSkipVerify: t.UpstreamInsecure}
		if t.UpstreamCA != "" {
			pem, err := os.ReadFile(t.UpstreamCA)
			if err != nil {
				return nil, fmt.Errorf("read terminate.upstream_ca: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("terminate.upstream_ca %s: no PEM certificates in it", t.UpstreamCA)
			}
			upTLS.RootCAs = pool
		}
	}
	if (u.Path == "" || u.Path == "/") && u.RawQuery == "" {
		p := &httpProxy{s: s, label: label, addr: u.Host, tlsConf: upTLS, hsts: hsts}
		if u.Port() == "" {
			p.addr = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
		}
		if upTLS != nil {
			upTLS.ServerName = u.Hostname()
		}
		tr.proxy = p
		tr.handler = p // h2 streams
		tr.closeIdle = p.closeIdle
		return tr, nil
	}
	// An upstream URL with a path or query: httputil.ReverseProxy joins
	// it with the request's.
	transport := &http.Transport{
		DialContext: dialer(s.state0Limits().DialTimeout.D()).DialContext,
		// As many idle upstream connections as requests were in flight
		// (up to one h2 client's 250 streams): with fewer, every request
		// above the limit dialled and then closed its connection (64
		// concurrent GETs: ~20% of requests reconnected, at ~25% more
		// relay CPU per request).
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 0, // long polls and slow APIs are the upstream's business
		// Accept-Encoding is the client's to choose: by default the
		// Transport asks for gzip where the client did not and then
		// decompresses the response in the relay.
		DisableCompression: true,
		TLSClientConfig:    upTLS,
	}
	tr.closeIdle = transport.CloseIdleConnections
	errLog := slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)
	tr.handler = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			// The upstream sees the client's Host (as Caddy does), and
			// X-Forwarded-* set by us: Rewrite mode has already dropped
			// the client's own, which are not trusted at the edge.
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		ModifyResponse: func(r *http.Response) error {
			setHSTS(r.Header, hsts)
			return nil
		},
		Transport:  transport,
		BufferPool: proxyBuffers,
		ErrorLog:   errLog,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			reason := "http"
			if errors.Is(err, context.Canceled) {
				reason = "canceled"
			} else {
				reason = dialErrorReason(err)
			}
			s.upstreamError(label, reason)
			s.log.Warn("upstream request", "route", label, "upstream", u.Host, "err", err)
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	return tr, nil
}

// setHSTS adds Strict-Transport-Security (value v; "" = off) unless the
// upstream set its own.
func setHSTS(h http.Header, v string) {
	if v != "" && h.Get("Strict-Transport-Security") == "" {
		h.Set("Strict-Transport-Security", v)
	}
}

// tlsProfile is Mozilla's "intermediate" server profile: TLS 1.3, and
// TLS 1.2 with AEAD suites only (no CBC: LUCKY13), forward secrecy,
// post-quantum key exchange first.
func tlsProfile(getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)) *tls.Config {
	return &tls.Config{
		GetCertificate: getCert,
		MinVersion:     tls.VersionTLS12,
		CipherSuites: []uint16{ // TLS 1.2 only; Go's TLS 1.3 suites are all AEAD
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256, tls.CurveP384},
	}
}

// proxyBuffers are the ReverseProxy's copy buffers: without a pool it
// allocates 32 KB per request, which was 72% of all allocation per GET.
var proxyBuffers = &bufferPool{p: sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte  { return *b.p.Get().(*[]byte) }
func (b *bufferPool) Put(x []byte) { b.p.Put(&x) }

// state0Limits returns the limits of the state being served, or defaults
// while the first state is being built.
func (s *Server) state0Limits() config.Limits {
	if st := s.state.Load(); st != nil {
		return st.cfg.Limits
	}
	return s.opts.Config.Limits
}

// terminate ends TLS on client and forwards the plaintext. It releases the
// handshake slot once the TLS handshake is done. HTTP connections live on
// in the http server, which releases them when it closes them: for those
// it returns true.
func (s *Server) terminate(client *net.TCPConn, hello *ClientHello, rt *route, ent *accessEntry) (detached bool) {
	lim := s.state.Load().cfg.Limits
	cc := &termConn{Conn: client, pending: hello.Raw, route: rt, s: s, remote: s.peer(client), ent: ent}
	tlsConn := tls.Server(cc, rt.term.tlsConf)
	client.SetDeadline(time.Now().Add(lim.HelloTimeout.D()))
	err := tlsConn.Handshake()
	client.SetDeadline(time.Time{})
	s.releaseHandshake()
	if err != nil {
		s.m.tlsErrors.WithLabelValues(rt.label).Inc()
		s.log.Info("tls handshake", "route", rt.label, "sni", hello.ServerName, "client", cc.remote, "err", err)
		if s.certRefused(rt, err) { // client_auth: relay_access_denied_total
			s.logEntry(ent, resultAccessDenied, deniedClientCert)
		} else {
			s.logEntry(ent, resultError, "tls_handshake")
		}
		return false
	}
	s.m.connections.WithLabelValues(rt.label, "terminate").Inc()
	s.m.active.WithLabelValues(rt.label, "terminate").Inc()
	cc.counted = true
	if rt.h3 && s.quic != nil && rt.term.handler != nil {
		dst, _ := s.destination(client)
		cc.alt = altSvc(dst.Port())
	}
	if rt.term.tcpAddr != "" {
		s.terminateTCP(tlsConn, rt, lim, ent)
		return false
	}
	// The http server owns the conn until it closes it, which releases it.
	// This goroutine ends: its stack grew in the handshake and would stay
	// with every keep-alive connection. The conn stays routed, so a drain
	// waits for it and closes it at the drain timeout (http.Server.Shutdown
	// closes only idle ones).
	cc.release = true
	if rt.term.proxy != nil {
		if tlsConn.ConnectionState().NegotiatedProtocol == "h2" {
			go s.serveH2(tlsConn, cc, rt)
		} else {
			go s.serveH1(tlsConn, cc, rt)
		}
		return true
	}
	if !s.term().deliver(tlsConn) {
		tlsConn.Close()
	}
	return true
}

// terminateTCP copies between the TLS connection and a raw TCP upstream.
func (s *Server) terminateTCP(tlsConn *tls.Conn, rt *route, lim config.Limits, ent *accessEntry) {
	defer tlsConn.Close()
	if ent != nil {
		ent.Upstream = rt.term.tcpAddr
	}
	up, err := dialer(lim.DialTimeout.D()).Dial("tcp", rt.term.tcpAddr)
	if err != nil {
		s.upstreamError(rt.label, dialErrorReason(err))
		s.log.Warn("upstream unreachable", "route", rt.label, "upstream", rt.term.tcpAddr, "err", err)
		s.logEntry(ent, resultUpstreamError, dialErrorReason(err))
		return
	}
	defer up.Close()
	var wg sync.WaitGroup
	var n int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		n, _ = io.Copy(up, tlsConn)
		up.(*net.TCPConn).CloseWrite()
	}()
	m, err := io.Copy(tlsConn, up)
	tlsConn.CloseWrite()
	wg.Wait()
	if ent != nil {
		ent.Up, ent.Down = n, m
		res, reason := endResult(err)
		s.logEntry(ent, res, reason)
	}
}

// termConn replays the peeked ClientHello to crypto/tls, counts bytes, and
// ends the connection's accounting when it is closed. It is all the relay
// keeps per terminated connection (no closures, timers or channels: they
// would stay with every idle keep-alive connection).
type termConn struct {
	net.Conn
	pending []byte
	route   *route
	s       *Server
	in, out atomic.Int64
	once    sync.Once
	counted bool         // past the handshake: in relay_active_connections
	release bool         // set before the hand-off to the http server: Close releases the conn
	remote  net.Addr     // the client: its PROXY header's source, else the socket's peer
	ent     *accessEntry // the access log's connection fields, copied for each request; nil = no log
	alt     []string     // Alt-Svc of the answers (h3); nil = none
}

// RemoteAddr is the client's address (X-Forwarded-For, logs), which a
// trusted proxy's PROXY header may have given.
func (c *termConn) RemoteAddr() net.Addr {
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

func (c *termConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			// Replayed: an empty tail would still pin the hello's ~2 KB
			// buffer for as long as the connection lives.
			c.pending = nil
		}
		return n, nil
	}
	n, err := c.Conn.Read(p)
	c.in.Add(int64(n))
	return n, err
}

func (c *termConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.out.Add(int64(n))
	return n, err
}

func (c *termConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.closed)
	return err
}

func (c *termConn) closed() {
	if c.counted {
		label := c.route.label
		c.s.m.active.WithLabelValues(label, "terminate").Dec()
		c.s.m.bytes.WithLabelValues(label, "upstream").Add(float64(c.in.Load()))
		c.s.m.bytes.WithLabelValues(label, "downstream").Add(float64(c.out.Load()))
	}
	if c.release {
		c.s.release(c.Conn)
	}
}

// termServer is one http.Server for every terminate route; each connection
// carries its route, so the handler needs no Host lookup.
type termServer struct {
	srv   *http.Server
	conns chan net.Conn
	stop  chan struct{}
	once  sync.Once

	// HTTP/1.x connections in the relay's own proxy loop.
	draining atomic.Bool
	mu       sync.Mutex
	h1       map[*h1Conn]struct{}
	h2       map[*h2Conn]struct{} // and HTTP/2 ones in the relay's h2 server
	h1Gone   chan struct{}        // closed when draining and h1 and h2 are empty
}

// addH1 registers a connection of the proxy loop; false while draining.
func (ts *termServer) addH1(h *h1Conn) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.draining.Load() {
		return false
	}
	ts.h1[h] = struct{}{}
	return true
}

func (ts *termServer) removeH1(h *h1Conn) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	delete(ts.h1, h)
	ts.goneLocked()
}

// addH2 registers a connection of the h2 server; false while draining.
func (ts *termServer) addH2(c *h2Conn) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.draining.Load() {
		return false
	}
	ts.h2[c] = struct{}{}
	return true
}

func (ts *termServer) removeH2(c *h2Conn) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	delete(ts.h2, c)
	ts.goneLocked()
}

func (ts *termServer) goneLocked() {
	if len(ts.h1) == 0 && len(ts.h2) == 0 && ts.h1Gone != nil {
		close(ts.h1Gone)
		ts.h1Gone = nil
	}
}

type (
	routeCtxKey  struct{}
	altSvcCtxKey struct{}
)

// serveTerminated answers a request of a terminate route served by
// net/http (upstreams with a path) or by the http3 server.
func (s *Server) serveTerminated(w http.ResponseWriter, r *http.Request) {
	rt, _ := r.Context().Value(routeCtxKey{}).(*route)
	if rt == nil || rt.term == nil || rt.term.handler == nil {
		http.Error(w, "no route", http.StatusMisdirectedRequest)
		return
	}
	cc, _ := r.Context().Value(termConnCtxKey{}).(*termConn)
	if ent := s.requestEntry(cc, r); ent != nil {
		sw := &statusWriter{ResponseWriter: w}
		w = sw
		defer func() { s.requestDone(ent, sw.status, max(r.ContentLength, 0), sw.n, sw.result, sw.reason) }()
	}
	if !s.authorizeHTTP(w, r, rt) {
		return
	}
	if alt, _ := r.Context().Value(altSvcCtxKey{}).([]string); alt != nil {
		w.Header()["Alt-Svc"] = alt
	}
	rt.term.handler.ServeHTTP(w, r)
}

// termConnCtxKey carries a request's *termConn (for the access log).
type termConnCtxKey struct{}

func (s *Server) term() *termServer {
	s.termOnce.Do(func() {
		ts := &termServer{conns: make(chan net.Conn), stop: make(chan struct{}), h1: make(map[*h1Conn]struct{}), h2: make(map[*h2Conn]struct{})}
		idle := s.state.Load().cfg.Limits.IdleTimeout.D()
		var protos http.Protocols
		protos.SetHTTP1(true)
		protos.SetHTTP2(true)
		ts.srv = &http.Server{
			Handler: http.HandlerFunc(s.serveTerminated),
			ConnContext: func(ctx context.Context, c net.Conn) context.Context {
				if tc, ok := c.(*tls.Conn); ok {
					if cc, ok := tc.NetConn().(*termConn); ok {
						ctx = context.WithValue(ctx, termConnCtxKey{}, cc)
						ctx = context.WithValue(ctx, altSvcCtxKey{}, cc.alt)
						return context.WithValue(ctx, routeCtxKey{}, cc.route)
					}
				}
				return ctx
			},
			Protocols:         &protos,
			ReadHeaderTimeout: 30 * time.Second,
			IdleTimeout:       idle,
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		}
		ts.srv.TLSConfig = &tls.Config{NextProtos: []string{"h2", "http/1.1"}}
		go ts.srv.Serve(&chanListener{ts: ts, addr: s.httpsLn.Addr()})
		s.termSrv = ts
	})
	return s.termSrv
}

// deliver hands a handshaken connection to the http server.
func (ts *termServer) deliver(c net.Conn) bool {
	select {
	case ts.conns <- c:
		return true
	case <-ts.stop:
		return false
	}
}

// shutdown stops the http server gracefully (idle keep-alive connections
// are closed, requests in flight finish) within ctx.
func (ts *termServer) shutdown(ctx context.Context) {
	if ts == nil {
		return
	}
	ts.once.Do(func() { close(ts.stop) })
	ts.mu.Lock()
	ts.draining.Store(true)
	var parked []*h1Conn
	for h := range ts.h1 {
		// Between requests: closed now; the others close after their
		// response.
		if h.state.CompareAndSwap(h1Idle, h1Closed) {
			h.cc.Conn.Close() // its goroutine ends it
		} else if h.state.CompareAndSwap(h1Parked, h1Closed) {
			parked = append(parked, h)
		}
	}
	gone := make(chan struct{})
	if len(ts.h1) == 0 && len(ts.h2) == 0 {
		close(gone)
	} else {
		ts.h1Gone = gone
	}
	h2s := make([]*h2Conn, 0, len(ts.h2))
	for c := range ts.h2 {
		h2s = append(h2s, c)
	}
	ts.mu.Unlock()
	for _, h := range parked {
		h.end()
	}
	for _, c := range h2s {
		c.drain() // GOAWAY: streams in flight finish
	}
	ts.srv.Shutdown(ctx)
	select {
	case <-gone:
	case <-ctx.Done():
		ts.mu.Lock()
		for h := range ts.h1 {
			h.kill()
		}
		for c := range ts.h2 {
			c.kill()
		}
		ts.mu.Unlock()
	}
}

type chanListener struct {
	ts   *termServer
	addr net.Addr
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ts.conns:
		return c, nil
	case <-l.ts.stop:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

// misdirected reports a request whose Host (or :authority) names another
// route than the one the connection's TLS server name chose: it is
// answered 421 (RFC 9110 15.5.20), never proxied under the wrong route's
// rules and certificate. Other names of the same route (a wildcard's, h2
// connection coalescing) are not misdirected, nor is a connection without
// SNI (unknown_sni: route) asking for that route's name.
func (s *Server) misdirected(rt *route, sni, host, alpn string) bool {
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	name = normalizeName(strings.Trim(name, "[]"))
	if name == "" || name == normalizeName(sni) {
		return false
	}
	var protos []string
	if alpn != "" {
		protos = []string{alpn}
	}
	r := s.state.Load().resolve(name, protos, false)
	// Labels, not pointers: a reload since the handshake made new routes.
	return r == nil || r.label != rt.label
}
