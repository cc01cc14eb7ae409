package relay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relay-gw/relay/internal/metrics"
)

// QUIC on the https port: one unconnected UDP socket (sk_lookup steers
// only to unconnected sockets), flows keyed by the client's address and
// port. A new flow is peeked (its Initials buffered until the ClientHello
// parses), then routed by SNI: passthrough flows get a connected UDP
// socket to the upstream and are forwarded both ways without decryption,
// terminate flows go to the in-process HTTP/3 server, others are dropped
// (the client falls back to TCP). This file is the whole UDP path: the TCP
// hot paths know nothing of it.

const (
	quicMaxDatagrams  = 64 // buffered per peeking flow
	quicMaxBadPerFlow = 8  // undecodable datagrams before a peeking flow is dropped
	// quicPeekBudget bounds the datagrams buffered by all flows being
	// peeked (anyone can make valid Initials: their keys are public).
	quicPeekBudget = 16 << 20
	quicUpBuf      = 4096 // upstream read buffer without GRO (not Linux)
)

type flowKind uint8

const (
	flowPeeking flowKind = iota
	flowRouting          // hello parsed, upstream being set up; datagrams keep queueing
	flowPassthrough
	flowTerminate
	flowDropped // rejected or refused: datagrams are dropped until it idles out
)

type quicFlow struct {
	client  netip.AddrPort // as received (maybe v4-mapped), to answer
	kind    flowKind
	hello   *quicHello
	queued  [][]byte
	qBytes  int
	bad     int
	started time.Time
	last    atomic.Int64 // unix nanos of the last datagram either way
	up      *net.UDPConn
	label   string
	action  string
	upC     *metrics.Counter
	downC   *metrics.Counter
}

func (f *quicFlow) touch(now time.Time) { f.last.Store(now.UnixNano()) }

type quicServer struct {
	s  *Server
	pc *net.UDPConn
	h3 *h3Server // nil: no terminate route serves HTTP/3

	mu      sync.Mutex
	flows   map[netip.AddrPort]*quicFlow
	peeking int
	queued  int // bytes buffered by peeking and routing flows, ≤ quicPeekBudget
	closed  bool
	stop    chan struct{}
	wg      sync.WaitGroup
	bindErr error // New could not bind the UDP port: serve retries
}

// bound installs the UDP socket; with q.mu held or before serve runs.
func (q *quicServer) bound(pc *net.UDPConn) {
	q.pc = pc
	q.h3 = q.s.newH3Server(pc)
}

// quicBindRetry is how long serve retries a UDP port that another
// process holds (the relay handing over to this one releases it when it
// stops accepting).
const quicBindRetry = 30 * time.Second

// bind waits for the UDP port; false when it stays busy or q closes.
func (q *quicServer) bind() bool {
	q.mu.Lock()
	ok := q.pc != nil
	q.mu.Unlock()
	if ok {
		return true
	}
	addr := q.s.httpsLn.Addr()
	q.s.log.Info("quic: the https port is busy on UDP (another relay handing over?): retrying", "addr", addr, "err", q.bindErr)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for deadline := time.Now().Add(quicBindRetry); time.Now().Before(deadline); {
		select {
		case <-q.stop:
			return false
		case <-t.C:
		}
		pc, err := listenQUIC(addr)
		if err != nil {
			continue
		}
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			pc.Close()
			return false
		}
		q.bound(pc)
		q.mu.Unlock()
		q.s.log.Info("quic: bound", "addr", pc.LocalAddr())
		return true
	}
	q.s.log.Warn("quic: cannot bind the https address on UDP; QUIC and HTTP/3 are off until a restart", "addr", addr, "err", q.bindErr)
	return false
}

// quicMetrics are the QUIC series, in families of their own (documented
// in README) so that the TCP series keep their labels.
type quicMetrics struct {
	conns  *metrics.CounterVec // route, action
	active *metrics.GaugeVec   // route, action
	bytes  *metrics.CounterVec // route, direction
	errors *metrics.CounterVec // reason
}

func newQUICMetrics(reg *metrics.Registry) (*quicMetrics, error) {
	m := &quicMetrics{
		conns: metrics.NewCounterVec("relay_quic_connections_total",
			"QUIC connections (UDP flows) handled, by route and action (passthrough, terminate, reject).",
			"route", "action"),
		active: metrics.NewGaugeVec("relay_quic_active_flows",
			"QUIC flows in the flow table now, by route and action.",
			"route", "action"),
		bytes: metrics.NewCounterVec("relay_quic_bytes_total",
			"QUIC passthrough bytes (UDP payload): upstream = client to upstream, downstream = upstream to client.",
			"route", "direction"),
		errors: metrics.NewCounterVec("relay_quic_initial_errors_total",
			"UDP datagrams or flows dropped before routing because no QUIC ClientHello could be read, by reason.",
			"reason"),
	}
	for _, r := range []string{"timeout", "not_quic", "not_initial", "version", "decrypt", "frame", "too_large", "malformed"} {
		m.errors.WithLabelValues(r)
	}
	for _, c := range []metrics.Collector{m.conns, m.active, m.bytes, m.errors} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("quic metrics: %w", err)
		}
	}
	return m, nil
}

// listenQUIC binds the UDP side of the https address: the TCP listener's
// own address, so that port 0 and "same port as TCP" hold.
func listenQUIC(tcp net.Addr) (*net.UDPConn, error) {
	ta, ok := tcp.(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("https listener address %v is not TCP", tcp)
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: ta.IP, Port: ta.Port, Zone: ta.Zone})
	if err != nil {
		return nil, err
	}
	// Bursts of a fast upstream: room for a few hundred datagrams.
	pc.SetReadBuffer(4 << 20)
	pc.SetWriteBuffer(4 << 20)
	enableGRO(pc)
	return pc, nil
}

func (q *quicServer) serve() {
	if !q.bind() {
		return
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.wg.Add(1)
	q.mu.Unlock()
	go func() { defer q.wg.Done(); q.reap() }()
	buf := make([]byte, 65536) // a GRO train of datagrams
	var oob [64]byte
	for {
		n, oobn, _, client, err := q.pc.ReadMsgUDPAddrPort(buf, oob[:])
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			q.s.log.Debug("quic read", "err", err)
			continue
		}
		now := time.Now()
		if seg := groSegment(oob[:oobn]); seg > 0 && seg < n {
			q.train(buf[:n], seg, client, now)
			continue
		}
		q.datagram(buf[:n], client, now)
	}
}

// train handles datagrams the kernel coalesced (GRO: one client, equal
// sizes but the last): a passthrough flow forwards them with one send.
func (q *quicServer) train(b []byte, seg int, client netip.AddrPort, now time.Time) {
	key := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	q.mu.Lock()
	f := q.flows[key]
	var up *net.UDPConn
	if f != nil && f.kind == flowPassthrough {
		up = f.up
	}
	q.mu.Unlock()
	if up != nil {
		f.touch(now)
		if writeTrain(up, b, seg, netip.AddrPort{}) == nil {
			f.upC.Add(float64(len(b)))
		}
		return
	}
	for off := 0; off < len(b); off += seg {
		q.datagram(b[off:min(off+seg, len(b))], client, now)
	}
}

func (q *quicServer) datagram(d []byte, client netip.AddrPort, now time.Time) {
	key := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	qm := q.s.qm
	q.mu.Lock()
	f := q.flows[key]
	fresh := f == nil
	if fresh {
		if !isQUICInitial(d) {
			q.mu.Unlock()
			qm.errors.WithLabelValues("not_initial").Inc()
			return
		}
		lim := q.s.state.Load().cfg.Limits
		if q.peeking >= lim.MaxHandshakes {
			q.mu.Unlock()
			q.s.m.limitRejections.WithLabelValues("max_handshakes").Inc()
			return
		}
		if len(q.flows) >= lim.MaxConnections {
			q.mu.Unlock()
			q.s.m.limitRejections.WithLabelValues("max_connections").Inc()
			return
		}
		f = &quicFlow{client: client, hello: newQUICHello(lim.MaxHelloBytes), started: now}
		q.flows[key] = f
		q.peeking++
	}
	f.touch(now)
	switch f.kind {
	case flowPassthrough:
		up := f.up
		q.mu.Unlock()
		if _, err := up.Write(d); err == nil {
			f.upC.Add(float64(len(d)))
		}
		return
	case flowTerminate:
		q.mu.Unlock()
		q.h3.deliver(d, client)
		return
	case flowDropped:
		q.mu.Unlock()
		return
	case flowRouting:
		q.queue(f, d)
		q.mu.Unlock()
		return
	}
	// Peeking.
	h, err := f.hello.add(d)
	if err != nil {
		reason := QUICErrorReason(err)
		qm.errors.WithLabelValues(reason).Inc()
		f.bad++
		// A flow whose first datagram is bad holds no peeking slot:
		// garbage from spoofed sources must not fill them.
		if fresh || reason == "too_large" || f.bad > quicMaxBadPerFlow {
			q.dropLocked(key, f)
		}
		q.mu.Unlock()
		q.s.log.Debug("quic initial", "client", client, "reason", reason, "err", err)
		return
	}
	if !q.queue(f, d) {
		q.dropLocked(key, f)
		q.mu.Unlock()
		return
	}
	if h == nil {
		q.mu.Unlock()
		return
	}
	f.kind, f.hello = flowRouting, nil
	q.peeking--
	q.mu.Unlock()
	go q.route(key, f, h)
}

// queue keeps a copy of d for the upstream; false (counted) past the
// flow's budget or the server's.
func (q *quicServer) queue(f *quicFlow, d []byte) bool {
	max := q.s.state.Load().cfg.Limits.MaxHelloBytes
	if len(f.queued) >= quicMaxDatagrams || f.qBytes+len(d) > max+16384 {
		q.s.qm.errors.WithLabelValues("too_large").Inc()
		return false
	}
	if q.queued+len(d) > quicPeekBudget {
		q.s.m.limitRejections.WithLabelValues("quic_peek_bytes").Inc()
		return false
	}
	f.queued = append(f.queued, append([]byte(nil), d...))
	f.qBytes += len(d)
	q.queued += len(d)
	return true
}

// unqueue takes f's buffered datagrams out of the server's budget.
func (q *quicServer) unqueue(f *quicFlow) [][]byte {
	d := f.queued
	q.queued -= f.qBytes
	f.queued, f.qBytes = nil, 0
	return d
}

// dropLocked forgets a peeking flow; its next datagrams start a new one
// (and, not being Initials, are counted as not_initial).
func (q *quicServer) dropLocked(key netip.AddrPort, f *quicFlow) {
	if f.kind == flowPeeking {
		q.peeking--
	}
	q.unqueue(f)
	delete(q.flows, key)
}

// route picks the flow's route by SNI and starts relaying it.
func (q *quicServer) route(key netip.AddrPort, f *quicFlow, h *ClientHello) {
	s := q.s
	st := s.state.Load()
	rt := st.resolve(h.ServerName, h.ALPN, false)
	action := rt.action
	switch {
	case action == "passthrough" && rt.quic && rt.pool != nil:
	case action == "terminate" && rt.h3 && rt.term != nil && rt.term.handler != nil && q.h3 != nil:
	default:
		action = "reject"
	}
	if action != "reject" && rt.access != nil {
		if ok, reason := rt.access.check(key.Addr()); !ok {
			s.m.accessDenied.WithLabelValues(rt.label, reason).Inc()
			action = "reject"
		}
	}
	var up *net.UDPConn
	if action == "passthrough" {
		var addr string
		var err error
		up, addr, err = rt.pool.dialUDP()
		if err != nil {
			s.m.upstreamErrors.WithLabelValues(rt.label, "dial").Inc()
			s.log.Debug("quic upstream", "route", rt.label, "upstream", addr, "err", err)
			action = "reject"
		}
	}
	s.log.Debug("quic", "route", rt.label, "action", action, "client", f.client, "sni", h.ServerName)
	s.qm.conns.WithLabelValues(rt.label, action).Inc()
	q.mu.Lock()
	if q.closed || q.flows[key] != f {
		q.mu.Unlock()
		if up != nil {
			up.Close()
		}
		return
	}
	f.label, f.action = rt.label, action
	s.qm.active.WithLabelValues(rt.label, action).Inc()
	queued := q.unqueue(f)
	switch action {
	case "passthrough":
		f.up, f.kind = up, flowPassthrough
		f.upC = s.qm.bytes.WithLabelValues(rt.label, "upstream")
		f.downC = s.qm.bytes.WithLabelValues(rt.label, "downstream")
		// Queued datagrams go first, under the lock, so that none the
		// read loop forwards from now on overtakes them.
		for _, d := range queued {
			if _, err := up.Write(d); err == nil {
				f.upC.Add(float64(len(d)))
			}
		}
		q.wg.Add(1)
		go func() { defer q.wg.Done(); q.downstream(f) }()
	case "terminate":
		f.kind = flowTerminate
		for _, d := range queued {
			q.h3.deliver(d, f.client)
		}
	default:
		f.kind = flowDropped
	}
	q.mu.Unlock()
}

// downstream copies the upstream's datagrams to the client, out of the
// listening socket so that the client sees the address it sent to.
// The read buffer is taken only once the upstream socket is readable, so
// an idle flow holds its goroutine and socket, no buffer.
func (q *quicServer) downstream(f *quicFlow) {
	forward := func(b []byte, seg int) {
		f.touch(time.Now())
		if writeTrain(q.pc, b, seg, f.client) == nil {
			f.downC.Add(float64(len(b)))
		}
	}
	for {
		if err := readTrain(f.up, forward); err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue // an ICMP port unreachable for an earlier datagram
			}
			return // closed by the reaper or on shutdown
		}
	}
}

// reap ends flows idle past limits.idle_timeout and peeks past
// limits.hello_timeout.
func (q *quicServer) reap() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-q.stop:
			return
		case now := <-t.C:
			lim := q.s.state.Load().cfg.Limits
			q.mu.Lock()
			for key, f := range q.flows {
				switch {
				case f.kind == flowPeeking && now.Sub(f.started) > lim.HelloTimeout.D():
					q.s.qm.errors.WithLabelValues("timeout").Inc()
					q.dropLocked(key, f)
				case f.kind != flowPeeking && f.kind != flowRouting && now.UnixNano()-f.last.Load() > int64(lim.IdleTimeout.D()):
					q.endLocked(key, f)
				}
			}
			q.mu.Unlock()
		}
	}
}

func (q *quicServer) endLocked(key netip.AddrPort, f *quicFlow) {
	q.unqueue(f)
	delete(q.flows, key)
	if f.label != "" {
		q.s.qm.active.WithLabelValues(f.label, f.action).Dec()
	}
	if f.up != nil {
		f.up.Close()
	}
	if f.kind == flowTerminate && q.h3 != nil {
		q.h3.forget(f.client)
	}
}

// close stops the read loop and ends every flow.
func (q *quicServer) close() {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.closed = true
	close(q.stop)
	if q.pc != nil {
		q.pc.Close()
	}
	for key, f := range q.flows {
		if f.kind == flowPeeking {
			q.dropLocked(key, f)
		} else {
			q.endLocked(key, f)
		}
	}
	q.mu.Unlock()
	if q.h3 != nil {
		q.h3.close()
	}
	q.wg.Wait()
}

// dialUDP opens a connected UDP socket to the pool's next upstream
// (round-robin, skipping those marked down by TCP dials).
func (p *pool) dialUDP() (*net.UDPConn, string, error) {
	n := len(p.ups)
	if n == 0 {
		return nil, "", errNoHealthy
	}
	start := int(p.next.Add(1)-1) % n
	now := time.Now()
	u := p.ups[start]
	for i := range n {
		if c := p.ups[(start+i)%n]; c.healthy(now) {
			u = c
			break
		}
	}
	ua, err := net.ResolveUDPAddr("udp", u.addr)
	if err != nil {
		return nil, u.addr, fmt.Errorf("resolve %s: %w", u.addr, err)
	}
	c, err := net.DialUDP("udp", nil, ua)
	if err != nil {
		return nil, u.addr, fmt.Errorf("dial udp %s: %w", u.addr, err)
	}
	c.SetReadBuffer(1 << 20)
	enableGRO(c)
	return c, u.addr, nil
}
