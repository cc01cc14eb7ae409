package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/internal/metrics"
)

// Options wires a Server. Only Config is required.
type Options struct {
	Config *config.Config

	// Certs returns the certificate source of a terminate route. Required
	// when the config has terminate routes.
	Certs func(r *config.Route) (CertSource, error)
	// HTTPChallenges and ALPNChallenges serve ACME challenges; nil = none.
	HTTPChallenges HTTPChallenges
	ALPNChallenges ALPNChallenges
	// OriginalDst reads the pre-NAT destination; nil = the accepted
	// socket's local address is the destination (no REDIRECT).
	OriginalDst OriginalDst
	// Splicer moves passthrough bytes in the kernel when the config says
	// `splice: sockmap`; nil = splice(2) via io.Copy between *net.TCPConn.
	Splicer Splicer
	// IsLocal reports whether an address belongs to this host (never
	// dialled: it would loop into the relay). nil = net.InterfaceAddrs.
	IsLocal func(netip.Addr) bool

	// Registry receives the relay's metrics; nil = a new registry with the
	// Go and process collectors (served at /metrics).
	Registry *metrics.Registry
	Logger   *slog.Logger

	// Listeners, when set, are used instead of listening on
	// Config.Listen addresses (tests; fd hand-over).
	HTTPSListener   net.Listener
	HTTPListener    net.Listener
	MetricsListener net.Listener
	// QUICConn, when set, is the UDP socket for QUIC instead of one bound
	// on the https listener's address.
	QUICConn *net.UDPConn
}

// Server is a running relay: the https (ClientHello-routed), http and
// metrics listeners, and the route state they share.
type Server struct {
	opts     Options
	log      *slog.Logger
	reg      *metrics.Registry
	m        *relayMetrics
	state    atomic.Pointer[state]
	isLocal  func(netip.Addr) bool
	splicer  Splicer
	trim     *trimmer
	engOnce  sync.Once
	eng      *engine // nil: unavailable, passthrough copies with goroutines
	health   healthRegistry
	termSrv  *termServer
	termOnce sync.Once
	httpsLn  net.Listener
	httpLn   net.Listener
	metricLn net.Listener

	conns      sync.WaitGroup
	active     atomic.Int64
	handshakes chan struct{} // semaphore: max_handshakes
	maxConns   atomic.Int64  // max_connections fitted to RLIMIT_NOFILE
	fds        *fdShedder    // sheds connections on EMFILE/ENFILE

	mu      sync.Mutex
	tracked map[net.Conn]connState // open client conns; drain treats them by state
	// hardCtx is canceled when the drain timeout ends: detached conns close.
	hardCtx    context.Context
	hardCancel context.CancelFunc
	closing    bool

	// Status page: start time, per-second history, last error per route,
	// and the caller's hook.
	started    time.Time
	hist       history
	lastErrors sync.Map // route label → *errEvent
	statusMu   sync.Mutex
	statusHook func(*Status)

	alog     accessLogger // log.access
	reloadMu sync.Mutex   // serializes Reload
	clients  clients      // per-client limits and PROXY sources

	qm   *quicMetrics
	quic *quicServer // nil: no UDP socket (bind failed)
}

// New builds a Server and opens its listeners. Close (or Serve returning)
// releases them.
func New(opts Options) (*Server, error) {
	if opts.Config == nil {
		return nil, errors.New("relay: Options.Config is required")
	}
	s := &Server{
		opts:    opts,
		log:     opts.Logger,
		reg:     opts.Registry,
		isLocal: opts.IsLocal,
		splicer: opts.Splicer,
		trim:    newTrimmer(),
		tracked: map[net.Conn]connState{},
		started: time.Now(),
	}
	s.hardCtx, s.hardCancel = context.WithCancel(context.Background())
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.reg == nil {
		s.reg = metrics.NewRegistry()
		s.reg.MustRegister(metrics.NewGoCollector(), metrics.NewProcessCollector())
	}
	if s.isLocal == nil {
		s.isLocal = newLocalAddrs().contains
	}
	m, err := newMetrics(s.reg, s.splicer)
	if err != nil {
		return nil, err
	}
	s.m = m
	if err := s.reg.Register(droppedCollector{&s.alog.dropped}); err != nil {
		return nil, fmt.Errorf("relay metrics: %w", err)
	}
	st, err := s.buildState(opts.Config)
	if err != nil {
		return nil, err
	}

	s.state.Store(st)
	s.handshakes = make(chan struct{}, st.cfg.Limits.MaxHandshakes)
	s.maxConns.Store(int64(s.fitLimits(st.cfg)))

	lc := listenConfig()
	cfg := opts.Config
	if s.httpsLn = opts.HTTPSListener; s.httpsLn == nil {
		if s.httpsLn, err = lc.Listen(context.Background(), "tcp", cfg.Listen.HTTPS); err != nil {
			return nil, fmt.Errorf("listen https on %s: %w (is another relay running? change listen.https)", cfg.Listen.HTTPS, err)
		}
	}
	if s.qm, err = newQUICMetrics(s.reg); err != nil {
		s.closeListeners()
		return nil, err
	}
	s.newQUIC()
	if s.httpLn = opts.HTTPListener; s.httpLn == nil && cfg.Listen.HTTP != "off" && cfg.Listen.HTTP != "" {
		if s.httpLn, err = lc.Listen(context.Background(), "tcp", cfg.Listen.HTTP); err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("listen http on %s: %w (change listen.http, or \"off\")", cfg.Listen.HTTP, err)
		}
	}
	if s.metricLn = opts.MetricsListener; s.metricLn == nil && cfg.Listen.Metrics != "off" && cfg.Listen.Metrics != "" {
		if s.metricLn, err = lc.Listen(context.Background(), "tcp", cfg.Listen.Metrics); err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("listen metrics on %s: %w (change listen.metrics, or \"off\")", cfg.Listen.Metrics, err)
		}
	}
	if err := s.alog.set(cfg.Log.Access, s.log.Warn); err != nil {
		s.closeListeners()
		return nil, err
	}
	s.fds = newFDShedder(func() { s.m.limitRejections.WithLabelValues("open_files").Inc() }, func(shed int64, err error) {
		s.log.Warn("out of open files: new connections are closed at once, held ones keep working; raise LimitNOFILE= (or ulimit -n) or lower limits.max_connections",
			"shed_since_last_line", shed, "open_files_limit", openFileLimit(), "err", err)
	})
	return s, nil
}

// listenConfig returns the ListenConfig for every relay socket: plain TCP,
// because MPTCP sockets cannot be put into a sockmap (DESIGN.md).
func listenConfig() *net.ListenConfig {
	lc := &net.ListenConfig{KeepAliveConfig: keepAlive}
	lc.SetMultipathTCP(false)
	return lc
}

// keepAlive turns TCP keep-alive on with the kernel's timers
// (net.ipv4.tcp_keepalive_*), as HAProxy's clitcpka/srvtcpka do: Go's own
// 15 s timers cost three more setsockopt calls on every accepted and every
// dialed socket, a tenth of the syscalls of a short passthrough connection,
// and idle connections are ended by limits.idle_timeout anyway.
var keepAlive = net.KeepAliveConfig{Enable: true, Idle: -1, Interval: -1, Count: -1}

// HTTPSAddr, HTTPAddr and MetricsAddr return the bound addresses (nil when off).
func (s *Server) HTTPSAddr() net.Addr { return addrOf(s.httpsLn) }
func (s *Server) HTTPAddr() net.Addr  { return addrOf(s.httpLn) }

// MetricsAddr returns the metrics listener's address, nil when off.
func (s *Server) MetricsAddr() net.Addr { return addrOf(s.metricLn) }

// HTTPSListener returns the https listener, e.g. to register it in the BPF
// steering map.
func (s *Server) HTTPSListener() net.Listener { return s.httpsLn }

// HTTPListener returns the http listener (nil when off).
func (s *Server) HTTPListener() net.Listener { return s.httpLn }

// Registry returns the registry served at /metrics, so that callers can add
// collectors (BPF counters, certificates).
func (s *Server) Registry() *metrics.Registry { return s.reg }

// SetBPFAttached sets relay_bpf_attached.
func (s *Server) SetBPFAttached(on bool) {
	v := 0.0
	if on {
		v = 1
	}
	s.m.bpfAttached.Set(v)
}

func addrOf(l net.Listener) net.Addr {
	if l == nil {
		return nil
	}
	return l.Addr()
}

// Reload swaps in a new configuration atomically. A config that cannot be
// built is refused and the old one keeps serving; connections in flight
// keep the route they were given. Listen addresses and limits that size
// resources (max_handshakes) need a restart.
func (s *Server) Reload(cfg *config.Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	st, err := s.buildState(cfg)
	if err == nil {
		err = s.alog.set(cfg.Log.Access, s.log.Warn)
	}
	if err != nil {
		s.m.reloads.WithLabelValues("failure").Inc()
		return err
	}
	s.maxConns.Store(int64(s.fitLimits(cfg)))
	old := s.state.Swap(st)
	// New requests go to the new pools; idle connections of the old ones
	// would otherwise stay open to the upstreams until their idle timeout.
	// Connections that kept their old route still return theirs there.
	for _, f := range old.closeIdle {
		f()
	}
	if !old.cfg.Listen.SameAddrs(cfg.Listen) {
		s.log.Warn("listen addresses changed; they take effect on restart", "old", old.cfg.Listen, "new", cfg.Listen)
	}
	s.m.reloads.WithLabelValues("success").Inc()
	s.log.Info("config reloaded", "routes", len(cfg.Routes))
	return nil
}

// RecordReloadFailure counts a reload that failed before reaching Reload
// (e.g. the file did not parse).
func (s *Server) RecordReloadFailure() { s.m.reloads.WithLabelValues("failure").Inc() }

// Serve runs until ctx is done, then stops accepting and drains: open
// connections get limits.drain_timeout to finish before they are closed.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 3)
	var wg sync.WaitGroup
	start := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				errc <- err
			}
		}()
	}
	start(func() error { return s.acceptLoop(s.shedding(s.httpsLn), s.handleTLS) })
	if s.quic != nil {
		start(func() error { s.quic.serve(); return nil })
	}
	var httpSrv, metricsSrv *http.Server
	if s.httpLn != nil {
		httpSrv = s.newHTTPPortServer()
		start(func() error {
			return ignoreClosed(httpSrv.Serve(s.countingListener(s.proxyListener(s.shedding(s.httpLn)))))
		})
	}
	if s.metricLn != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", s.reg.Handler())
		mux.HandleFunc("GET /status", s.serveStatus)
		mux.HandleFunc("GET /{$}", serveStatusPage)
		sampleDone := make(chan struct{})
		defer close(sampleDone)
		go s.sampleLoop(sampleDone)
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		start(func() error { return ignoreClosed(metricsSrv.Serve(s.shedding(s.metricLn))) })
	}
	s.log.Info("relay serving", "https", s.HTTPSAddr(), "http", s.HTTPAddr(), "metrics", s.MetricsAddr())

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	drain := s.state.Load().cfg.Limits.DrainTimeout.D()
	s.log.Info("draining", "open_connections", s.active.Load(), "drain_timeout", drain)
	s.mu.Lock()
	s.closing = true
	for c, st := range s.tracked {
		if st == connHello { // still in its ClientHello: nothing in flight to drain
			c.Close()
		}
	}
	s.mu.Unlock()
	s.httpsLn.Close()
	if s.quic != nil {
		s.quic.close() // UDP flows have nothing to drain: the client retransmits elsewhere
	}
	dctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if httpSrv != nil {
		go httpSrv.Shutdown(dctx)
	}
	s.term().shutdown(dctx)
	done := make(chan struct{})
	go func() { s.conns.Wait(); close(done) }()
	select {
	case <-done:
	case <-dctx.Done():
		// Connections in the kernel (sockmap) are ended by their
		// splicer, which must stop watching them before they close.
		s.hardCancel()
		n := s.active.Load()
		s.mu.Lock()
		for c := range s.tracked {
			if s.tracked[c] != connDetached {
				c.Close()
			}
		}
		s.mu.Unlock()
		s.log.Warn("drain timeout: closed remaining connections", "connections", n)
		<-done
	}
	s.engOnce.Do(func() {}) // none started after this
	if s.eng != nil {
		s.eng.close()
	}
	if metricsSrv != nil {
		metricsSrv.Close()
	}
	s.closeListeners()
	wg.Wait()
	s.alog.close()
	s.fds.close()
	return err
}

// shedding wraps ln so that running out of descriptors sheds connections
// instead of stalling accept.
func (s *Server) shedding(ln net.Listener) net.Listener { return &shedListener{Listener: ln, f: s.fds} }

func (s *Server) closeListeners() {
	for _, l := range []net.Listener{s.httpsLn, s.httpLn, s.metricLn} {
		if l != nil {
			l.Close()
		}
	}
	if s.quic != nil {
		s.quic.close()
	}
}

// newQUIC binds the https address on UDP too. A failure leaves QUIC off
// with a warning: TCP keeps working, and clients fall back to it.
func (s *Server) newQUIC() {
	q := &quicServer{s: s, flows: map[netip.AddrPort]*quicFlow{}, stop: make(chan struct{})}
	pc := s.opts.QUICConn
	if pc == nil {
		var err error
		if pc, err = listenQUIC(s.httpsLn.Addr()); err != nil {
			// A relay handing over to this one holds the port until it
			// stops accepting: serve retries for a while.
			q.bindErr = err
			pc = nil
		}
	}
	if pc != nil {
		q.bound(pc)
	}
	s.quic = q
}

// QUICAddr returns the UDP address QUIC is served on; nil when off (or
// not bound yet).
func (s *Server) QUICAddr() net.Addr {
	if s.quic == nil {
		return nil
	}
	s.quic.mu.Lock()
	defer s.quic.mu.Unlock()
	if s.quic.pc == nil {
		return nil
	}
	return s.quic.pc.LocalAddr()
}

func ignoreClosed(err error) error {
	if err == nil || errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// engine returns the splice engine, started on first use; nil when it
// cannot run here.
func (s *Server) engine() *engine {
	s.engOnce.Do(func() {
		eng, err := newEngine(s.hardCtx)
		if err != nil {
			if !errors.Is(err, errors.ErrUnsupported) {
				s.log.Warn("splice engine unavailable: passthrough copies with two goroutines per connection", "err", err)
			}
			return
		}
		s.eng = eng
	})
	return s.eng
}

// acceptLoop accepts until the listener closes. Other temporary errors
// back off instead of spinning (EMFILE and ENFILE are shed by ln).
func (s *Server) acceptLoop(ln net.Listener, handle func(net.Conn) (detached bool)) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if delay == 0 {
				delay = 5 * time.Millisecond
			} else if delay *= 2; delay > time.Second {
				delay = time.Second
			}
			s.log.Warn("accept", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !s.admit(c) {
			continue
		}
		go func() {
			if !handle(c) {
				s.release(c)
			}
		}()
	}
}

// admit enforces max_connections and tracks c for draining.
func (s *Server) admit(c net.Conn) bool {
	max := s.maxConns.Load()
	if s.active.Add(1) > max {
		s.active.Add(-1)
		s.m.limitRejections.WithLabelValues("max_connections").Inc()
		s.log.Debug("max_connections reached: refusing", "remote", c.RemoteAddr(), "limit", max)
		c.Close()
		return false
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		s.active.Add(-1)
		c.Close()
		return false
	}
	s.tracked[c] = connHello
	s.conns.Add(1)
	s.mu.Unlock()
	s.trim.conn()
	if !s.admitClient(c) { // limits.per_client
		s.release(c)
		return false
	}
	return true
}

// connState is where a tracked client connection is, for draining.
type connState uint8

const (
	connHello    connState = iota // in its ClientHello: closed at once on drain
	connRouted                    // in flight: drain waits, then closes it
	connDetached                  // held past its handler: closed through hardCtx
)

// routed marks c as past its ClientHello, so that drain waits for it. It
// returns false when the server is draining (c is being closed).
func (s *Server) routed(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.tracked[c] = connRouted
	return true
}

// detach marks routed c as living on after its handler returns (copy
// goroutines, the kernel splice) and closed through hardCtx: whoever holds
// it then releases it. False while draining. (Terminated connections in
// the http server stay routed: the drain timeout closes them directly.)
func (s *Server) detach(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.tracked[c] = connDetached
	return true
}

// handOff is detach for a connection given to a Splicer, which owns
// (and closes) it from then on: the server stops tracking it, so that an
// idle connection in the kernel keeps nothing of it here.
// releaseHandedOff ends it.
func (s *Server) handOff(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	delete(s.tracked, c)
	return true
}

func (s *Server) releaseHandedOff(c net.Conn) {
	s.clientGone(c)
	s.active.Add(-1)
	s.conns.Done()
}

// undetach takes back a detach or handOff whose hand-off did not happen.
func (s *Server) undetach(c net.Conn) {
	s.mu.Lock()
	s.tracked[c] = connRouted
	s.mu.Unlock()
}

func (s *Server) release(c net.Conn) {
	c.Close()
	s.clientGone(c)
	s.mu.Lock()
	delete(s.tracked, c)
	s.mu.Unlock()
	s.active.Add(-1)
	s.conns.Done()
}

// countingListener applies admit/release to a listener handed to an
// http.Server (the http port).
func (s *Server) countingListener(ln net.Listener) net.Listener {
	return &admitListener{Listener: ln, s: s}
}

type admitListener struct {
	net.Listener
	s *Server
}

func (l *admitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if !l.s.admit(c) {
			continue
		}
		l.s.routed(c) // http.Server.Shutdown drains these itself
		if tc, ok := c.(*net.TCPConn); ok {
			if dst, transit := l.s.destination(tc); transit && l.s.state.Load().unknownSNI == "original" {
				if l.s.transitRefused(tc) { // transparent_allow
					l.s.release(c)
					continue
				}
				// Plain HTTP redirected on its way to another host: pass
				// it on untouched, like unknown TLS names.
				go func() {
					defer l.s.release(c)
					l.s.passthroughHTTP(tc, dst)
				}()
				continue
			}
		}
		return &releaseConn{Conn: c, s: l.s}, nil
	}
}

type releaseConn struct {
	net.Conn
	s    *Server
	once sync.Once
}

func (c *releaseConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.s.release(c.Conn) })
	return err
}
