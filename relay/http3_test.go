package relay

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/relay-gw/relay/internal/config"
)

func TestHTTP3Terminate(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s host=%s xff=%s proto=%s xhost=%s body=%s", r.Method, r.URL.RequestURI(), r.Host,
			r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Forwarded-Host"), body)
	}))
	defer upstream.Close()
	cfg := baseConfig(
		config.Route{Match: "h3.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}},
		config.Route{Match: "noh3.test", H3: boolp(false), Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}})
	r := startRelay(t, cfg)
	relayAddr := r.QUICAddr().String()
	tr := &http3.Transport{
		TLSClientConfig: &tls.Config{RootCAs: r.ca.pool},
		Dial: func(ctx context.Context, _ string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
			return quic.DialAddrEarly(ctx, relayAddr, tc, qc)
		},
	}
	defer tr.Close()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}

	req, _ := http.NewRequest("GET", "https://h3.test/get?x=1", nil)
	req.Header.Set("X-Forwarded-For", "6.6.6.6") // replaced: not trusted at the edge
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 3 || string(body) != "GET /get?x=1 host=h3.test xff=127.0.0.1 proto=https xhost=h3.test body=" {
		t.Fatalf("GET: %s %q", resp.Proto, body)
	}
	resp, err = client.Post("https://h3.test/post", "text/plain", strings.NewReader(strings.Repeat("p", 100000)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := "POST /post host=h3.test xff=127.0.0.1 proto=https xhost=h3.test body=" + strings.Repeat("p", 100000); string(body) != want {
		t.Fatalf("POST: %d bytes %.80q", len(body), body)
	}

	// h3: false: no QUIC for that name, and no Alt-Svc on TCP.
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	_, err = quic.DialAddr(ctx, relayAddr, &tls.Config{ServerName: "noh3.test", RootCAs: r.ca.pool, NextProtos: []string{"h3"}}, nil)
	cancel()
	if err == nil {
		t.Fatal("noh3.test: QUIC connection through the relay")
	}

	// Alt-Svc on the TCP answers of h3 routes, with the port the client used.
	port := r.HTTPSAddr().(*net.TCPAddr).Port
	for name, want := range map[string]string{"h3.test": fmt.Sprintf(`h3=":%d"; ma=86400`, port), "noh3.test": ""} {
		for _, h2 := range []bool{false, true} {
			tt := &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: r.ca.pool, ServerName: name},
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, "tcp", r.HTTPSAddr().String())
				},
				ForceAttemptHTTP2: h2,
			}
			if !h2 {
				tt.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
			}
			resp, err := (&http.Client{Transport: tt, Timeout: 10 * time.Second}).Get("https://" + name + "/")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			tt.CloseIdleConnections()
			if got := resp.Header.Get("Alt-Svc"); got != want || (resp.ProtoMajor == 2) != h2 {
				t.Errorf("%s over %s: Alt-Svc %q, want %q", name, resp.Proto, got, want)
			}
		}
	}
	m := r.metricsText(t)
	if v := metricValue(m, `relay_quic_connections_total{action="terminate",route="h3.test"}`); v != 1 {
		t.Errorf("quic terminate connections %v", v)
	}
}

// TestQUICAccessDenied: a route's deny applies to QUIC flows too.
func TestQUICAccessDenied(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer upstream.Close()
	r := startRelay(t, baseConfig(config.Route{Match: "deny.test", Deny: []string{"127.0.0.0/8"},
		Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}}))
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if _, err := quic.DialAddr(ctx, r.QUICAddr().String(), &tls.Config{ServerName: "deny.test", RootCAs: r.ca.pool, NextProtos: []string{"h3"}}, nil); err == nil {
		t.Fatal("denied client got a QUIC connection")
	}
	m := r.metricsText(t)
	if v := metricValue(m, `relay_access_denied_total{reason="deny",route="deny.test"}`); v != 1 {
		t.Errorf("access denied counter %v", v)
	}
	if v := metricValue(m, `relay_quic_connections_total{action="reject",route="deny.test"}`); v != 1 {
		t.Errorf("quic reject counter %v", v)
	}
}
