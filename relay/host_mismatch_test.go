package relay

import (
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// TestHostMismatch: a request whose Host (h2: :authority) names another
// route than the connection's SNI chose is answered 421 and counted, and
// the upstream sees nothing; the SNI's own name (with a port) and other
// names of the same route still go.
func TestHostMismatch(t *testing.T) {
	up := &countingUpstream{}
	upURL := up.start(t)
	r, dial := h1Relay(t, upURL, func(cfg *config.Config) {
		cfg.Routes = append(cfg.Routes, config.Route{Match: "other.test", Terminate: &config.Terminate{Upstream: upURL, TLS: config.TLS{Mode: "internal"}}})
	})
	cases := []struct {
		host string
		want int
	}{
		{"h1.test", 200},
		{"H1.test:443", 200},
		{"h1.test.", 200},
		{"other.test", 421},
		{"other.test:443", 421},
		{"nowhere.test", 421},
	}
	for _, c := range cases {
		conn, br := dial()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(conn, "GET / HTTP/1.1\r\nHost: "+c.host+"\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("Host %s: no answer: %v", c.host, err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("h1 Host %s: status %d, want %d", c.host, resp.StatusCode, c.want)
		}
	}
	for _, c := range cases {
		h := dialH2Raw(t, r)
		h.headers(1, true, ":authority", c.host, ":path", "/")
		if status, _ := h.expectAnswer(1); status != strconv.Itoa(c.want) {
			t.Errorf("h2 :authority %s: status %s, want %d", c.host, status, c.want)
		}
	}
	time.Sleep(50 * time.Millisecond) // a request on its way to the upstream arrives
	if n, _ := up.seen(); n != 6 {
		t.Errorf("upstream saw %d requests, want 6 (3 h1, 3 h2)", n)
	}
	if v := metricValue(r.metricsText(t), `relay_http_bad_requests_total{reason="host_mismatch",route="h1.test"}`); v != 6 {
		t.Errorf(`relay_http_bad_requests_total{reason="host_mismatch"} = %v, want 6`, v)
	}
}
