package relay

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// isReset matches RST_STREAM code on stream id.
func isReset(id uint32, code http2.ErrCode) func(http2.Frame) bool {
	return func(f http2.Frame) bool {
		rst, ok := f.(*http2.RSTStreamFrame)
		return ok && rst.StreamID == id && rst.ErrCode == code
	}
}

// TestH2FramerStreamErrorOpensTheStream: a HEADERS frame the Framer
// rejects with a stream error (an upper-case field name) still opened its
// stream: the client's DATA on it, sent before it saw the reset, is
// ignored, not a connection error on an "idle" stream.
func TestH2FramerStreamErrorOpensTheStream(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t))
	h := dialH2Raw(t, r)
	h.headers(1, false, ":method", "POST", ":path", "/sha", "X-Upper", "1")
	h.fr.WriteData(1, true, []byte("body"))
	h.until("RST_STREAM PROTOCOL_ERROR", isReset(1, http2.ErrCodeProtocol))
	h.headers(3, true)
	if status, _ := h.expectAnswer(3); status != "200" {
		t.Fatalf("after a stream error: %s", status)
	}
}

// TestH2ResetOnDataKeepsTheConnectionWindow: DATA that resets its stream
// (beyond its content-length) gives its bytes back to the connection's
// window: after more than a window's worth of them, an upload still goes.
func TestH2ResetOnDataKeepsTheConnectionWindow(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t))
	h := dialH2Raw(t, r)
	chunk := make([]byte, 16000)
	id := uint32(1)
	for sent := 0; sent < 2*h2ConnWindow; sent += len(chunk) {
		h.headers(id, false, ":method", "POST", ":path", "/sha", "content-length", "1")
		h.fr.WriteData(id, false, chunk)
		h.until("RST_STREAM PROTOCOL_ERROR", isReset(id, http2.ErrCodeProtocol))
		id += 2
	}
	h.headers(id, false, ":method", "POST", ":path", "/sha", "content-length", "100")
	h.fr.WriteData(id, true, make([]byte, 100))
	if status, _ := h.expectAnswer(id); status != "200" {
		t.Fatalf("upload after resets: %s", status)
	}
}

// TestH2TrailersCheckContentLength: trailers that end a body shorter than
// its content-length reset the stream (PROTOCOL_ERROR); the upstream never
// sees the request complete.
func TestH2TrailersCheckContentLength(t *testing.T) {
	var mu sync.Mutex
	got := 0
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err == nil {
			mu.Lock()
			got++
			mu.Unlock()
		}
	}))
	defer up.Close()
	r, _ := h1Relay(t, up.URL)
	h := dialH2Raw(t, r)
	h.headers(1, false, ":method", "POST", ":path", "/", "content-length", "10")
	h.fr.WriteData(1, false, []byte("abc"))
	h.hbuf.Reset()
	h.enc.WriteField(hpack.HeaderField{Name: "x-trailer", Value: "1"})
	h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: h.hbuf.Bytes(), EndStream: true, EndHeaders: true})
	h.until("RST_STREAM PROTOCOL_ERROR", isReset(1, http2.ErrCodeProtocol))
	mu.Lock()
	defer mu.Unlock()
	if got != 0 {
		t.Fatalf("upstream read %d complete bodies, want 0", got)
	}
}

// TestH2ResetPostReleasesUpstream: a POST whose body went out whole and
// whose client then resets the stream does not hold the upstream
// connection until the upstream answers.
func TestH2ResetPostReleasesUpstream(t *testing.T) {
	gone := make(chan struct{}, 1)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.ReadAll(r.Body)
		select {
		case <-r.Context().Done(): // the relay closed its connection
			gone <- struct{}{}
		case <-release:
		}
	}))
	defer up.Close()
	defer close(release) // before up.Close
	r, _ := h1Relay(t, up.URL)
	h := dialH2Raw(t, r)
	h.headers(1, false, ":method", "POST", ":path", "/", "content-length", "4")
	h.fr.WriteData(1, true, []byte("body"))
	time.Sleep(200 * time.Millisecond) // the upstream has the request
	h.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	select {
	case <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("upstream request still held 5s after the client reset the stream")
	}
}

// TestH2NoContinueAfterFinalHeaders: a handler that answers before it
// reads an Expect: 100-continue body sends no 100 after its final HEADERS.
func TestH2NoContinueAfterFinalHeaders(t *testing.T) {
	srv, cli := net.Pipe()
	defer srv.Close()
	defer cli.Close()
	c := &h2Conn{dw: deadlineWriter{srv, 5 * time.Second}, cc: &termConn{Conn: srv}, streams: map[uint32]*h2StreamState{}, maxFrame: 16384}
	c.cond = sync.NewCond(&c.mu)
	c.henc = hpack.NewEncoder(&c.hbuf)
	st := &h2StreamState{c: c, id: 1, expect: true, bodyEnd: true}
	c.streams[1] = st
	var frames bytes.Buffer
	read := make(chan struct{})
	go func() { io.Copy(&frames, cli); close(read) }()
	rw := &h2Response{st: st, h: http.Header{}}
	rw.WriteHeader(http.StatusRequestEntityTooLarge)
	rw.FlushError()
	io.ReadAll(&h2Body{st: st})
	srv.Close()
	<-read
	fr := http2.NewFramer(nil, &frames)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var statuses []string
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		if mh, ok := f.(*http2.MetaHeadersFrame); ok {
			statuses = append(statuses, mh.PseudoValue("status"))
		}
	}
	if len(statuses) != 1 || statuses[0] != "413" {
		t.Fatalf("statuses sent %v, want [413]", statuses)
	}
}
