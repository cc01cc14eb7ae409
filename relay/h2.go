package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The relay's own HTTP/2 server for terminate routes proxied by the
// relay's loop. net/http's h2 server passes every request through four
// goroutines (frame reader, serve loop, handler, frame writer) with a
// channel hand-off at each step; here the connection's goroutine reads
// frames and starts one goroutine per stream, which writes its own frames
// under a lock, and the last writer out flushes: one hand-off per request,
// and one write to the client for many streams' answers under load.
const (
	h2MaxStreams    = 250     // concurrent streams a client may have (net/http's default)
	h2StreamWindow  = 1 << 20 // request body bytes buffered per stream
	h2ConnWindow    = 1 << 20 // and per connection (net/http's defaults)
	h2MaxHeaderList = 1 << 20 // request header block, decoded (net/http's MaxHeaderBytes)
	h2ReadFrame     = 16384   // largest frame read: SETTINGS_MAX_FRAME_SIZE's default, not raised
	h2InitialWindow = 65535   // RFC 9113 6.9.2
	h2MaxWindow     = 1<<31 - 1

	// A connection's glitch budget (as HAProxy's
	// tune.h2.fe.glitches-threshold): protocol oddities a client makes
	// the relay handle, leaking one per h2GlitchLeak so that a browser's
	// cancellations over hours never add up. Past it: GOAWAY
	// ENHANCE_YOUR_CALM.
	h2GlitchBudget = 1000
	h2GlitchLeak   = 100 * time.Millisecond
	h2CtlPerSecond = 20 // PINGs and SETTINGS a second before they count
	// A header block over the limit counts as this many glitches.
	h2HeaderGlitches = 100
)

var (
	errH2Closed = errors.New("http2: connection closed")
	errH2Calm   = errors.New("http2: the client spent its glitch budget")
)

// h2Conn is a client connection speaking HTTP/2.
type h2Conn struct {
	s       *Server
	handler http.Handler
	tc      *tls.Conn
	cc      *termConn
	fr      *http2.Framer // reads, on the connection's goroutine only
	tap     frameTap      // the header of the frame fr read last
	remote  string
	label   string // route
	tlsSt   tls.ConnectionState

	// The glitch budget; on the read goroutine only.
	glitchN  int
	glitchAt time.Time // of the last leak
	ctlN     int       // PINGs and SETTINGS in the second from ctlAt
	ctlAt    time.Time

	// Frames are written to bw under wmu; the writer that finds no other
	// waiting flushes.
	wmu     sync.Mutex
	dw      deadlineWriter // tc, each write bounded by limits.idle_timeout
	bw      *bufio.Writer  // from h2Writers while something is unflushed
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
	werr    error
	waiting atomic.Int32
	owed    bool // a flush was left to a waiting writer

	mu         sync.Mutex
	cond       *sync.Cond // windows grew, body data came, a stream or the connection ended
	streams    map[uint32]*h2StreamState
	running    int    // stream goroutines not yet returned
	lastID     uint32 // highest stream opened by the client
	sendWin    int64  // connection window for our DATA
	initWin    int64  // client's SETTINGS_INITIAL_WINDOW_SIZE
	maxFrame   int    // client's SETTINGS_MAX_FRAME_SIZE
	recvWin    int64  // connection bytes the client may still send
	recvGiven  int64  // consumed, not yet returned by WINDOW_UPDATE
	goAway     bool   // GOAWAY sent: no new streams; closed when the last ends
	closed     bool
	idle       *time.Timer
	idleWindow time.Duration
	// Streams we reset lately: frames the client sent on them before it
	// saw the reset are ignored (RFC 9113 5.1, closed), not errors.
	resetIDs [128]uint32
	resetN   int
}

// h2StreamState is one request.
type h2StreamState struct {
	c      *h2Conn
	id     uint32
	ctx    context.Context
	cancel context.CancelCauseFunc

	// under c.mu
	buf       []byte // request body received, not yet read
	bodyEnd   bool   // END_STREAM came
	bodyErr   error  // reset, or the connection ended
	recvWin   int64  // body bytes the client may still send
	recvGiven int64
	declared  int64 // content-length; -1 when none
	received  int64
	sendWin   int64
	done      bool // the client reset it, or its answer is complete
	expect    bool // the client waits for 100 Continue
	final     bool // the final response's HEADERS are out: no more 1xx
	sentEnd   bool // our END_STREAM is out (with bodyEnd: closed)
}

var h2Writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 32<<10) }}

// serveH2 serves a handshaken client connection that chose h2.
func (s *Server) serveH2(tc *tls.Conn, cc *termConn, rt *route) {
	c := &h2Conn{
		s: s, handler: rt.term.handler, tc: tc, cc: cc,
		remote:   cc.RemoteAddr().String(),
		label:    rt.term.label,
		tlsSt:    tc.ConnectionState(),
		streams:  map[uint32]*h2StreamState{},
		sendWin:  h2InitialWindow,
		initWin:  h2InitialWindow,
		maxFrame: 16384,
		recvWin:  h2ConnWindow,
	}
	c.cond = sync.NewCond(&c.mu)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.tap.r, c.tap.c = tc, c
	c.fr = http2.NewFramer(io.Discard, &c.tap)
	c.fr.SetMaxReadFrameSize(h2ReadFrame)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = h2MaxHeaderList
	if !s.term().addH2(c) {
		tc.Close()
		return
	}
	c.run()
}

func (c *h2Conn) run() {
	defer c.end()
	lim := c.s.state0Limits()
	c.idleWindow = lim.IdleTimeout.D()
	c.dw = deadlineWriter{c.tc, c.idleWindow}
	// The preface and the client's SETTINGS within the hello timeout.
	c.tc.SetReadDeadline(time.Now().Add(lim.HelloTimeout.D()))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.tc, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		return
	}
	c.write(true, func() {
		c.settings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
		)
		c.windowUpdate(0, h2ConnWindow-h2InitialWindow)
	})
	c.recvWin = h2ConnWindow
	f, err := c.fr.ReadFrame()
	if sf, ok := f.(*http2.SettingsFrame); err != nil || !ok || sf.IsAck() {
		c.goAwayNow(http2.ErrCodeProtocol)
		return
	}
	c.tc.SetReadDeadline(time.Time{})
	c.mu.Lock()
	c.idle = time.AfterFunc(c.idleWindow, c.idleCheck)
	c.mu.Unlock()
	for err == nil {
		if err = c.frame(f); err != nil {
			break
		}
		f, err = c.fr.ReadFrame()
		var se http2.StreamError
		if errors.As(err, &se) {
			err = c.frameStreamError(se)
			f = nil
		}
	}
	var ce http2.ConnectionError
	switch {
	case errors.Is(err, errH2Calm):
		c.s.m.limitRejections.WithLabelValues("h2_glitches").Inc()
		c.s.log.Info("http2 client closed: glitch budget spent", "route", c.label, "client", c.remote)
		c.goAwayNow(http2.ErrCodeEnhanceYourCalm)
		// A moment for the client to read the GOAWAY: closing with its
		// flood unread would reset the connection before it does.
		c.tc.CloseWrite()
		c.tc.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		io.CopyN(io.Discard, c.tc, 256<<10)
	case errors.As(err, &ce):
		c.goAwayNow(http2.ErrCode(ce))
	case errors.Is(err, http2.ErrFrameTooLarge):
		c.goAwayNow(http2.ErrCodeFrameSize)
	}
}

// glitch counts one glitch of kind; errH2Calm when the budget is spent.
func (c *h2Conn) glitch(kind string) error { return c.glitches(kind, 1) }

// glitches counts weight glitches of kind at once: a header block over the
// limit still had to be decoded whole (HPACK state), ~1 MiB of work, so it
// weighs h2HeaderGlitches and a flood of them is cut after a few blocks.
func (c *h2Conn) glitches(kind string, weight int) error {
	now := time.Now()
	if n := now.Sub(c.glitchAt) / h2GlitchLeak; n > 0 {
		c.glitchN = max(0, c.glitchN-int(n))
		c.glitchAt = now
	}
	c.glitchN += weight
	c.s.m.h2Glitches.WithLabelValues(c.label, kind).Inc()
	if c.glitchN > h2GlitchBudget {
		return errH2Calm
	}
	return nil
}

// control counts a PING or SETTINGS: beyond h2CtlPerSecond, a glitch.
func (c *h2Conn) control(kind string) error {
	if now := time.Now(); now.Sub(c.ctlAt) > time.Second {
		c.ctlAt, c.ctlN = now, 0
	}
	if c.ctlN++; c.ctlN > h2CtlPerSecond {
		return c.glitch(kind)
	}
	return nil
}

// frameStreamError answers a stream error the Framer found in a frame.
func (c *h2Conn) frameStreamError(se http2.StreamError) error {
	kind := "stream_error"
	switch c.tap.typ {
	case http2.FrameWindowUpdate:
		kind = "window_update_zero"
	case http2.FrameHeaders, http2.FrameContinuation: // a malformed request (bad field, pseudo-header misuse)
		c.s.m.badRequests.WithLabelValues(c.label, "h2").Inc()
	}
	if err := c.glitch(kind); err != nil {
		return err
	}
	c.mu.Lock()
	if se.StreamID > c.lastID || se.StreamID%2 == 0 {
		if c.tap.typ != http2.FrameHeaders || se.StreamID%2 == 0 {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol) // a frame on an idle stream
		}
		// A HEADERS frame opened the stream, then failed: the client's
		// next frames on it are on a stream we reset, not on an idle one.
		c.lastID = se.StreamID
	}
	c.mu.Unlock()
	c.resetStream(se.StreamID, se.Code)
	return nil
}

// idleLocked: id names a stream the client has not opened (RFC 9113 5.1:
// any frame but HEADERS or PRIORITY on it is a connection error).
func (c *h2Conn) idleLocked(id uint32) bool { return id > c.lastID || id%2 == 0 }

// noteResetLocked remembers that we reset stream id.
func (c *h2Conn) noteResetLocked(id uint32) {
	c.resetIDs[c.resetN%len(c.resetIDs)] = id
	c.resetN++
}

// resetByUsLocked: we reset stream id lately (frames on it are ignored).
func (c *h2Conn) resetByUsLocked(id uint32) bool {
	for _, x := range c.resetIDs {
		if x == id {
			return true
		}
	}
	return false
}

// frame handles one frame from the client; an error ends the connection.
func (c *h2Conn) frame(f http2.Frame) error {
	switch f := f.(type) {
	case nil: // a stream error, handled
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := c.control("settings"); err != nil {
			return err
		}
		if err := c.applySettings(f); err != nil {
			return err
		}
		c.write(true, func() { c.rawFrame(http2.FrameSettings, http2.FlagSettingsAck, 0) })
	case *http2.MetaHeadersFrame:
		return c.headers(f)
	case *http2.DataFrame:
		return c.data(f)
	case *http2.WindowUpdateFrame:
		return c.windowUpdated(f)
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		if st := c.streams[f.StreamID]; st != nil {
			if !st.final { // reset before its answer started: work for nothing
				if err := c.glitch("reset"); err != nil {
					c.mu.Unlock()
					return err
				}
			}
			c.endStreamLocked(st, fmt.Errorf("http2: client reset stream %d (%v)", f.StreamID, f.ErrCode))
		} else if c.idleLocked(f.StreamID) {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol) // reset of an idle stream
		} else if c.resetByUsLocked(f.StreamID) {
			// Of a stream we refused or reset: legal, but in a rapid
			// reset flood most are, once streams pile up.
			c.mu.Unlock()
			return c.glitch("reset")
		}
		c.mu.Unlock()
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID { // RFC 9113 5.3.1
			c.resetStream(f.StreamID, http2.ErrCodeProtocol)
		}
	case *http2.PingFrame:
		if err := c.control("ping"); err != nil {
			return err
		}
		if !f.IsAck() {
			c.write(true, func() { c.rawFrame(http2.FramePing, http2.FlagPingAck, 0, f.Data[:]) })
		}
	case *http2.GoAwayFrame:
		// The client opens no more streams; those in flight finish.
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil // unknown frames are ignored
}

func (c *h2Conn) applySettings(f *http2.SettingsFrame) error {
	tableSize, setTable := uint32(0), false
	c.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.initWin
			c.initWin = int64(s.Val)
			for _, st := range c.streams {
				if st.sendWin += delta; st.sendWin > h2MaxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
			}
			c.cond.Broadcast()
		case http2.SettingMaxFrameSize:
			c.maxFrame = int(s.Val)
		case http2.SettingHeaderTableSize:
			tableSize, setTable = s.Val, true
		}
		return nil
	})
	c.mu.Unlock()
	if setTable { // after c.mu: writers take c.mu under wmu
		c.wmu.Lock()
		c.henc.SetMaxDynamicTableSizeLimit(tableSize)
		c.wmu.Unlock()
	}
	return err
}

// headers opens a stream (or ends one's body with trailers).
func (c *h2Conn) headers(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.mu.Lock()
	if f.HasPriority() && f.Priority.StreamDep == id { // RFC 9113 5.3.1
		c.lastID = max(c.lastID, id)
		c.mu.Unlock()
		c.resetStream(id, http2.ErrCodeProtocol)
		return nil
	}
	if st := c.streams[id]; st != nil && !(st.bodyEnd && st.sentEnd) {
		defer c.mu.Unlock()
		switch {
		case st.bodyEnd: // half-closed (remote)
			c.resetLocked(st, http2.ErrCodeStreamClosed)
		case !f.StreamEnded(): // trailers must end the stream
			c.resetLocked(st, http2.ErrCodeProtocol)
		case st.declared >= 0 && st.received != st.declared:
			c.resetLocked(st, http2.ErrCodeProtocol) // body shorter than its content-length
		default:
			st.bodyEnd = true // request trailers are not forwarded
			c.cond.Broadcast()
		}
		return nil
	}
	if id <= c.lastID {
		defer c.mu.Unlock()
		if c.resetByUsLocked(id) && c.streams[id] == nil {
			return c.glitch("closed_stream") // sent before the client saw our reset: ignored
		}
		return http2.ConnectionError(http2.ErrCodeStreamClosed) // closed, or skipped
	}
	c.lastID = id
	if c.goAway || c.closed {
		c.noteResetLocked(id) // after our GOAWAY: ignored, and so are its frames
		c.mu.Unlock()
		return nil
	}
	if c.running >= h2MaxStreams {
		c.mu.Unlock()
		c.resetStream(id, http2.ErrCodeRefusedStream)
		return nil
	}
	if f.Truncated {
		if err := c.glitches("header_too_large", h2HeaderGlitches); err != nil {
			c.mu.Unlock()
			return err
		}
	}
	st := &h2StreamState{c: c, id: id, recvWin: h2StreamWindow, sendWin: c.initWin, declared: -1}
	st.ctx, st.cancel = context.WithCancelCause(c.s.hardCtx)
	req, status, err := c.request(f, st)
	if err != nil {
		c.s.m.badRequests.WithLabelValues(c.label, "h2").Inc()
		c.mu.Unlock()
		st.cancel(nil)
		c.resetStream(id, http2.ErrCodeProtocol)
		return nil
	}
	st.bodyEnd = f.StreamEnded()
	c.streams[id] = st
	c.running++
	c.idle.Stop()
	c.mu.Unlock()
	go c.serveStream(st, req, status)
	return nil
}

// request builds the stream's request; status, when not 0, is answered
// without the handler (CONNECT, oversized headers).
func (c *h2Conn) request(f *http2.MetaHeadersFrame, st *h2StreamState) (*http.Request, int, error) {
	method, path := f.PseudoValue("method"), f.PseudoValue("path")
	scheme, authority := f.PseudoValue("scheme"), f.PseudoValue("authority")
	if f.Truncated {
		return nil, http.StatusRequestHeaderFieldsTooLarge, nil
	}
	if method == http.MethodConnect {
		return nil, http.StatusMethodNotAllowed, nil // no tunnels over h2
	}
	if method == "" || path == "" || scheme == "" {
		return nil, 0, errors.New("missing pseudo-header")
	}
	fields := f.RegularFields()
	h := make(http.Header, len(fields))
	for _, hf := range fields {
		switch hf.Name {
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
			return nil, 0, fmt.Errorf("connection-specific header %q", hf.Name)
		case "te":
			if hf.Value != "trailers" {
				return nil, 0, errors.New(`te other than "trailers"`)
			}
		}
		k := http.CanonicalHeaderKey(hf.Name)
		h[k] = append(h[k], hf.Value)
	}
	if cookies := h["Cookie"]; len(cookies) > 1 { // RFC 9113 8.2.3
		h["Cookie"] = []string{strings.Join(cookies, "; ")}
	}
	if authority == "" {
		authority = h.Get("Host")
	}
	delete(h, "Host")
	if c.s.misdirected(c.cc.route, c.tlsSt.ServerName, authority, "h2") {
		c.s.m.badRequests.WithLabelValues(c.label, "host_mismatch").Inc()
		return nil, http.StatusMisdirectedRequest, nil
	}
	u, err := url.ParseRequestURI(path)
	if err != nil {
		return nil, 0, err
	}
	req := &http.Request{
		Method: method, URL: u, Proto: "HTTP/2.0", ProtoMajor: 2,
		Header: h, Host: authority, RequestURI: path,
		RemoteAddr: c.remote, TLS: &c.tlsSt,
	}
	if cl := h["Content-Length"]; len(cl) > 0 {
		n, err := strconv.ParseInt(cl[0], 10, 64)
		if len(cl) > 1 || err != nil || n < 0 {
			return nil, 0, errors.New("bad content-length")
		}
		st.declared = n
	}
	switch {
	case f.StreamEnded():
		if st.declared > 0 {
			return nil, 0, errors.New("content-length without a body")
		}
		req.Body = http.NoBody
	default:
		req.ContentLength = st.declared
		req.Body = &h2Body{st: st}
		st.expect = strings.EqualFold(h.Get("Expect"), "100-continue")
	}
	return req.WithContext(st.ctx), 0, nil
}

// data takes request body bytes.
func (c *h2Conn) data(f *http2.DataFrame) error {
	n := int64(f.Header().Length) // padding included: it counts against the windows
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.recvWin -= n; c.recvWin < 0 {
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	id := f.StreamID
	if n == 0 && !f.StreamEnded() {
		if err := c.glitch("empty_frame"); err != nil {
			return err
		}
	}
	st := c.streams[id]
	if st == nil || st.bodyEnd {
		if c.idleLocked(id) {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// Not taken: the stream's window is gone, the connection's
		// comes back.
		c.giveBackLocked(nil, n)
		switch {
		case st != nil: // half-closed (remote)
			c.resetLocked(st, http2.ErrCodeStreamClosed)
		case !c.resetByUsLocked(id): // closed by the client's END_STREAM or RST_STREAM
			c.resetLater(id, http2.ErrCodeStreamClosed)
		}
		return c.glitch("closed_stream")
	}
	if st.recvWin -= n; st.recvWin < 0 {
		c.giveBackLocked(nil, n)
		c.resetLocked(st, http2.ErrCodeFlowControl)
		return nil
	}
	d := f.Data()
	st.received += int64(len(d))
	if st.declared >= 0 && (st.received > st.declared || f.StreamEnded() && st.received != st.declared) {
		c.s.m.badRequests.WithLabelValues(c.label, "h2").Inc()
		c.giveBackLocked(nil, n)
		c.resetLocked(st, http2.ErrCodeProtocol)
		return nil
	}
	st.buf = append(st.buf, d...)
	if pad := n - int64(len(d)); pad > 0 {
		c.giveBackLocked(st, pad)
	}
	st.bodyEnd = f.StreamEnded()
	c.cond.Broadcast()
	return nil
}

func (c *h2Conn) windowUpdated(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		if c.sendWin += int64(f.Increment); c.sendWin > h2MaxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
	} else if st := c.streams[f.StreamID]; st != nil {
		if st.sendWin += int64(f.Increment); st.sendWin > h2MaxWindow {
			c.resetLocked(st, http2.ErrCodeFlowControl)
		}
	} else if c.idleLocked(f.StreamID) {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.cond.Broadcast()
	return nil
}

// giveBackLocked returns consumed bytes to the client's windows (the
// connection's, and st's when it still takes a body), in WINDOW_UPDATEs
// once a quarter of a window is due.
func (c *h2Conn) giveBackLocked(st *h2StreamState, n int64) {
	var connInc, streamInc int64
	c.recvGiven += n
	if c.recvGiven >= h2ConnWindow/4 {
		connInc, c.recvGiven = c.recvGiven, 0
		c.recvWin += connInc
	}
	if st != nil && !st.bodyEnd && !st.done {
		st.recvGiven += n
		if st.recvGiven >= h2StreamWindow/4 {
			streamInc, st.recvGiven = st.recvGiven, 0
			st.recvWin += streamInc
		}
	}
	if connInc == 0 && streamInc == 0 {
		return
	}
	id := uint32(0)
	if st != nil {
		id = st.id
	}
	// Written from another goroutine: c.mu is held here, and writers
	// take c.mu to wait for windows.
	go c.write(true, func() {
		if connInc > 0 {
			c.windowUpdate(0, uint32(connInc))
		}
		if streamInc > 0 {
			c.windowUpdate(id, uint32(streamInc))
		}
	})
}

// endStreamLocked ends st for its handler: the body read fails, writes
// stop, the upstream request is canceled.
func (c *h2Conn) endStreamLocked(st *h2StreamState, cause error) {
	if st.done {
		return
	}
	st.done = true
	if st.bodyErr == nil {
		st.bodyErr = cause
	}
	delete(c.streams, st.id)
	if n := int64(len(st.buf)); n > 0 { // buffered, never to be read
		st.buf = nil
		c.giveBackLocked(nil, n)
	}
	st.cancel(cause)
	c.cond.Broadcast()
}

// resetLocked resets st from our side.
func (c *h2Conn) resetLocked(st *h2StreamState, code http2.ErrCode) {
	c.endStreamLocked(st, http2.StreamError{StreamID: st.id, Code: code})
	c.resetLater(st.id, code)
}

// resetLater sends RST_STREAM for id from another goroutine (c.mu is
// held: writers take it).
func (c *h2Conn) resetLater(id uint32, code http2.ErrCode) {
	c.noteResetLocked(id)
	go c.writeReset(id, code)
}

func (c *h2Conn) resetStream(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	if st := c.streams[id]; st != nil {
		c.endStreamLocked(st, http2.StreamError{StreamID: id, Code: code})
	}
	c.noteResetLocked(id)
	c.mu.Unlock()
	c.writeReset(id, code)
}

func (c *h2Conn) writeReset(id uint32, code http2.ErrCode) {
	var p [4]byte
	binary.BigEndian.PutUint32(p[:], uint32(code))
	c.write(true, func() { c.rawFrame(http2.FrameRSTStream, 0, id, p[:]) })
}

// serveStream runs the handler for one stream.
func (c *h2Conn) serveStream(st *h2StreamState, req *http.Request, status int) {
	rw := &h2Response{st: st, h: make(http.Header)}
	if ent := c.s.requestEntry(c.cc, req); ent != nil {
		defer func() {
			in := max(req.ContentLength, 0)
			c.s.requestDone(ent, rw.status, in, rw.n, rw.result, rw.reason)
		}()
	}
	defer func() {
		aborted := false
		if r := recover(); r != nil {
			aborted = true
			if r != http.ErrAbortHandler {
				c.s.log.Error("http2 handler panic", "client", c.remote, "panic", r)
			}
		}
		c.mu.Lock()
		gone := st.done // reset by the client: no RST of ours
		c.mu.Unlock()
		if aborted && !gone {
			c.resetStream(st.id, http2.ErrCodeInternal)
		} else if !aborted {
			rw.finish()
		}
		c.mu.Lock()
		if !st.bodyEnd && !st.done {
			// Answered before the whole body came: the client may stop.
			c.resetLater(st.id, http2.ErrCodeNo)
		}
		c.endStreamLocked(st, context.Canceled)
		c.running--
		c.cond.Broadcast() // end waits for running to reach 0
		last := c.running == 0
		if last && !c.closed {
			if c.goAway {
				c.closed = true
				defer c.cc.Conn.Close() // drained: the read loop ends
			} else {
				c.idle.Reset(c.idleWindow)
			}
		}
		c.mu.Unlock()
	}()
	if status != 0 {
		rw.WriteHeader(status)
		return
	}
	if !c.s.authorizeH2(c, rw, req) { // client_auth headers, basic_auth, forward_auth
		return
	}
	if c.cc.alt != nil {
		rw.Header()["Alt-Svc"] = c.cc.alt
	}
	c.handler.ServeHTTP(rw, req)
}

// idleCheck closes a connection that had no stream for the idle timeout.
func (c *h2Conn) idleCheck() {
	c.mu.Lock()
	if c.running > 0 || c.closed {
		c.mu.Unlock()
		return
	}
	c.goAway, c.closed = true, true
	last := c.lastID
	c.mu.Unlock()
	c.sendGoAway(last, http2.ErrCodeNo)
	c.cc.Conn.Close()
}

// drain sends GOAWAY: streams in flight finish, then the connection
// closes (at once when there are none).
func (c *h2Conn) drain() {
	c.mu.Lock()
	if c.goAway || c.closed {
		c.mu.Unlock()
		return
	}
	c.goAway = true
	last, idle := c.lastID, c.running == 0
	if idle {
		c.closed = true
	}
	c.mu.Unlock()
	c.sendGoAway(last, http2.ErrCodeNo)
	if idle {
		c.cc.Conn.Close()
	}
}

// kill closes the connection at once (drain timeout): its streams'
// upstream requests are canceled.
func (c *h2Conn) kill() {
	c.mu.Lock()
	c.closed = true
	for _, st := range c.streams {
		c.endStreamLocked(st, errH2Closed)
	}
	c.mu.Unlock()
	c.cc.Conn.Close()
}

func (c *h2Conn) goAwayNow(code http2.ErrCode) {
	c.mu.Lock()
	c.goAway = true
	last := c.lastID
	c.mu.Unlock()
	c.sendGoAway(last, code)
	// Out now, not left to a waiting writer: the connection closes next.
	c.wmu.Lock()
	if c.bw != nil && c.werr == nil {
		c.bw.Flush()
	}
	c.wmu.Unlock()
}

func (c *h2Conn) sendGoAway(last uint32, code http2.ErrCode) {
	var p [8]byte
	binary.BigEndian.PutUint32(p[:4], last)
	binary.BigEndian.PutUint32(p[4:], uint32(code))
	c.write(true, func() { c.rawFrame(http2.FrameGoAway, 0, 0, p[:]) })
}

// end runs when the read loop stops: every stream is ended, and the
// connection is released once their goroutines have returned.
func (c *h2Conn) end() {
	c.mu.Lock()
	c.closed = true
	if c.idle != nil {
		c.idle.Stop()
	}
	for _, st := range c.streams {
		c.endStreamLocked(st, errH2Closed)
	}
	c.mu.Unlock()
	c.cc.Conn.Close() // unblocks writers stuck on a client that stopped reading
	c.mu.Lock()
	for c.running > 0 {
		c.cond.Wait()
	}
	c.mu.Unlock()
	c.wmu.Lock()
	if c.bw != nil {
		c.bw.Reset(nil)
		h2Writers.Put(c.bw)
		c.bw = nil
	}
	c.werr = errH2Closed
	c.wmu.Unlock()
	c.s.term().removeH2(c)
	c.tc.Close()
}

// write runs fn, which writes frames, under the write lock. flush: then
// flush, unless another writer is waiting: that one flushes when it is
// done, even if it writes more to come.
func (c *h2Conn) write(flush bool, fn func()) error {
	c.waiting.Add(1)
	c.wmu.Lock()
	c.waiting.Add(-1)
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	if c.bw == nil {
		c.bw = h2Writers.Get().(*bufio.Writer)
		c.bw.Reset(c.dw)
	}
	fn()
	if !flush && !c.owed {
		return nil
	}
	if c.waiting.Load() > 0 {
		c.owed = true // the next writer out flushes
		return nil
	}
	c.owed = false
	{
		if err := c.bw.Flush(); err != nil {
			// A client that stopped reading (or left): every stream
			// and the read loop end with the connection.
			c.werr = err
			c.cc.Conn.Close()
			return err
		}
		c.bw.Reset(nil) // an idle connection holds no write buffer
		h2Writers.Put(c.bw)
		c.bw = nil
	}
	return nil
}

// rawFrame writes a frame to bw (under wmu).
func (c *h2Conn) rawFrame(t http2.FrameType, flags http2.Flags, id uint32, payload ...[]byte) {
	n := 0
	for _, p := range payload {
		n += len(p)
	}
	var h [9]byte
	h[0], h[1], h[2] = byte(n>>16), byte(n>>8), byte(n)
	h[3], h[4] = byte(t), byte(flags)
	binary.BigEndian.PutUint32(h[5:], id&(1<<31-1))
	c.bw.Write(h[:])
	for _, p := range payload {
		c.bw.Write(p)
	}
}

func (c *h2Conn) settings(ss ...http2.Setting) {
	p := make([]byte, 0, 6*len(ss))
	for _, s := range ss {
		p = binary.BigEndian.AppendUint16(p, uint16(s.ID))
		p = binary.BigEndian.AppendUint32(p, s.Val)
	}
	c.rawFrame(http2.FrameSettings, 0, 0, p)
}

func (c *h2Conn) windowUpdate(id, inc uint32) {
	var p [4]byte
	binary.BigEndian.PutUint32(p[:], inc)
	c.rawFrame(http2.FrameWindowUpdate, 0, id, p[:])
}

// headerBlock writes a HEADERS frame (and CONTINUATIONs) for status and
// h (under wmu); status 0: trailers.
func (c *h2Conn) headerBlock(id uint32, status int, h http.Header, end bool) {
	c.hbuf.Reset()
	if status != 0 {
		c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	}
	for k, vv := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			if status != 0 {
				continue
			}
			k = k[len(http.TrailerPrefix):]
		}
		lk := strings.ToLower(k)
		switch lk {
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
			continue // not in h2 (RFC 9113 8.2.2)
		}
		for _, v := range vv {
			c.henc.WriteField(hpack.HeaderField{Name: lk, Value: v})
		}
	}
	block := c.hbuf.Bytes()
	c.mu.Lock()
	max := c.maxFrame
	c.mu.Unlock()
	flags := http2.Flags(0)
	if end {
		flags |= http2.FlagHeadersEndStream
	}
	t := http2.FrameHeaders
	for first := true; first || len(block) > 0; first = false {
		n := min(len(block), max)
		f := flags
		if n == len(block) {
			f |= http2.FlagHeadersEndHeaders
		}
		c.rawFrame(t, f, id, block[:n])
		block = block[n:]
		t, flags = http2.FrameContinuation, 0
	}
}

// streamHeaders writes a header block on st unless st was reset (by
// either side: RFC 9113 6.4, no more frames on it); the check is under
// wmu, so our own RST_STREAM, written under it too, comes after.
func (c *h2Conn) streamHeaders(st *h2StreamState, status int, h http.Header, end, flush bool) error {
	var err error
	werr := c.write(flush, func() {
		c.mu.Lock()
		done, final := st.done, st.final
		if status >= 200 || status == 0 {
			st.final = true
		}
		if !done && end {
			st.sentEnd = true
		}
		c.mu.Unlock()
		if done {
			err = errH2Closed
			return
		}
		if final && status >= 100 && status < 200 {
			return // an interim answer after the final one: dropped (RFC 9110 15.2)
		}
		c.headerBlock(st.id, status, h, end)
	})
	if err == nil {
		err = werr
	}
	return err
}

// h2Body is a request body.
type h2Body struct{ st *h2StreamState }

func (b *h2Body) Read(p []byte) (int, error) {
	st := b.st
	c := st.c
	c.mu.Lock()
	if st.expect {
		st.expect = false
		c.mu.Unlock()
		c.streamHeaders(st, http.StatusContinue, nil, false, true)
		c.mu.Lock()
	}
	for len(st.buf) == 0 && !st.bodyEnd && st.bodyErr == nil {
		c.cond.Wait()
	}
	defer c.mu.Unlock()
	if len(st.buf) > 0 {
		n := copy(p, st.buf)
		if st.buf = st.buf[n:]; len(st.buf) == 0 {
			st.buf = st.buf[:0:0] // let a large upload's buffer go
		}
		c.giveBackLocked(st, int64(n))
		return n, nil
	}
	if st.bodyErr != nil {
		return 0, st.bodyErr
	}
	return 0, io.EOF
}

func (b *h2Body) Close() error {
	st := b.st
	st.c.mu.Lock()
	defer st.c.mu.Unlock()
	if st.bodyErr == nil && !st.bodyEnd {
		st.bodyErr = errors.New("http2: request body closed")
	}
	if n := int64(len(st.buf)); n > 0 {
		st.buf = nil
		st.c.giveBackLocked(nil, n)
	}
	return nil
}

// h2Response is a stream's http.ResponseWriter.
type h2Response struct {
	st     *h2StreamState
	h      http.Header
	status int  // the final status, once written
	sent   bool // its HEADERS frame is out

	n              int64 // body bytes written, for the access log
	result, reason string
}

func (w *h2Response) noteResult(result, reason string) { w.result, w.reason = result, reason }

func (w *h2Response) Header() http.Header { return w.h }

func (w *h2Response) WriteHeader(code int) {
	if w.status != 0 {
		return
	}
	if code >= 100 && code < 200 { // interim: now, with the header as it is
		c := w.st.c
		c.streamHeaders(w.st, code, w.h, false, true)
		return
	}
	w.status = code
}

func (w *h2Response) head(end bool) error {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.sent = true
	return w.st.c.streamHeaders(w.st, w.status, w.h, end, end)
}

func (w *h2Response) Write(p []byte) (int, error) {
	if !w.sent {
		if err := w.head(false); err != nil {
			return 0, err
		}
	}
	if err := w.data(p, false); err != nil {
		return 0, err
	}
	w.n += int64(len(p))
	return len(p), nil
}

// FlushError sends what was written (http.ResponseController.Flush).
func (w *h2Response) FlushError() error {
	if !w.sent {
		if err := w.head(false); err != nil {
			return err
		}
	}
	return w.st.c.write(true, func() {})
}

func (w *h2Response) Flush() { w.FlushError() }

// finish ends the stream after the handler returned: trailers, or END_STREAM.
func (w *h2Response) finish() {
	c := w.st.c
	var trailers http.Header
	for _, name := range w.h.Values("Trailer") {
		for _, k := range strings.Split(name, ",") {
			k = http.CanonicalHeaderKey(strings.TrimSpace(k))
			if vv := w.h[k]; len(vv) > 0 {
				if trailers == nil {
					trailers = http.Header{}
				}
				trailers[k] = vv
			}
		}
	}
	for k, vv := range w.h {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			if trailers == nil {
				trailers = http.Header{}
			}
			trailers[k[len(http.TrailerPrefix):]] = vv
		}
	}
	switch {
	case !w.sent && trailers == nil:
		w.head(true)
	case trailers != nil:
		if !w.sent {
			if w.head(false) != nil {
				return
			}
		}
		c.streamHeaders(w.st, 0, trailers, true, true)
	default:
		w.data(nil, true)
	}
}

// data sends p as DATA frames within the flow-control windows; end sets
// END_STREAM on the last.
func (w *h2Response) data(p []byte, end bool) error {
	st := w.st
	c := st.c
	for {
		c.mu.Lock()
		if len(p) > 0 && !st.done && !c.closed && (c.sendWin <= 0 || st.sendWin <= 0) {
			c.mu.Unlock()
			c.write(true, func() {}) // what is buffered must reach the client for its window to grow
			c.mu.Lock()
			// A client that grants no window for the idle timeout must
			// not hold the stream (and its upstream connection) for ever.
			stalled := false
			var t *time.Timer
			if c.idleWindow > 0 {
				t = time.AfterFunc(c.idleWindow, func() {
					c.mu.Lock()
					stalled = true
					c.cond.Broadcast()
					c.mu.Unlock()
				})
			}
			for !stalled && !st.done && !c.closed && (c.sendWin <= 0 || st.sendWin <= 0) {
				c.cond.Wait()
			}
			if t != nil {
				t.Stop()
			}
			if stalled && !st.done && !c.closed {
				c.s.log.Debug("http2 client granted no flow-control window for limits.idle_timeout", "client", c.remote, "stream", st.id)
				c.resetLocked(st, http2.ErrCodeCancel)
			}
		}
		if st.done || c.closed {
			err := st.bodyErr
			c.mu.Unlock()
			if err == nil || errors.Is(err, context.Canceled) {
				err = errH2Closed
			}
			return err
		}
		n := int64(min(len(p), c.maxFrame))
		n = min(n, c.sendWin, st.sendWin)
		c.sendWin -= n
		st.sendWin -= n
		last := end && int(n) == len(p)
		st.sentEnd = last
		c.mu.Unlock()
		flags := http2.Flags(0)
		if last {
			flags = http2.FlagDataEndStream
		}
		chunk := p[:n]
		if err := c.write(last, func() { c.rawFrame(http2.FrameData, flags, st.id, chunk) }); err != nil {
			return err
		}
		p = p[n:]
		if len(p) == 0 {
			return nil
		}
	}
}

// frameTap passes the client's bytes to the Framer and keeps the header
// of the last frame it began: the Framer's errors do not say which frame
// type they come from.
type frameTap struct {
	r    io.Reader
	c    *h2Conn
	hdr  [9]byte
	hn   int // header bytes of the next frame seen
	left int // payload bytes of the current frame still to come
	typ  http2.FrameType
	err  error // the glitch budget was spent
}

func (t *frameTap) Read(p []byte) (int, error) {
	if t.err != nil {
		return 0, t.err
	}
	n, err := t.r.Read(p)
	for b := p[:n]; len(b) > 0; {
		if t.left > 0 {
			k := min(t.left, len(b))
			t.left -= k
			b = b[k:]
			continue
		}
		k := copy(t.hdr[t.hn:], b)
		t.hn += k
		b = b[k:]
		if t.hn == len(t.hdr) {
			t.hn = 0
			t.left = int(t.hdr[0])<<16 | int(t.hdr[1])<<8 | int(t.hdr[2])
			t.typ = http2.FrameType(t.hdr[3])
			// The Framer gathers a header block's CONTINUATIONs itself:
			// small ones before the last are counted here.
			if t.typ == http2.FrameContinuation && t.left < 1024 && t.hdr[4]&byte(http2.FlagContinuationEndHeaders) == 0 && t.c != nil {
				kind := "continuation"
				if t.left == 0 {
					kind = "empty_frame"
				}
				if t.err = t.c.glitch(kind); t.err != nil {
					return n, t.err // io.ReadFull drops it when n is enough: sticky
				}
			}
		}
	}
	return n, err
}
