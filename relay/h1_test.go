package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// h1Relay starts a relay with one terminate route to upstream and returns
// a function dialling it as an HTTP/1.1 client.
func h1Relay(t testing.TB, upstream string, mod ...func(*config.Config)) (*testRelay, func() (*tls.Conn, *bufio.Reader)) {
	t.Helper()
	cfg := baseConfig(config.Route{Match: "h1.test", Terminate: &config.Terminate{Upstream: upstream, TLS: config.TLS{Mode: "internal"}}})
	for _, m := range mod {
		m(cfg)
	}
	r := startRelay(t, cfg)
	return r, func() (*tls.Conn, *bufio.Reader) {
		t.Helper()
		c, err := r.dialTLS(t, "h1.test", r.ca.pool, "http/1.1")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
}

func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%s response: %v", method, err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s body: %v", method, err)
	}
	return resp, string(b)
}

// countConns counts the upstream's accepted connections.
func countConns(s *httptest.Server) *atomic.Int32 {
	var n atomic.Int32
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			n.Add(1)
		}
	}
	return &n
}

// TestH1KeepAliveAndPipelining: requests sent back to back on one client
// connection are answered in order over one reused upstream connection;
// HEAD, 204 and 304 answers carry no body and keep the connection usable.
func TestH1KeepAliveAndPipelining(t *testing.T) {
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(204)
		case "/304":
			w.WriteHeader(304)
		default:
			w.Header().Set("Content-Length", "8")
			io.WriteString(w, r.URL.Path+strings.Repeat(".", 8-len(r.URL.Path)))
		}
	}))
	dials := countConns(up)
	up.Start()
	defer up.Close()
	_, dial := h1Relay(t, up.URL)
	c, br := dial()
	io.WriteString(c, "GET /a HTTP/1.1\r\nHost: h1.test\r\n\r\nGET /b HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	for _, want := range []string{"/a......", "/b......"} {
		if _, body := readResp(t, br, "GET"); body != want {
			t.Fatalf("pipelined body %q, want %q", body, want)
		}
	}
	for _, rq := range []struct {
		method, path string
		code         int
	}{{"HEAD", "/h", 200}, {"GET", "/204", 204}, {"GET", "/304", 304}, {"GET", "/c", 200}} {
		fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: h1.test\r\n\r\n", rq.method, rq.path)
		resp, body := readResp(t, br, rq.method)
		if resp.StatusCode != rq.code || (rq.path != "/c" && body != "") || (rq.path == "/c" && body != "/c......") {
			t.Fatalf("%s %s: %d %q", rq.method, rq.path, resp.StatusCode, body)
		}
		if rq.method == "HEAD" && resp.ContentLength != 8 {
			t.Errorf("HEAD Content-Length %d, want the upstream's 8", resp.ContentLength)
		}
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("%d upstream connections for 6 requests, want 1", n)
	}
}

// TestH1Bodies: a chunked upload with Expect: 100-continue reaches the
// upstream whole; a response streamed in chunks reaches the client as it
// comes (not when a buffer fills) with its trailer; an HTTP/1.0 client
// gets a response without length ended by the close.
func TestH1Bodies(t *testing.T) {
	upURL, goOn := bodiesUpstream(t, nil)
	_, dial := h1Relay(t, upURL)
	c, br := dial()

	data := payload()
	io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
	cont, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(cont, "HTTP/1.1 100") {
		t.Fatalf("want 100 Continue before the body, got %q %v", cont, err)
	}
	br.ReadString('\n')
	cw := bufio.NewWriter(c)
	for off := 0; off < len(data); off += 100000 {
		chunk := data[off:min(off+100000, len(data))]
		fmt.Fprintf(cw, "%x\r\n%s\r\n", len(chunk), chunk)
	}
	cw.WriteString("0\r\n\r\n")
	cw.Flush()
	if _, body := readResp(t, br, "POST"); body != uploadAnswer(data)+" " {
		t.Fatalf("upload arrived as %q", body)
	}

	io.WriteString(c, "GET /stream HTTP/1.1\r\nHost: h1.test\r\nTE: trailers\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkStream(t, resp, goOn)

	c10, br10 := dial()
	io.WriteString(c10, "GET /upload HTTP/1.0\r\nHost: h1.test\r\n\r\n")
	resp, body := readResp(t, br10, "GET")
	if resp.StatusCode != 200 || !strings.HasPrefix(body, "0 ") {
		t.Fatalf("HTTP/1.0: %d %q", resp.StatusCode, body)
	}
	if _, err := br10.ReadByte(); err != io.EOF {
		t.Errorf("HTTP/1.0 without keep-alive: connection still open (%v)", err)
	}
}

// TestH1UpstreamClosesIdle: an upstream that closes its idle keep-alive
// connections costs the client nothing: the relay does not reuse a closed
// one (or sends a bodiless request again on a new one).
func TestH1UpstreamClosesIdle(t *testing.T) {
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	up.Config.IdleTimeout = 50 * time.Millisecond
	dials := countConns(up)
	up.Start()
	defer up.Close()
	_, dial := h1Relay(t, up.URL)
	c, br := dial()
	for i := range 3 {
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
		if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if n := dials.Load(); n != 3 {
		t.Errorf("%d upstream connections, want 3 (each closed by the upstream while idle)", n)
	}
}

// TestH1Errors: an unreachable upstream gets 502 (counted) and the
// connection goes on; malformed and oversized requests get 400 and 431
// and the connection is closed.
func TestH1Errors(t *testing.T) {
	ln := listenLoopback(t)
	dead := ln.Addr().String()
	ln.Close()
	r, dial := h1Relay(t, "http://"+dead)
	c, br := dial()
	for range 2 {
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
		if resp, _ := readResp(t, br, "GET"); resp.StatusCode != 502 {
			t.Fatalf("unreachable upstream: %d, want 502", resp.StatusCode)
		}
	}
	if v := metricValue(r.metricsText(t), `relay_upstream_errors_total{reason="refused",route="h1.test"}`); v != 2 {
		t.Errorf("upstream errors (refused) = %v, want 2", v)
	}
	for _, tc := range []struct {
		req  string
		code int
	}{
		{"NONSENSE\r\n\r\n", 400},
		{"GET / HTTP/1.1\r\n\r\n", 400}, // no Host
		{"GET / HTTP/1.1\r\nHost: h1.test\r\nX-Big: " + strings.Repeat("x", 1<<20+8<<10) + "\r\n\r\n", 431},
		{"GET / HTTP/1.1\r\nHost: h1.test\r\nExpect: magic\r\n\r\n", 417},
		{"POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: gzip\r\n\r\n", 400}, // smuggling, not net/http's 501
	} {
		c, br := dial()
		go io.WriteString(c, tc.req) // an oversized head is not read to its end
		resp, _ := readResp(t, br, "GET")
		if resp.StatusCode != tc.code {
			t.Errorf("%.30q: %d, want %d", tc.req, resp.StatusCode, tc.code)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("%.30q: connection still open (%v)", tc.req, err)
		}
	}
}

// TestH1DrainClosesIdleFinishesActive: on shutdown an idle keep-alive
// connection is closed at once, and a request in flight gets its whole
// response, marked Connection: close.
func TestH1DrainClosesIdleFinishesActive(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			once.Do(func() { close(arrived) })
			<-release
		}
		io.WriteString(w, "done")
	}))
	defer up.Close()
	defer close(release)
	r, dial := h1Relay(t, up.URL)
	idle, idleBR := dial()
	io.WriteString(idle, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	readResp(t, idleBR, "GET")
	busy, busyBR := dial()
	io.WriteString(busy, "GET /slow HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	<-arrived
	r.cancel()
	idle.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := idleBR.ReadByte(); err != io.EOF {
		t.Errorf("idle keep-alive connection not closed by the drain: %v", err)
	}
	release <- struct{}{}
	resp, body := readResp(t, busyBR, "GET")
	if body != "done" || !resp.Close {
		t.Errorf("request in flight during the drain: %q, close=%v", body, resp.Close)
	}
	if err := <-r.done; err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatal(err)
	}
	r.done <- nil
}

// TestH1HTTPSUpstream: an https:// upstream verified with upstream_ca.
func TestH1HTTPSUpstream(t *testing.T) {
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Header.Get("X-Forwarded-Proto"))
	}))
	defer up.Close()
	caFile := t.TempDir() + "/ca.pem"
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: up.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	_, dial := h1Relay(t, up.URL, func(c *config.Config) { c.Routes[0].Terminate.UpstreamCA = caFile })
	c, br := dial()
	for range 2 {
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
		if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != "https" {
			t.Fatalf("https upstream: %d %q", resp.StatusCode, body)
		}
	}
}

// TestH2Streams: h2 streams go through the same upstream pool: a body
// uploaded without length, a streamed response with its trailer, and a
// stream the client resets closes its upstream request.
func TestH2Streams(t *testing.T) {
	gone := make(chan struct{})
	upURL, goOn := bodiesUpstream(t, func(w http.ResponseWriter, r *http.Request) { // /hang
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		<-r.Context().Done() // the relay closed the upstream connection
		close(gone)
	})
	r, _ := h1Relay(t, upURL)
	tr := h2Transport(r)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}

	data := payload()
	resp, err := client.Post("https://h1.test/upload", "application/octet-stream", io.MultiReader(bytes.NewReader(data))) // no length
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 || string(b) != uploadAnswer(data)+" " {
		t.Fatalf("upload over %s arrived as %q", resp.Proto, b)
	}

	resp, err = client.Get("https://h1.test/stream")
	if err != nil {
		t.Fatal(err)
	}
	checkStream(t, resp, goOn)
	resp.Body.Close()

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://h1.test/hang", nil)
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	cancel() // resets the stream
	resp.Body.Close()
	select {
	case <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("upstream request still open after the client reset its stream")
	}
}

// parkedH1 counts the proxy loop's connections parked in the engine.
func parkedH1(r *testRelay) int {
	ts := r.term()
	ts.mu.Lock()
	defer ts.mu.Unlock()
	n := 0
	for h := range ts.h1 {
		if h.state.Load() == h1Parked {
			n++
		}
	}
	return n
}

// TestH1ParksQuietConnection: a keep-alive connection quiet for parkAfter
// is parked without a goroutine and served again when the client sends;
// a parked connection is closed by the idle timeout and by a drain.
func TestH1ParksQuietConnection(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.URL.Path) }))
	defer up.Close()
	r, dial := h1Relay(t, up.URL, func(c *config.Config) { c.Limits.IdleTimeout = config.Duration(4 * time.Second) })
	get := func(c *tls.Conn, br *bufio.Reader, path string) {
		t.Helper()
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: h1.test\r\n\r\n", path)
		if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != path {
			t.Fatalf("GET %s: %d %q", path, resp.StatusCode, body)
		}
	}
	c1, br1 := dial()
	c2, br2 := dial()
	get(c1, br1, "/1")
	get(c2, br2, "/2")
	waitFor(t, func() bool { return parkedH1(r) == 2 })
	get(c1, br1, "/again") // woken by the engine
	get(c1, br1, "/and-again")
	waitFor(t, func() bool { return parkedH1(r) == 2 })

	// Nothing more on c2: the idle timeout (4 s) closes it while parked.
	// c1 is used meanwhile, so that its own idle timeout (checked at 1 s
	// granularity) cannot come due at the same moment.
	c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	eof := make(chan error, 1)
	go func() { _, err := br2.ReadByte(); eof <- err }()
	for waiting := true; waiting; {
		select {
		case err := <-eof:
			if err != io.EOF {
				t.Errorf("parked connection past the idle timeout: %v, want EOF", err)
			}
			waiting = false
		case <-time.After(1500 * time.Millisecond):
			get(c1, br1, "/meanwhile")
		}
	}
	// c1 was used since: still open. A drain closes it at once.
	get(c1, br1, "/before-drain")
	waitFor(t, func() bool { return parkedH1(r) == 1 })
	r.cancel()
	c1.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := br1.ReadByte(); err != io.EOF {
		t.Errorf("parked connection not closed by the drain: %v", err)
	}
	if err := <-r.done; err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatal(err)
	}
	r.done <- nil
	if n := r.active.Load(); n != 0 {
		t.Errorf("%d connections still counted active after the drain", n)
	}
}

// bodiesUpstream answers /upload with the body's length and sha256 (and
// the Expect header it got) and streams /stream in two parts with a
// trailer, the second once goOn is called; other paths go to other.
func bodiesUpstream(t *testing.T, other http.HandlerFunc) (url string, goOn func()) {
	next := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/upload":
			h := sha256.New()
			n, _ := io.Copy(h, r.Body)
			fmt.Fprintf(w, "%d %x %s", n, h.Sum(nil), r.Header.Get("Expect"))
		case "/stream":
			w.Header().Set("Trailer", "X-Sum")
			io.WriteString(w, "first")
			w.(http.Flusher).Flush()
			<-next
			io.WriteString(w, "second")
			w.Header().Set("X-Sum", "42")
		default:
			other(w, r)
		}
	}))
	t.Cleanup(up.Close)
	var once sync.Once
	goOn = func() { once.Do(func() { close(next) }) }
	t.Cleanup(goOn) // runs before up.Close, which waits for the handler
	return up.URL, goOn
}

// payload is 1 MiB + 7 bytes of a pattern that shows misplaced bytes.
func payload() []byte {
	data := make([]byte, 1<<20+7)
	for i := range data {
		data[i] = byte(i * 7)
	}
	return data
}

// uploadAnswer is bodiesUpstream's answer to data, without the Expect part.
func uploadAnswer(data []byte) string {
	sum := sha256.Sum256(data)
	return fmt.Sprintf("%d %s", len(data), hex.EncodeToString(sum[:]))
}

// checkStream reads bodiesUpstream's /stream: the first part must arrive
// before the upstream goes on, the second and the trailer after.
func checkStream(t *testing.T, resp *http.Response, goOn func()) {
	t.Helper()
	first := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "first" {
		t.Fatalf("streamed part before the upstream goes on: %q %v", first, err)
	}
	goOn()
	rest, _ := io.ReadAll(resp.Body)
	if string(rest) != "second" || resp.Trailer.Get("X-Sum") != "42" {
		t.Fatalf("rest %q, trailer %v", rest, resp.Trailer)
	}
}

// TestReloadClosesIdleUpstreams: a reload gives terminate routes new
// upstream pools; the idle connections of the old ones are closed then,
// not left open to the upstream until their idle timeout. Both pools: the
// relay's own, and net/http's for an upstream URL with a path.
func TestReloadClosesIdleUpstreams(t *testing.T) {
	for _, path := range []string{"", "/base"} {
		t.Run("path="+path, func(t *testing.T) {
			var closed atomic.Int32
			up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
			up.Config.ConnState = func(_ net.Conn, st http.ConnState) {
				if st == http.StateClosed {
					closed.Add(1)
				}
			}
			up.Start()
			defer up.Close()
			r, dial := h1Relay(t, up.URL+path)
			c, br := dial()
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
			if resp, body := readResp(t, br, "GET"); resp.StatusCode != 200 || body != "ok" {
				t.Fatalf("GET: %d %q", resp.StatusCode, body)
			}
			c.Close()
			time.Sleep(200 * time.Millisecond)
			if n := closed.Load(); n != 0 {
				t.Fatalf("%d upstream connections closed before the reload, want 0 (pooled)", n)
			}
			cfg := baseConfig(config.Route{Match: "h1.test", Terminate: &config.Terminate{Upstream: up.URL + path, TLS: config.TLS{Mode: "internal"}}})
			if err := r.Reload(cfg); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(5 * time.Second); closed.Load() == 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the old pool's idle upstream connection is still open 5 s after the reload")
				}
			}
			c2, br2 := dial()
			io.WriteString(c2, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
			if resp, body := readResp(t, br2, "GET"); resp.StatusCode != 200 || body != "ok" {
				t.Fatalf("GET after the reload: %d %q", resp.StatusCode, body)
			}
		})
	}
}
