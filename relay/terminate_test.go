package relay

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// TestTerminateAccountingOnClose: a keep-alive connection handed to the
// http server stays tracked (routed, so a drain waits for it) and counted
// while idle, and its close releases it and ends its accounting.
func TestTerminateAccountingOnClose(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer upstream.Close()
	r := startRelay(t, baseConfig(config.Route{Match: "acct.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}}))
	active := `relay_active_connections{action="terminate",route="acct.test"}`

	c, err := r.dialTLS(t, "acct.test", r.ca.pool, "http/1.1")
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for i := range 2 {
		fmt.Fprintf(c, "GET /%d HTTP/1.1\r\nHost: acct.test\r\n\r\n", i)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "ok" {
			t.Fatalf("GET %d: %q", i, body)
		}
	}
	if v := metricValue(r.metricsText(t), active); v != 1 {
		t.Errorf("idle keep-alive connection: %s = %v, want 1", active, v)
	}
	r.mu.Lock()
	if len(r.tracked) != 1 {
		t.Errorf("%d tracked connections, want 1", len(r.tracked))
	}
	for _, st := range r.tracked {
		if st != connRouted {
			t.Errorf("keep-alive connection tracked as %d, want routed (%d)", st, connRouted)
		}
	}
	r.mu.Unlock()

	c.Close()
	waitFor(t, func() bool { return r.active.Load() == 0 })
	r.mu.Lock()
	if len(r.tracked) != 0 {
		t.Errorf("%d tracked connections after the close, want 0", len(r.tracked))
	}
	r.mu.Unlock()
	m := r.metricsText(t)
	if v := metricValue(m, active); v != 0 {
		t.Errorf("after the close: %s = %v, want 0", active, v)
	}
	for _, dir := range []string{"upstream", "downstream"} {
		if v := metricValue(m, `relay_bytes_total{direction="`+dir+`",route="acct.test"}`); v <= 0 {
			t.Errorf("relay_bytes_total %s = %v, want > 0", dir, v)
		}
	}
}

// TestTerminateAcceptEncodingIsTheClients: the upstream sees the client's
// Accept-Encoding, not one the relay added, and an encoded response
// reaches the client as the upstream sent it.
func TestTerminateAcceptEncodingIsTheClients(t *testing.T) {
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	io.WriteString(zw, "hello, compressed")
	zw.Close()
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Accept-Encoding", r.Header.Get("Accept-Encoding"))
		if strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
			w.Header().Set("Content-Encoding", "gzip")
			w.Write(zipped.Bytes())
			return
		}
		io.WriteString(w, "hello, plain")
	}))
	defer upstream.Close()
	r := startRelay(t, baseConfig(config.Route{Match: "gz.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}}))
	c, err := r.dialTLS(t, "gz.test", r.ca.pool, "http/1.1")
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for _, tc := range []struct{ accept, wantEncoding, wantBody string }{
		{"", "", "hello, plain"},
		{"gzip", "gzip", zipped.String()},
	} {
		req := "GET / HTTP/1.1\r\nHost: gz.test\r\n"
		if tc.accept != "" {
			req += "Accept-Encoding: " + tc.accept + "\r\n"
		}
		io.WriteString(c, req+"\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if got := resp.Header.Get("X-Seen-Accept-Encoding"); got != tc.accept {
			t.Errorf("client sent Accept-Encoding %q, upstream saw %q", tc.accept, got)
		}
		if got := resp.Header.Get("Content-Encoding"); got != tc.wantEncoding || string(body) != tc.wantBody {
			t.Errorf("Accept-Encoding %q: got Content-Encoding %q, body %q; want %q, %q", tc.accept, got, body, tc.wantEncoding, tc.wantBody)
		}
	}
}

// TestTerminateKeepsUpstreamConnsOfABurst: after a burst of more
// concurrent requests than the old idle limit (32), the next burst reuses
// the upstream connections instead of dialling again.
func TestTerminateKeepsUpstreamConnsOfABurst(t *testing.T) {
	const n = 48
	var mu sync.Mutex
	arrived, dials := 0, 0
	release := make(chan struct{})
	upstream := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if arrived++; arrived == n {
			close(release) // all n are in flight on n upstream connections
		}
		ch := release
		mu.Unlock()
		<-ch
		io.WriteString(w, "ok")
	}))
	upstream.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			mu.Lock()
			dials++
			mu.Unlock()
		}
	}
	upstream.Start()
	defer upstream.Close()
	r := startRelay(t, baseConfig(config.Route{Match: "burst.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}}))
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: r.ca.pool},
		ForceAttemptHTTP2: true, // n streams on one client connection
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer(5*time.Second).DialContext(ctx, "tcp", r.HTTPSAddr().String())
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	burst := func() {
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				resp, err := client.Get("https://burst.test/")
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			})
		}
		wg.Wait()
	}
	burst()
	mu.Lock()
	first := dials
	arrived, release = 0, make(chan struct{})
	mu.Unlock()
	if first != n {
		t.Fatalf("first burst: %d upstream connections, want %d", first, n)
	}
	burst()
	mu.Lock()
	again := dials - first
	mu.Unlock()
	t.Logf("second burst: %d new upstream connections", again)
	// An idle limit below n forces n-limit new dials; a connection the
	// relay has not yet put back into its pool may cost one more.
	if again >= n-32 {
		t.Errorf("second burst dialled %d new upstream connections, want (nearly) none", again)
	}
}
