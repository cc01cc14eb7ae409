package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// rawHTTPUpstream serves each connection with h, which gets every request read.
func rawHTTPUpstream(t *testing.T, h func(conn int, c net.Conn, req *http.Request) bool) string {
	var nconn atomic.Int32
	return rawUpstream(t, func(c *net.TCPConn) {
		id := int(nconn.Add(1))
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			if !h(id, c, req) {
				return
			}
		}
	})
}

// TestH1POSTNotRetried: a POST is not sent again when the upstream drops
// the pooled connection after receiving it (it may have acted on it):
// the client gets a 502, as from net/http's Transport.
func TestH1POSTNotRetried(t *testing.T) {
	var posts atomic.Int32
	addr := rawHTTPUpstream(t, func(conn int, c net.Conn, req *http.Request) bool {
		if req.Method == "POST" {
			posts.Add(1)
			if conn == 1 {
				return false // processed, then the upstream crashes / closes
			}
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		return true
	})
	_, dial := h1Relay(t, "http://"+addr)
	c, br := dial()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	readResp(t, br, "GET")
	io.WriteString(c, "POST /charge HTTP/1.1\r\nHost: h1.test\r\nContent-Length: 0\r\n\r\n")
	if resp, _ := readResp(t, br, "POST"); resp.StatusCode != 502 {
		t.Errorf("client got %d, want 502", resp.StatusCode)
	}
	if n := posts.Load(); n != 1 {
		t.Errorf("upstream received the POST %d times, want 1", n)
	}
}

// TestH1LeftoverBytesNotReused: bytes an upstream sent after a response
// (a HEAD answered with a body) make its connection unusable: another
// client must not get them as its response, however fresh the connection.
func TestH1LeftoverBytesNotReused(t *testing.T) {
	addr := rawHTTPUpstream(t, func(conn int, c net.Conn, req *http.Request) bool {
		if req.Method == "HEAD" {
			inner := "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(inner), inner)
			return true
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
		return true
	})
	_, dial := h1Relay(t, "http://"+addr)
	a, abr := dial()
	b, bbr := dial()
	io.WriteString(a, "HEAD / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	readResp(t, abr, "HEAD")
	io.WriteString(b, "GET /private HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	_, body := readResp(t, bbr, "GET")
	if body != "real" {
		t.Errorf("client B got %q, want %q", body, "real")
	}
}

// TestH1EarlyResponse: an upstream that answers 413 without reading a
// large upload: the client sees the 413 (not a 502), and it is no
// upstream error.
func TestH1EarlyResponse(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusRequestEntityTooLarge)
	}))
	defer up.Close()
	r, dial := h1Relay(t, up.URL)
	c, br := dial()
	const size = 16 << 20
	go func() {
		fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: h1.test\r\nContent-Length: %d\r\n\r\n", size)
		buf := make([]byte, 64<<10)
		for n := 0; n < size; n += len(buf) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no response: %v", err)
	}
	if resp.StatusCode != 413 {
		t.Errorf("client got %d, want the upstream's 413", resp.StatusCode)
	}
	if m := r.metricsText(t); strings.Contains(m, `relay_upstream_errors_total{`) {
		t.Errorf("an early answer counted as an upstream error:\n%s", grep(m, "relay_upstream_errors_total"))
	}
}

// TestH1ClientGoneLongPoll: a client that leaves while the upstream is
// still working (long poll) ends the upstream request and its own
// accounting, as net/http's server did with its background read.
func TestH1ClientGoneLongPoll(t *testing.T) {
	upURL, arrived, canceled := longPollUpstream(t)
	r, dial := h1Relay(t, upURL)
	c, _ := dial()
	io.WriteString(c, "GET /poll HTTP/1.1\r\nHost: h1.test\r\n\r\n")
	<-arrived
	c.Close()
	select {
	case <-canceled:
	case <-time.After(3 * time.Second):
		t.Errorf("upstream request still open 3 s after the client left; active=%d", r.active.Load())
	}
	waitFor(t, func() bool { return r.active.Load() == 0 })
}

// TestH2ResetBeforeHead: the same over h2, a stream reset before the
// response head arrives.
func TestH2ResetBeforeHead(t *testing.T) {
	upURL, arrived, canceled := longPollUpstream(t)
	r, _ := h1Relay(t, upURL)
	tr := h2Transport(r)
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://h1.test/poll", nil)
	go func() { <-arrived; cancel() }()
	if _, err := (&http.Client{Transport: tr}).Do(req); err == nil {
		t.Error("the canceled request succeeded")
	}
	select {
	case <-canceled:
	case <-time.After(3 * time.Second):
		t.Errorf("upstream request still open 3 s after the h2 stream was reset")
	}
}

// TestH2EarlyHints: a 103 reaches the h2 client, and its headers do not
// stay in the final response.
func TestH2EarlyHints(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(103)
		w.Header().Del("Link")
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	r, _ := h1Relay(t, up.URL)
	tr := h2Transport(r)
	defer tr.CloseIdleConnections()
	var got103 atomic.Bool
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		Got1xxResponse: func(code int, h textproto.MIMEHeader) error { got103.Store(true); return nil },
	})
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://h1.test/", nil)
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if l := resp.Header.Get("Link"); l != "" || !got103.Load() {
		t.Errorf("final %s response carries the 103's Link header %q (103 seen: %v)", resp.Proto, l, got103.Load())
	}
}

// TestH1BadHost: a malformed Host is refused with 400 (as net/http's
// server did), not sent on or counted as an upstream error.
func TestH1BadHost(t *testing.T) {
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	dials := countConns(up)
	up.Start()
	defer up.Close()
	r, dial := h1Relay(t, up.URL)
	c, br := dial()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
	if resp, _ := readResp(t, br, "GET"); resp.StatusCode != 400 {
		t.Errorf("bad Host: %d, want 400", resp.StatusCode)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("%d upstream connections for a refused request", n)
	}
	if m := r.metricsText(t); strings.Contains(m, `relay_upstream_errors_total{`) {
		t.Errorf("a bad request counted as an upstream error:\n%s", grep(m, "relay_upstream_errors_total"))
	}
}

func h2Transport(r *testRelay) *http.Transport {
	return &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: r.ca.pool},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer(5*time.Second).DialContext(ctx, "tcp", r.HTTPSAddr().String())
		},
	}
}

// TestH1ParkDrainStress: clients send around the park boundary (1 s)
// while the relay drains: every connection is released.
func TestH1ParkDrainStress(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer up.Close()
	for round := range 3 {
		r, dial := h1Relay(t, up.URL)
		const n = 60
		stop := make(chan struct{})
		done := make(chan struct{}, n)
		for i := range n {
			c, br := dial()
			go func() {
				defer func() { done <- struct{}{} }()
				for k := 0; ; k++ {
					c.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n"); err != nil {
						return
					}
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						return
					}
					io.Copy(io.Discard, resp.Body)
					select {
					case <-stop:
						return
					case <-time.After(time.Second - 20*time.Millisecond + time.Duration((i*7+k*13)%40)*time.Millisecond):
					}
				}
			}()
		}
		time.Sleep(2*time.Second + time.Duration(round)*333*time.Millisecond)
		r.stopWithin(t, 10*time.Second)
		close(stop)
		for range n {
			<-done
		}
		if a := r.active.Load(); a != 0 {
			t.Errorf("round %d: %d connections still counted active", round, a)
		}
		if p := len(r.term().h1); p != 0 {
			t.Errorf("round %d: %d h1 conns left in termServer", round, p)
		}
	}
}

// longPollUpstream holds each request for up to 6 s, reporting when one
// arrives and when its client (the relay) went away.
func longPollUpstream(t *testing.T) (url string, arrived, canceled <-chan struct{}) {
	a, c := make(chan struct{}, 1), make(chan struct{}, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a <- struct{}{}
		select {
		case <-r.Context().Done():
			c <- struct{}{}
		case <-time.After(6 * time.Second):
		}
	}))
	t.Cleanup(up.Close)
	return up.URL, a, c
}

// TestUpstreamStalledUpload: an upstream that reads a request's head but
// neither its body nor answers is given up after limits.idle_timeout: the
// client gets a 504 (over HTTP/1.1 and h2), counted as an upstream
// timeout, instead of a request held open forever.
func TestUpstreamStalledUpload(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	addr := rawUpstream(t, func(c *net.TCPConn) {
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			<-release // holds the connection, reads nothing more
		}
	})
	r, dial := h1Relay(t, "http://"+addr, func(c *config.Config) { c.Limits.IdleTimeout = config.Duration(time.Second) })
	// Enough to fill every buffer between the client and the upstream.
	const size = 256 << 20
	upload := func(w io.Writer) {
		buf := make([]byte, 64<<10)
		for n := 0; n < size; n += len(buf) {
			if _, err := w.Write(buf); err != nil {
				return
			}
		}
	}

	t.Run("h1", func(t *testing.T) {
		c, br := dial()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		go func() {
			fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: h1.test\r\nContent-Length: %d\r\n\r\n", size)
			upload(c)
		}()
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("no response: %v", err)
		}
		if resp.StatusCode != http.StatusGatewayTimeout {
			t.Errorf("client got %d, want 504", resp.StatusCode)
		}
	})
	t.Run("h2", func(t *testing.T) {
		client := &http.Client{Transport: h2Transport(r), Timeout: 30 * time.Second}
		pr, pw := io.Pipe()
		go func() { upload(pw); pw.Close() }()
		defer pr.Close()
		req, _ := http.NewRequest("POST", "https://h1.test/upload", pr)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("no response: %v", err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusGatewayTimeout {
			t.Errorf("client got %s %d, want HTTP/2 504", resp.Proto, resp.StatusCode)
		}
	})
	if v := metricValue(r.metricsText(t), `relay_upstream_errors_total{reason="timeout",route="h1.test"}`); v != 2 {
		t.Errorf("upstream timeouts counted %v, want 2", v)
	}
}
