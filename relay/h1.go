package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
)

// HTTP/1.x clients of a terminate route are served by the relay's own
// proxy loop: one goroutine per client connection reads a request, writes
// it to a pooled upstream connection and streams the response back.
// Through net/http's server, httputil.ReverseProxy and Transport a small
// GET took five goroutine hand-offs and a background read (relay CPU
// 105–120 µs per GET against HAProxy's 53–70). h2 clients still go through
// net/http.

const (
	h1MaxHeaderBytes = 1 << 20 // as net/http's DefaultMaxHeaderBytes
	h1HeaderTimeout  = 30 * time.Second
	upIdleTimeout    = 90 * time.Second
	upMaxIdle        = 256 // idle upstream connections kept per route
	upFresh          = 100 * time.Millisecond
)

var (
	errHeaderTooLarge = errors.New("request header too large")
	errNotParked      = errors.New("connection no longer parked")
)

var (
	h1Readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4<<10) }}
	h1Writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

func getWriter(w io.Writer) *bufio.Writer {
	bw := h1Writers.Get().(*bufio.Writer)
	bw.Reset(w)
	return bw
}

func putWriter(bw *bufio.Writer) {
	bw.Reset(nil)
	h1Writers.Put(bw)
}

// httpProxy is a terminate route's HTTP upstream with its pool of idle
// keep-alive connections: for HTTP/1.x clients in the proxy loop, and as
// the http.Handler of h2 streams.
type httpProxy struct {
	s       *Server
	label   string
	addr    string      // upstream host:port
	tlsConf *tls.Config // https upstream; nil for http
	hsts    string      // Strict-Transport-Security value; "" = none added

	mu    sync.Mutex
	idle  []*upConn // oldest first
	timer *time.Timer
}

// upConn is a keep-alive connection to the upstream.
type upConn struct {
	c      net.Conn // the TCP conn, or TLS over it
	tcp    *net.TCPConn
	br     *bufio.Reader
	bw     *bufio.Writer
	n      int64 // bytes read since the request was sent: 0 means a retry is safe
	idleAt time.Time
	wrote  chan error // a request body being sent; nil when none

	// outcome of the request whose body is being sent: upWaiting, then
	// upAnswered or (no body taken, no answer, for the idle timeout)
	// upStalled or (the client's body failed) upAbandoned, whichever
	// comes first.
	outcome atomic.Int32
}

const (
	upWaiting int32 = iota
	upAnswered
	upStalled
	upAbandoned
)

// deadlineWriter bounds each write to a client by limits.idle_timeout: a
// client that stops reading must not hold its connection, goroutine and
// upstream connection for ever (HAProxy's "timeout client" does the same).
type deadlineWriter struct {
	c net.Conn
	d time.Duration
}

func (w deadlineWriter) Write(p []byte) (int, error) {
	if w.d > 0 {
		w.c.SetWriteDeadline(time.Now().Add(w.d))
	}
	return w.c.Write(p)
}

// stallWriter gives each write of a request body to the upstream the
// idle timeout to make progress: an upstream that neither reads the body
// nor answers must not hold the client's request (and its goroutines)
// forever.
type stallWriter struct {
	u    *upConn
	idle time.Duration
}

func (w stallWriter) Write(p []byte) (int, error) {
	w.u.c.SetWriteDeadline(time.Now().Add(w.idle))
	n, err := w.u.c.Write(p)
	if errors.Is(err, os.ErrDeadlineExceeded) && w.u.outcome.CompareAndSwap(upWaiting, upStalled) {
		w.u.c.Close() // no answer is coming either: end the wait for it
	}
	return n, err
}

// errUpstreamStalled ends a request whose upstream took none of its body
// and sent no answer for limits.idle_timeout (504, reason "timeout").
var errUpstreamStalled error = stallError{}

type stallError struct{}

func (stallError) Error() string {
	return "upstream neither read the request body nor answered for limits.idle_timeout"
}
func (stallError) Timeout() bool   { return true }
func (stallError) Temporary() bool { return true }

func (u *upConn) Read(p []byte) (int, error) {
	n, err := u.c.Read(p)
	u.n += int64(n)
	return n, err
}

// alive reports whether an idle upstream connection can take a request:
// one the upstream closed (or wrote to unasked) is readable.
func (u *upConn) alive() bool {
	if u.br.Buffered() > 0 {
		return false
	}
	rc, err := u.tcp.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	rc.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		alive = err == syscall.EAGAIN
		return true
	})
	return alive
}

// get returns an idle upstream connection, or nil.
func (p *httpProxy) get() *upConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.idle) > 0 {
		u := p.idle[len(p.idle)-1]
		p.idle[len(p.idle)-1] = nil
		p.idle = p.idle[:len(p.idle)-1]
		// A connection back in the pool for under upFresh is taken
		// without a look: the check is a syscall per request under load,
		// and upstreams close idle connections after seconds, not
		// milliseconds (a bodiless request is retried if one did).
		// Bytes an upstream sent after its response make the
		// connection unusable whatever its age.
		if u.br.Buffered() > 0 {
			u.c.Close()
			continue
		}
		if idle := time.Since(u.idleAt); idle < upFresh || idle < upIdleTimeout && u.alive() {
			return u
		}
		u.c.Close()
	}
	return nil
}

func (p *httpProxy) put(u *upConn) {
	u.idleAt = time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.idle) >= upMaxIdle {
		u.c.Close()
		return
	}
	p.idle = append(p.idle, u)
	if p.timer == nil {
		p.timer = time.AfterFunc(upIdleTimeout, p.sweep)
	} else if len(p.idle) == 1 {
		p.timer.Reset(upIdleTimeout)
	}
}

// sweep closes upstream connections idle for upIdleTimeout: one timer per
// route, not per connection.
func (p *httpProxy) sweep() {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	n := 0
	for n < len(p.idle) && now.Sub(p.idle[n].idleAt) >= upIdleTimeout {
		p.idle[n].c.Close()
		p.idle[n] = nil
		n++
	}
	p.idle = append(p.idle[:0], p.idle[n:]...)
	if len(p.idle) > 0 {
		p.timer.Reset(upIdleTimeout - now.Sub(p.idle[0].idleAt))
	}
}

// closeIdle closes the connections waiting in the pool.
func (p *httpProxy) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, u := range p.idle {
		u.c.Close()
		p.idle[i] = nil
	}
	p.idle = p.idle[:0]
}

func (p *httpProxy) dial(ctx context.Context) (*upConn, error) {
	c, err := dialer(p.s.state0Limits().DialTimeout.D()).DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, err
	}
	u := &upConn{c: c, tcp: c.(*net.TCPConn)}
	if p.tlsConf != nil {
		tc := tls.Client(c, p.tlsConf)
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("tls handshake with upstream %s: %w", p.addr, err)
		}
		u.c = tc
	}
	u.br = bufio.NewReaderSize(u, 4<<10)
	u.bw = bufio.NewWriterSize(u.c, 4<<10)
	return u, nil
}

// h1Conn is a client connection in the proxy loop.
type h1Conn struct {
	s  *Server
	p  *httpProxy
	tc *tls.Conn
	cc *termConn

	sni, alpn string         // of the handshake: a Host of another route is misdirected
	w         deadlineWriter // tc, each write bounded by limits.idle_timeout
	br        *bufio.Reader  // held while a request is read; pooled while idle
	first     [1]byte        // the byte that ended the idle wait
	pending   bool           // first not yet handed to br
	limit     int64          // bytes left for a request head; < 0: no limit
	hc        headCheck      // the request head's bytes, as they are read
	body      clientBody

	http11   bool   // the request being served is HTTP/1.1
	clientIP string // for X-Forwarded-For

	// The answer to the request being served, for the access log.
	status         int
	result, reason string

	// hmu orders the body goroutine's 100 Continue with the answer's
	// head: never after it, never inside it.
	hmu       sync.Mutex
	finalHead bool // the final answer's head is being written

	state atomic.Int32           // h1Active, h1Idle, h1Parked, h1Closed
	up    atomic.Pointer[upConn] // upstream in use: a hard drain closes it
	ew    engineWatch            // while parked
}

const (
	h1Active int32 = iota // serving a request
	h1Idle                // its goroutine waits for the next request
	h1Parked              // no goroutine: the engine watches the socket
	h1Closed
)

func (h *h1Conn) Read(p []byte) (int, error) {
	n, err := h.read(p)
	if h.hc.on && n > 0 && h.hc.feed(p[:n]) != nil {
		return n, h.hc.err
	}
	return n, err
}

func (h *h1Conn) read(p []byte) (int, error) {
	if h.pending && len(p) > 0 {
		h.pending = false
		p[0] = h.first[0]
		return 1, nil
	}
	if h.limit < 0 {
		return h.tc.Read(p)
	}
	if h.limit == 0 {
		return 0, errHeaderTooLarge
	}
	if int64(len(p)) > h.limit {
		p = p[:h.limit]
	}
	n, err := h.tc.Read(p)
	h.limit -= int64(n)
	return n, err
}

// headCheck looks at a request head's bytes for what net/http's reader
// lets through but an upstream may read otherwise (request smuggling):
// bare LF, a CR not before LF, NUL, obs-fold (a line starting with
// whitespace); and notes Content-Length and Transfer-Encoding, which
// net/http reconciles when both are sent (we refuse them).
type headCheck struct {
	on, prevCR, started bool
	inValue             bool // past the line's colon
	lineLen             int
	name                [20]byte // the line's start, lower case
	cl, te              bool
	err                 error
}

type smuggleError string

func (e smuggleError) Error() string { return "malformed request head: " + string(e) }

func (c *headCheck) reset() { *c = headCheck{on: true} }

// feed checks b up to the end of the head; c.err on a fault.
func (c *headCheck) feed(b []byte) error {
	for _, x := range b {
		if !c.on {
			return nil
		}
		switch {
		case c.prevCR && x != '\n':
			c.err = smuggleError("CR not followed by LF")
		case x == '\n' && !c.prevCR:
			c.err = smuggleError("bare LF")
		case x == '\n':
			if c.lineLen == 0 && c.started {
				c.on = false // the blank line: the head ends
				return nil
			}
			if c.started {
				n := string(c.name[:min(c.lineLen, len(c.name))])
				c.cl = c.cl || strings.HasPrefix(n, "content-length:")
				c.te = c.te || strings.HasPrefix(n, "transfer-encoding:")
			}
			c.started, c.lineLen, c.inValue = true, 0, false
		case x == 0:
			c.err = smuggleError("NUL")
		case x == '\r':
		case c.lineLen == 0 && c.started && (x == ' ' || x == '\t'):
			c.err = smuggleError("obs-fold (a header line starting with whitespace)")
		case c.started && !c.inValue && x == ':':
			c.inValue = c.lineLen > 0
			if !c.inValue {
				c.err = smuggleError("empty header name")
			}
		case c.started && !c.inValue && !httpguts.IsTokenRune(rune(x)):
			c.err = smuggleError("invalid byte in a header name (whitespace before the colon?)")
		}
		if c.err == nil && x != '\r' && x != '\n' {
			if c.lineLen < len(c.name) {
				c.name[c.lineLen] = x | 0x20 // lower case for letters; ':' and '-' stay
			}
			c.lineLen++
		}
		if c.err != nil {
			c.on = false
			return c.err
		}
		c.prevCR = x == '\r'
	}
	return nil
}

// kill closes the client connection and the upstream one in use (drain
// timeout).
func (h *h1Conn) kill() {
	if h.state.Swap(h1Closed) == h1Parked {
		go h.end() // no goroutine of its own to do it
		return
	}
	h.cc.Conn.Close()
	if u := h.up.Load(); u != nil {
		u.tcp.Close() // not the TLS close: its close_notify may wait on a stuck peer
	}
}

// serveH1 runs the proxy loop on a handshaken client connection until the
// client or the relay ends it.
func (s *Server) serveH1(tc *tls.Conn, cc *termConn, rt *route) {
	h := &h1Conn{s: s, p: rt.term.proxy, tc: tc, cc: cc, limit: -1}
	h.w = deadlineWriter{tc, s.state0Limits().IdleTimeout.D()}
	cs := tc.ConnectionState()
	h.sni, h.alpn = cs.ServerName, cs.NegotiatedProtocol
	h.clientIP, _, _ = net.SplitHostPort(cc.RemoteAddr().String())
	if !s.term().addH1(h) {
		tc.Close()
		return
	}
	h.run(true)
}

// run serves requests, waiting for each first when wait is set, until the
// connection ends or parks.
func (h *h1Conn) run(wait bool) {
	for {
		if wait {
			switch h.next() {
			case nextEnd:
				h.end()
				return
			case nextParked: // h belongs to the engine's wake-up now
				return
			}
		}
		wait = true
		if !h.serve() {
			h.end()
			return
		}
	}
}

// takeReader gives the connection a pooled read buffer, the byte that
// ended its wait first.
func (h *h1Conn) takeReader() {
	h.pending = true
	h.br = h1Readers.Get().(*bufio.Reader)
	h.br.Reset(h)
}

// dropReader returns the read buffer to the pool.
func (h *h1Conn) dropReader() {
	if h.br != nil {
		h.br.Reset(nil)
		h1Readers.Put(h.br)
		h.br = nil
	}
}

// end releases the connection (once, by whoever ends it).
func (h *h1Conn) end() {
	h.dropReader()
	if h.ew.wr != nil {
		h.s.engine().unwatch(&h.ew) // before the close: the descriptor may be reused
	}
	h.s.term().removeH1(h)
	h.tc.Close()
}

type nextStep int

const (
	nextServe  nextStep = iota // a request is coming
	nextEnd                    // the connection is done: end it
	nextParked                 // parked in the engine (or closed by another): hands off
)

// next waits for the next request. Between requests the connection holds
// no buffers (its read buffer goes back to the pool); quiet for parkAfter
// it holds no goroutine either: it parks in the splice engine, which
// starts one when the client sends again.
func (h *h1Conn) next() nextStep {
	if h.br != nil && h.br.Buffered() > 0 { // pipelined
		return nextServe
	}
	h.dropReader()
	if !h.state.CompareAndSwap(h1Active, h1Idle) {
		return nextEnd
	}
	// Published idle before looking at draining: shutdown either sees
	// this connection idle and closes it, or it is seen draining here.
	if h.s.term().draining.Load() {
		return nextEnd
	}
	idle := h.s.state0Limits().IdleTimeout.D()
	var until time.Time // the idle timeout; zero: none
	if idle > 0 {
		until = time.Now().Add(idle)
	}
	eng := h.s.engine()
	for {
		wait := until
		canPark := eng != nil && (until.IsZero() || time.Until(until) > parkAfter)
		if canPark {
			wait = time.Now().Add(parkAfter)
		}
		h.tc.SetReadDeadline(wait)
		n, err := h.tc.Read(h.first[:])
		if n > 0 && err == nil {
			if !h.state.CompareAndSwap(h1Idle, h1Active) {
				return nextEnd
			}
			h.takeReader()
			return nextServe
		}
		if !canPark || !errors.Is(err, os.ErrDeadlineExceeded) {
			return nextEnd
		}
		// Set before the hand-off: from it on, a closer may read it.
		if h.ew.wr == nil {
			h.ew = engineWatch{fd: h.fd(), wr: h}
		}
		h.ew.deadline = until
		h.tc.SetReadDeadline(time.Time{})
		if !h.state.CompareAndSwap(h1Idle, h1Parked) {
			return nextEnd
		}
		err = eng.watch(&h.ew)
		if err == nil || errors.Is(err, errNotParked) {
			return nextParked
		}
		if !h.state.CompareAndSwap(h1Parked, h1Idle) {
			return nextParked // closed meanwhile by shutdown, which ends it
		}
		// The engine is shutting down or failed: wait here.
		eng = nil
	}
}

// fd is the client socket's descriptor, for the engine's epoll set.
func (h *h1Conn) fd() int {
	fd := -1
	if rc, err := h.cc.Conn.(syscall.Conn).SyscallConn(); err == nil {
		rc.Control(func(f uintptr) { fd = int(f) })
	}
	return fd
}

func (h *h1Conn) parked() bool { return h.state.Load() == h1Parked }

// ready is the engine's wake-up of a parked connection.
func (h *h1Conn) ready(timedOut bool) {
	if timedOut {
		if h.state.CompareAndSwap(h1Parked, h1Closed) {
			go h.end()
		}
		return
	}
	if h.state.CompareAndSwap(h1Parked, h1Active) {
		go h.resume()
	}
}

// resume serves a parked connection whose client sent again.
func (h *h1Conn) resume() {
	h.tc.SetReadDeadline(time.Now().Add(h1HeaderTimeout))
	n, err := h.tc.Read(h.first[:])
	if n == 0 || err != nil {
		h.end()
		return
	}
	h.takeReader()
	h.run(false)
}

// serve proxies one request; false ends the connection.
func (h *h1Conn) serve() bool {
	h.tc.SetReadDeadline(time.Now().Add(h1HeaderTimeout))
	h.limit = h1MaxHeaderBytes + 4<<10 // + a read-ahead buffer, as net/http
	h.hc.reset()
	if n := h.br.Buffered(); n > 0 { // pipelined: already read
		b, _ := h.br.Peek(n)
		h.hc.feed(b)
	}
	req, err := http.ReadRequest(h.br)
	if err != nil && (strings.HasPrefix(err.Error(), "unsupported transfer encoding") || strings.HasPrefix(err.Error(), "too many transfer encodings")) {
		// Not net/http's 501: a coding other than a lone "chunked" is how
		// a front and a back end are made to frame a body differently.
		err = smuggleError("Transfer-Encoding other than a lone chunked (" + err.Error() + ")")
	}
	h.limit = -1
	h.hc.on = false
	h.tc.SetReadDeadline(time.Time{})
	if err == nil && req.TransferEncoding != nil && h.hc.cl {
		err = smuggleError("both Content-Length and Transfer-Encoding")
	}
	if err == nil && req.URL != nil && req.URL.IsAbs() {
		err = smuggleError("absolute-form request target (send the path, with Host)")
	}
	if h.hc.err != nil {
		err = h.hc.err
	}
	if err == nil {
		if ent := h.s.requestEntry(h.cc, req); ent != nil {
			h.status, h.result, h.reason = 0, "", ""
			in, out := h.cc.in.Load(), h.cc.out.Load()
			defer func() {
				h.s.requestDone(ent, h.status, h.cc.in.Load()-in, h.cc.out.Load()-out, h.result, h.reason)
			}()
		}
	}
	if err != nil {
		if reason := badRequestReason(err); reason != "" {
			h.s.m.badRequests.WithLabelValues(h.p.label, reason).Inc()
		}
		var ne net.Error
		switch {
		case errors.Is(err, errHeaderTooLarge):
			h.reply(http.StatusRequestHeaderFieldsTooLarge, "request header too large", false)
		case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.As(err, &ne):
			// The client left or stalled mid-request: nobody to answer.
		default:
			h.reply(http.StatusBadRequest, err.Error(), false)
		}
		return false
	}
	switch {
	case req.ProtoMajor != 1:
		h.reply(http.StatusHTTPVersionNotSupported, "unsupported protocol version", false)
		return false
	case req.Host == "" && req.ProtoAtLeast(1, 1):
		h.reply(http.StatusBadRequest, "missing required Host header", false)
		return false
	case !httpguts.ValidHostHeader(req.Host):
		h.reply(http.StatusBadRequest, "malformed Host header", false)
		return false
	case req.Method == http.MethodConnect:
		h.reply(http.StatusMethodNotAllowed, "CONNECT is not proxied", false)
		return false
	case h.s.misdirected(h.cc.route, h.sni, req.Host, h.alpn):
		h.s.m.badRequests.WithLabelValues(h.p.label, "host_mismatch").Inc()
		h.reply(http.StatusMisdirectedRequest, "Host names another route than the TLS server name: open a connection for it", false)
		return false
	}
	h.http11 = req.ProtoAtLeast(1, 1)
	h.body = clientBody{r: req.Body, h: h}
	h.finalHead = false
	if e := req.Header.Get("Expect"); e != "" {
		if !strings.EqualFold(e, "100-continue") {
			h.reply(http.StatusExpectationFailed, "unsupported Expect", false)
			return false
		}
		// Answered here, when the body is first read (as net/http's
		// server does): the upstream gets the body without asking.
		req.Header.Del("Expect")
		h.body.expect = req.ProtoAtLeast(1, 1)
	}
	if req.Body != http.NoBody {
		req.Body = &h.body
	}
	closeAfter := req.Close // Connection: close, or HTTP/1.0 without keep-alive
	upgrade := prepareRequest(req, h.clientIP)
	if ok, keep := h.s.authorizeH1(h, req); !ok { // client_auth headers, basic_auth, forward_auth
		return keep
	}

	resp, u, err := h.p.roundTrip(h.s.hardCtx, req, h)
	if err != nil {
		if bodyFramingError(h.body.err) { // a bad chunk: the upstream saw the body break off
			h.s.m.badRequests.WithLabelValues(h.p.label, "body").Inc()
			h.reply(http.StatusBadRequest, "malformed request body: "+h.body.err.Error(), false)
			return false
		}
		if h.body.err != nil || errors.Is(err, errClientGone) { // the client, not the upstream, failed
			return false
		}
		h.s.upstreamError(h.p.label, dialErrorReason(err))
		h.s.log.Warn("upstream request", "route", h.p.label, "upstream", h.p.addr, "err", err)
		h.result, h.reason = resultUpstreamError, dialErrorReason(err)
		// A body the upstream did not take is still on the connection.
		return h.reply(upstreamStatus(err), "", req.Body == http.NoBody && !closeAfter)
	}
	return h.respond(req, resp, u, upgrade, closeAfter)
}

// badRequestReason is the relay_http_bad_requests_total reason for a
// request head net/http or headCheck refused; "" for a client that left.
func badRequestReason(err error) string {
	var se smuggleError
	var ne net.Error
	switch {
	case errors.As(err, &se):
		return "smuggling"
	case errors.Is(err, errHeaderTooLarge):
		return "too_large"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.As(err, &ne):
		return ""
	}
	return "malformed"
}

// bodyFramingError: a request body that broke off for its framing (a bad
// chunk), not because the client left.
func bodyFramingError(err error) bool {
	var ne net.Error
	return err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.As(err, &ne) && !errors.Is(err, net.ErrClosed)
}

// upstreamStatus is the answer to a client whose request failed upstream.
func upstreamStatus(err error) int {
	if errors.Is(err, errUpstreamStalled) {
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

// upClient is the client side of a round trip: an HTTP/1.x connection or
// an h2 stream.
type upClient interface {
	// using records the upstream connection in use (nil: none); false
	// when the client is gone, so that the connection is not used.
	using(u *upConn) bool
	interim(resp *http.Response) error // a 1xx answer (103 Early Hints)
	bodyFailed() bool                  // reading the client's request body failed
	gone() bool                        // the client left (while the upstream thinks)
	abandonBody()                      // the upstream answered without taking the whole body
}

var errClientGone = errors.New("client went away before the upstream answered")

// idempotent requests may be sent twice (RFC 9110 9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

// roundTrip sends req on an idle upstream connection or a new one. A
// bodiless idempotent request is sent again on a new connection when a
// reused one fails before answering (the upstream closed it while idle).
// A body is sent by its own goroutine while the answer is awaited, so an
// upstream may answer before it has read it all (413, 401); endBody
// settles it after the answer.
func (p *httpProxy) roundTrip(ctx context.Context, req *http.Request, c upClient) (*http.Response, *upConn, error) {
	for retry := req.Body == http.NoBody && idempotent(req.Method); ; retry = false {
		u := p.get()
		reused := u != nil
		if !reused {
			var err error
			if u, err = p.dial(ctx); err != nil {
				return nil, nil, err
			}
		}
		if !c.using(u) {
			u.c.Close()
			return nil, nil, net.ErrClosed
		}
		u.n = 0
		u.outcome.Store(upWaiting)
		var err error
		if req.Body == http.NoBody {
			if err = req.Write(u.bw); err == nil {
				err = u.bw.Flush()
			}
		} else {
			u.wrote = make(chan error, 1)
			idle := p.s.state0Limits().IdleTimeout.D()
			go func() {
				u.bw.Reset(stallWriter{u, idle})
				err := req.Write(u.bw)
				if err == nil {
					err = u.bw.Flush()
				}
				u.c.SetWriteDeadline(time.Time{})
				u.bw.Reset(u.c)
				if err != nil && c.bodyFailed() && u.outcome.CompareAndSwap(upWaiting, upAbandoned) {
					// The client's body broke off (it left, or reset its
					// stream): the upstream, waiting for the rest, would
					// never answer.
					u.c.Close()
				}
				u.wrote <- err
			}()
		}
		var resp *http.Response
		if err == nil {
			resp, err = p.readResponse(u, req, c)
		}
		// 1xx other than 101 are interim: passed on, the answer follows
		// (at most 5, as net/http's Transport).
		for i := 0; err == nil && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols; i++ {
			if i == 5 {
				err = errors.New("too many 1xx informational responses")
			} else if err = c.interim(resp); err == nil {
				resp, err = p.readResponse(u, req, c)
			}
		}
		if err == nil && (u.wrote == nil || u.outcome.CompareAndSwap(upWaiting, upAnswered)) {
			setHSTS(resp.Header, p.hsts)
			return resp, u, nil
		}
		if err == nil { // answered just as the body writer gave up
			resp.Body.Close()
		}
		c.using(nil)
		u.c.Close()
		endBody(u, c)
		if u.outcome.Load() == upStalled {
			return nil, nil, errUpstreamStalled
		}
		if !(retry && reused && u.n == 0) || c.bodyFailed() || errors.Is(err, errClientGone) {
			return nil, nil, err
		}
	}
}

// readResponse waits for the upstream's answer, looking every second
// whether the client is still there: a long poll whose client left is
// ended (as net/http's server did with a read in the background), not
// left holding the upstream.
func (p *httpProxy) readResponse(u *upConn, req *http.Request, c upClient) (*http.Response, error) {
	if u.wrote == nil { // while a body goes out, the client's socket is the writer's
		for {
			u.c.SetReadDeadline(time.Now().Add(time.Second))
			_, err := u.br.Peek(1)
			if err == nil {
				break
			}
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				return nil, err
			}
			if c.gone() {
				return nil, errClientGone
			}
		}
		u.c.SetReadDeadline(time.Time{})
	}
	return http.ReadResponse(u.br, req)
}

// endBody waits for the request body's writer; false when the body did
// not all go out (the upstream answered early or failed): then neither
// connection can carry another request.
func endBody(u *upConn, c upClient) bool {
	if u.wrote == nil {
		return true
	}
	select {
	case err := <-u.wrote:
		u.wrote = nil
		return err == nil
	default:
	}
	// An upstream that read the whole body may answer before its writer
	// has returned: a moment's grace, so that such a connection is kept
	// (without it, TestH1Bodies lost its connection about once in 300 runs).
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	select {
	case err := <-u.wrote:
		u.wrote = nil
		return err == nil
	case <-t.C:
	}
	u.c.Close() // stops a writer blocked on the upstream
	c.abandonBody()
	<-u.wrote
	u.wrote = nil
	return false
}

func (h *h1Conn) using(u *upConn) bool {
	h.up.Store(u)
	return h.state.Load() != h1Closed // killed while dialling
}

func (h *h1Conn) bodyFailed() bool { return h.body.err != nil }

// gone looks for a moment whether the client closed: its TLS close (an
// alert, then EOF) or a reset. A pipelined request it sent meanwhile
// stays in br.
func (h *h1Conn) gone() bool {
	if h.br.Buffered() > 0 {
		return false
	}
	h.tc.SetReadDeadline(time.Now().Add(time.Millisecond))
	_, err := h.br.Peek(1)
	h.tc.SetReadDeadline(time.Time{})
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

// abandonBody stops reading an upload the upstream did not take: the
// client connection will close; until then (half a second) the rest of
// the body is read and dropped, so that the client sees the answer
// rather than a reset.
func (h *h1Conn) abandonBody() {
	h.cc.Conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
}

// respond streams resp to the client and puts the upstream connection
// back when it can carry another request.
func (h *h1Conn) respond(req *http.Request, resp *http.Response, u *upConn, upgrade string, closeAfter bool) (keep bool) {
	h.status = resp.StatusCode
	h.startFinal()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if upgrade == "" || !strings.EqualFold(resp.Header.Get("Upgrade"), upgrade) {
			h.up.Store(nil)
			u.c.Close()
			h.s.upstreamError(h.p.label, "http")
			h.s.log.Warn("upstream request", "route", h.p.label, "upstream", h.p.addr,
				"err", fmt.Errorf("switched to protocol %q, asked for %q", resp.Header.Get("Upgrade"), upgrade))
			h.reply(http.StatusBadGateway, "", false)
			return false
		}
		h.tunnel(resp, u)
		return false
	}
	keep = !closeAfter && !h.s.term().draining.Load()
	bw := getWriter(h.w)
	defer putWriter(bw)
	writeStatusLine(bw, resp)
	removeHopByHop(resp.Header)
	if h.cc.alt != nil {
		resp.Header["Alt-Svc"] = h.cc.alt
	}
	noBody := req.Method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified
	chunked := false
	switch {
	case resp.StatusCode == http.StatusNoContent:
		delete(resp.Header, "Content-Length")
	case noBody: // the upstream's Content-Length, if any, describes the entity
	case resp.ContentLength >= 0:
		resp.Header["Content-Length"] = []string{strconv.FormatInt(resp.ContentLength, 10)}
	case req.ProtoAtLeast(1, 1):
		delete(resp.Header, "Content-Length")
		resp.Header["Transfer-Encoding"] = []string{"chunked"}
		chunked = true
		announceTrailer(resp.Header, resp.Trailer)
	default: // an HTTP/1.0 client: the body ends when the connection does
		delete(resp.Header, "Content-Length")
		keep = false
	}
	if !keep {
		resp.Header["Connection"] = []string{"close"}
	} else if !req.ProtoAtLeast(1, 1) {
		resp.Header["Connection"] = []string{"keep-alive"}
	}
	resp.Header.Write(bw)
	bw.WriteString("\r\n")

	upOK := true // the body came whole from the upstream
	var werr error
	if !noBody {
		var w flushWriter = bw
		if chunked {
			w = chunkWriter{bw}
		}
		if upOK, werr = copyBody(w, resp.Body, u); chunked && upOK && werr == nil {
			bw.WriteString("0\r\n")
			resp.Trailer.Write(bw)
			bw.WriteString("\r\n")
		}
	}
	if werr == nil {
		werr = bw.Flush()
	}
	if werr != nil {
		u.c.Close() // before Body.Close, which would read the rest of the body
	}
	resp.Body.Close()
	h.up.Store(nil)
	bodyOK := endBody(u, h)
	if !bodyOK {
		keep = false
		h.tc.CloseWrite()
		if tcp, ok := h.cc.Conn.(*net.TCPConn); ok {
			tcp.CloseWrite()
		}
		io.Copy(io.Discard, h.br) // the rest of the upload, until abandonBody's deadline
	}
	if upOK && werr == nil && bodyOK && !resp.Close {
		h.p.put(u)
	} else {
		u.c.Close()
	}
	if !upOK {
		h.s.upstreamError(h.p.label, "http")
		h.s.log.Warn("upstream response cut", "route", h.p.label, "upstream", h.p.addr)
	}
	return keep && upOK && werr == nil
}

// interim passes a 1xx response (103 Early Hints) to an HTTP/1.1 client.
func (h *h1Conn) interim(resp *http.Response) error {
	if !h.http11 {
		return nil
	}
	removeHopByHop(resp.Header)
	h.hmu.Lock()
	defer h.hmu.Unlock()
	bw := getWriter(h.w)
	defer putWriter(bw)
	writeStatusLine(bw, resp)
	resp.Header.Write(bw)
	bw.WriteString("\r\n")
	return bw.Flush()
}

// startFinal is called before the final answer's head goes out: a 100
// Continue not yet sent is not sent any more.
func (h *h1Conn) startFinal() {
	h.hmu.Lock()
	h.finalHead = true
	h.hmu.Unlock()
}

// tunnel passes the 101 answer on and then copies both ways (WebSocket).
func (h *h1Conn) tunnel(resp *http.Response, u *upConn) {
	defer u.c.Close()
	bw := getWriter(h.w)
	writeStatusLine(bw, resp)
	resp.Header.Write(bw)
	bw.WriteString("\r\n")
	err := bw.Flush()
	putWriter(bw)
	if err != nil {
		return
	}
	// Either side ending ends both (as httputil.ReverseProxy does): a
	// peer that ignores the other's close must not hold the connection.
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(u.c, h.br) // what the client sent after its request, then the rest
		u.tcp.Close()
		h.cc.Conn.Close()
	}()
	io.Copy(h.w, u.br)
	u.tcp.Close()
	h.cc.Conn.Close()
	<-done
}

// reply answers with a short error; true when the connection goes on
// (keep, and the relay is not draining).
func (h *h1Conn) reply(code int, msg string, keep bool) bool {
	h.status = code
	h.startFinal()
	bw := getWriter(h.w)
	defer putWriter(bw)
	fmt.Fprintf(bw, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n", code, http.StatusText(code), len(msg))
	keep = keep && !h.s.term().draining.Load()
	if !keep {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	bw.WriteString(msg)
	err := bw.Flush()
	return keep && err == nil
}

// clientBody is a request body read from the client: it sends 100
// Continue on the first read when an HTTP/1.1 client waits for one, and
// keeps the client's read error apart from the upstream's.
type clientBody struct {
	r      io.ReadCloser
	h      *h1Conn
	expect bool
	err    error
}

func (b *clientBody) Read(p []byte) (int, error) {
	if b.expect {
		b.expect = false
		b.h.hmu.Lock()
		var err error
		if !b.h.finalHead { // an early answer makes it moot
			_, err = io.WriteString(b.h.w, "HTTP/1.1 100 Continue\r\n\r\n")
		}
		b.h.hmu.Unlock()
		if err != nil {
			b.err = err
			return 0, err
		}
	}
	n, err := b.r.Read(p)
	if err != nil && err != io.EOF {
		b.err = err
	}
	return n, err
}

func (b *clientBody) Close() error { return b.r.Close() }

// hopHeaders are connection-specific (RFC 9110 7.6.1): never forwarded.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = textproto.TrimString(f); f != "" {
				h.Del(f)
			}
		}
	}
	for _, k := range hopHeaders {
		delete(h, k)
	}
}

// prepareRequest turns a client's request into the upstream's, as
// httputil.ReverseProxy in Rewrite mode with SetXForwarded does for h2
// clients: hop-by-hop headers dropped (an upgrade is asked for again),
// the client's Host kept, X-Forwarded-* replaced by the relay's. It
// returns the protocol the client asks to upgrade to, if any.
func prepareRequest(req *http.Request, clientIP string) (upgrade string) {
	hdr := req.Header
	if tokenIn(hdr["Connection"], "upgrade") {
		upgrade = hdr.Get("Upgrade")
	}
	trailers := tokenIn(hdr["Te"], "trailers")
	removeHopByHop(hdr)
	if trailers {
		hdr["Te"] = []string{"trailers"}
	}
	if upgrade != "" {
		hdr["Connection"] = []string{"Upgrade"}
		hdr["Upgrade"] = []string{upgrade}
	}
	for _, k := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		delete(hdr, k)
	}
	if clientIP != "" {
		hdr["X-Forwarded-For"] = []string{clientIP}
	}
	hdr["X-Forwarded-Host"] = []string{req.Host}
	hdr["X-Forwarded-Proto"] = []string{"https"}
	if _, ok := hdr["User-Agent"]; !ok {
		hdr["User-Agent"] = []string{""} // else Request.Write adds Go's
	}
	req.Close = false // the upstream connection stays open
	return upgrade
}

func tokenIn(values []string, token string) bool {
	for _, v := range values {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(textproto.TrimString(f), token) {
				return true
			}
		}
	}
	return false
}

// h2Stream is an h2 request in flight, as an upClient.
type h2Stream struct {
	ctx  context.Context
	w    http.ResponseWriter
	body clientBody
	up   atomic.Pointer[upConn] // in use: closed when the client resets the stream
}

func (x *h2Stream) using(u *upConn) bool {
	x.up.Store(u) // before the look at ctx: a reset meanwhile closes u
	return u == nil || x.ctx.Err() == nil
}
func (x *h2Stream) bodyFailed() bool { return x.body.err != nil }
func (x *h2Stream) gone() bool       { return x.ctx.Err() != nil }
func (x *h2Stream) abandonBody()     { x.body.r.Close() }

func (x *h2Stream) interim(r *http.Response) error {
	h := x.w.Header()
	copyHeader(h, r.Header)
	x.w.WriteHeader(r.StatusCode)
	clear(h) // the 1xx's own: not the answer's
	return nil
}

// ServeHTTP proxies an h2 stream over the pool's HTTP/1.1 connections:
// one synchronous round trip on the stream's goroutine (net/http's
// Transport took a writer and a reader goroutine hand-off per request).
func (p *httpProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	x := &h2Stream{ctx: r.Context(), w: w, body: clientBody{r: r.Body}}
	// The h2 server gives a bodiless request an empty Body, not NoBody:
	// Request.Write would then send it chunked, after probing it.
	if r.ContentLength == 0 || r.Body == nil {
		r.Body = http.NoBody
	} else {
		r.Body = &x.body
	}
	r.Header.Del("Expect") // the h2 server answers 100-continue itself
	clientIP, _, _ := net.SplitHostPort(r.RemoteAddr)
	prepareRequest(r, clientIP)
	delete(r.Header, "Connection")
	delete(r.Header, "Upgrade") // no upgrades over h2
	// A stream the client resets must not hold the upstream, also while
	// the answer is awaited after the whole body went out.
	stop := context.AfterFunc(x.ctx, func() {
		if u := x.up.Load(); u != nil {
			u.c.Close()
		}
	})
	defer stop()
	resp, u, err := p.roundTrip(x.ctx, r, x)
	if err != nil {
		if x.body.err != nil || x.ctx.Err() != nil || errors.Is(err, errClientGone) { // the client, not the upstream, failed
			panic(http.ErrAbortHandler)
		}
		p.s.upstreamError(p.label, dialErrorReason(err))
		p.s.log.Warn("upstream request", "route", p.label, "upstream", p.addr, "err", err)
		noteResult(w, resultUpstreamError, dialErrorReason(err))
		w.WriteHeader(upstreamStatus(err))
		return
	}
	removeHopByHop(resp.Header)
	h := w.Header()
	copyHeader(h, resp.Header)
	announceTrailer(h, resp.Trailer)
	w.WriteHeader(resp.StatusCode)
	upOK, werr := copyBody(h2Writer{w, http.NewResponseController(w)}, resp.Body, u)
	for k, vv := range resp.Trailer {
		h[k] = vv
	}
	if werr != nil {
		u.c.Close() // before Body.Close, which would read the rest of the body
	}
	resp.Body.Close()
	bodyOK := endBody(u, x)
	if stop() && upOK && werr == nil && bodyOK && !resp.Close {
		p.put(u)
	} else {
		u.c.Close()
	}
	if !upOK {
		p.s.upstreamError(p.label, "http")
		p.s.log.Warn("upstream response cut", "route", p.label, "upstream", p.addr)
		panic(http.ErrAbortHandler) // the client sees a reset stream, not a short body
	}
}

func copyHeader(dst, src http.Header) {
	for k, vv := range src {
		dst[k] = vv
	}
}

// writeStatusLine writes resp's status line as HTTP/1.1, with the
// standard reason when the upstream sent none.
func writeStatusLine(bw *bufio.Writer, resp *http.Response) {
	reason := strings.TrimPrefix(resp.Status[min(3, len(resp.Status)):], " ")
	if reason == "" {
		reason = http.StatusText(resp.StatusCode)
	}
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(strconv.Itoa(resp.StatusCode))
	bw.WriteByte(' ')
	bw.WriteString(reason)
	bw.WriteString("\r\n")
}

// announceTrailer lists the upstream's trailer fields in the Trailer
// header, so that the client expects them after the body.
func announceTrailer(h, trailer http.Header) {
	if len(trailer) == 0 {
		return
	}
	names := make([]string, 0, len(trailer))
	for k := range trailer {
		names = append(names, k)
	}
	h["Trailer"] = []string{strings.Join(names, ", ")}
}

// flushWriter is where a response body goes: the client's buffered
// writer, chunked or not, or an h2 stream.
type flushWriter interface {
	io.Writer
	Flush() error
}

// chunkWriter frames each write as one HTTP/1.1 chunk.
type chunkWriter struct{ bw *bufio.Writer }

func (c chunkWriter) Write(p []byte) (int, error) {
	c.bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
	c.bw.WriteString("\r\n")
	c.bw.Write(p)
	if _, err := c.bw.WriteString("\r\n"); err != nil { // bufio errors stick: the last write reports them
		return 0, err
	}
	return len(p), nil
}

func (c chunkWriter) Flush() error { return c.bw.Flush() }

type h2Writer struct {
	http.ResponseWriter
	rc *http.ResponseController
}

func (w h2Writer) Flush() error { return w.rc.Flush() }

// copyBody streams an upstream response body to w. It flushes when the
// next read would wait on the upstream: the head at once if the body is
// not already here, then streams (server-sent events, long polls) as they
// come and bulk in full buffers; the end goes out with the caller's last
// flush. upOK: the body came whole from the upstream; werr: the client
// could not be written to.
func copyBody(w flushWriter, body io.Reader, u *upConn) (upOK bool, werr error) {
	if u.br.Buffered() == 0 {
		if werr = w.Flush(); werr != nil {
			return true, werr
		}
	}
	buf := proxyBuffers.Get()
	defer proxyBuffers.Put(buf)
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			if _, werr = w.Write(buf[:n]); werr == nil && rerr == nil && u.br.Buffered() == 0 {
				werr = w.Flush()
			}
		}
		if rerr != nil {
			return rerr == io.EOF, werr
		}
		if werr != nil {
			return true, werr
		}
	}
}
