package relay

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

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
