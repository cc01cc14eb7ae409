package relay

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// fromDialer dials from a given local address (127.0.0.2, ::1, ...).
func fromDialer(src string) *net.Dialer {
	d := dialer(5 * time.Second)
	d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	return d
}

// countingTLSUpstream is tlsUpstream that counts accepted TCP connections:
// a refused client must not cause one.
func countingTLSUpstream(t testing.TB, ca *testCA, n *atomic.Int64) string {
	t.Helper()
	ln := listenLoopback(t)
	conf := &tls.Config{GetCertificate: ca.GetCertificate}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			go func() {
				defer c.Close()
				tc := tls.Server(c, conf)
				if tc.Handshake() == nil {
					io.WriteString(tc, "upstream:"+tc.ConnectionState().ServerName)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// tlsFrom connects from src to addr with SNI name and returns what the
// far end wrote, or the error.
func tlsFrom(t testing.TB, src, addr, name string) (string, error) {
	t.Helper()
	c, err := tls.DialWithDialer(fromDialer(src), "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestClientRules(t *testing.T) {
	lan := &lanNets{ifaces: []string{"lo"}}
	r, err := newClientRules([]string{"10.0.0.0/8", "lan", "2001:db8::/32"}, []string{"10.6.6.6", "::ffff:10.7.0.0/112"}, lan)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		a      string
		ok     bool
		reason string
	}{
		{"10.1.2.3", true, ""}, {"::ffff:10.1.2.3", true, ""}, {"10.6.6.6", false, "deny"},
		{"10.7.3.4", false, "deny"}, {"127.0.0.5", true, ""}, {"::1", true, ""},
		{"2001:db8::1", true, ""}, {"192.168.1.1", false, "not_allowed"}, {"2001:db9::1", false, "not_allowed"},
	} {
		ok, reason := r.check(netip.MustParseAddr(tc.a))
		if ok != tc.ok || reason != tc.reason {
			t.Errorf("%s: %v %q, want %v %q", tc.a, ok, reason, tc.ok, tc.reason)
		}
	}
	if r, _ := newClientRules(nil, nil, lan); r != nil {
		t.Error("no lists should mean no rules")
	}
	deny, _ := newClientRules(nil, []string{"lan"}, lan)
	if ok, _ := deny.check(netip.MustParseAddr("127.0.0.1")); ok {
		t.Error("deny: [lan] let a loopback client in with steer.interfaces [lo]")
	}
	if ok, _ := deny.check(netip.MustParseAddr("192.0.2.1")); !ok {
		t.Error("deny-only rules refused a client not in them")
	}
}

func TestAccessPassthroughAndTransparent(t *testing.T) {
	ca := newTestCA(t)
	var upN, origN atomic.Int64
	up := countingTLSUpstream(t, ca, &upN)
	orig := netip.MustParseAddrPort(countingTLSUpstream(t, ca, &origN))
	cfg := baseConfig(config.Route{Match: "nas.test", Passthrough: config.Upstreams{up},
		Allow: []string{"127.0.0.2", "127.0.0.3/32"}, Deny: []string{"127.0.0.3"}})
	cfg.UnknownSNI = "original"
	cfg.TransparentAllow = []string{"127.0.0.2"}
	r := startRelay(t, cfg, func(o *Options) {
		o.OriginalDst = func(*net.TCPConn) (netip.AddrPort, bool, error) { return orig, true, nil }
		o.IsLocal = func(netip.Addr) bool { return false }
	})
	addr := r.HTTPSAddr().String()
	if got, err := tlsFrom(t, "127.0.0.2", addr, "nas.test"); err != nil || got != "upstream:nas.test" {
		t.Fatalf("allowed client: %q %v", got, err)
	}
	for _, src := range []string{"127.0.0.3", "127.0.0.4"} {
		if _, err := tlsFrom(t, src, addr, "nas.test"); err == nil || !strings.Contains(err.Error(), "access denied") {
			t.Fatalf("client %s: %v, want a TLS access_denied alert", src, err)
		}
	}
	if got, err := tlsFrom(t, "127.0.0.2", addr, "elsewhere.test"); err != nil || got != "upstream:elsewhere.test" {
		t.Fatalf("transparent, allowed client: %q %v", got, err)
	}
	if _, err := tlsFrom(t, "127.0.0.3", addr, "elsewhere.test"); err == nil || !strings.Contains(err.Error(), "access denied") {
		t.Fatalf("transparent, other client: %v, want access_denied", err)
	}
	if upN.Load() != 1 || origN.Load() != 1 {
		t.Errorf("upstream connections: route %d, original %d; want 1 each (none for refused clients)", upN.Load(), origN.Load())
	}
	m := r.metricsText(t)
	for series, want := range map[string]float64{
		`relay_access_denied_total{reason="deny",route="nas.test"}`:        1,
		`relay_access_denied_total{reason="not_allowed",route="nas.test"}`: 1,
		`relay_access_denied_total{reason="not_allowed",route="original"}`: 1,
		`relay_connections_total{action="passthrough",route="nas.test"}`:   1,
	} {
		if v := metricValue(m, series); v != want {
			t.Errorf("%s = %v, want %v", series, v, want)
		}
	}
}

func TestAccessTerminate(t *testing.T) {
	var reqs atomic.Int64
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reqs.Add(1)
		io.WriteString(w, "hello "+r.Header.Get("X-Forwarded-For"))
	}))
	defer upstream.Close()
	cfg := baseConfig(config.Route{Match: "ha.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}},
		Allow: []string{"lan"}, Deny: []string{"127.0.0.3"}})
	cfg.Steer.Interfaces = []string{"lo"} // lan = 127.0.0.0/8 and ::1
	r := startRelay(t, cfg)
	get := func(src string) (string, error) {
		tr := &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: r.ca.pool},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return fromDialer(src).DialContext(ctx, "tcp", r.HTTPSAddr().String())
			},
		}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr}).Get("https://ha.test/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if got, err := get("127.0.0.2"); err != nil || got != "hello 127.0.0.2" {
		t.Fatalf("lan client: %q %v", got, err)
	}
	if _, err := get("127.0.0.3"); err == nil || !strings.Contains(err.Error(), "access denied") {
		t.Fatalf("denied client: %v, want access_denied", err)
	}
	if reqs.Load() != 1 {
		t.Errorf("upstream saw %d requests, want 1", reqs.Load())
	}
	if v := metricValue(r.metricsText(t), `relay_access_denied_total{reason="deny",route="ha.test"}`); v != 1 {
		t.Errorf("access denied = %v, want 1", v)
	}
}

func TestAccessIPv6(t *testing.T) {
	ln, err := listenConfig().Listen(context.Background(), "tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	ca := newTestCA(t)
	var n atomic.Int64
	up := countingTLSUpstream(t, ca, &n)
	cfg := baseConfig(
		config.Route{Match: "v6.test", Passthrough: config.Upstreams{up}, Allow: []string{"::1/128"}},
		config.Route{Match: "v4only.test", Passthrough: config.Upstreams{up}, Allow: []string{"127.0.0.0/8"}},
	)
	r := startRelay(t, cfg, func(o *Options) { o.HTTPSListener = ln })
	addr := r.HTTPSAddr().String()
	if got, err := tlsFrom(t, "::1", addr, "v6.test"); err != nil || got != "upstream:v6.test" {
		t.Fatalf("::1 to v6.test: %q %v", got, err)
	}
	if _, err := tlsFrom(t, "::1", addr, "v4only.test"); err == nil || !strings.Contains(err.Error(), "access denied") {
		t.Fatalf("::1 to v4only.test: %v, want access_denied", err)
	}
	if n.Load() != 1 {
		t.Errorf("upstream connections %d, want 1", n.Load())
	}
}

func TestAccessHTTPPort(t *testing.T) {
	cfg := baseConfig(config.Route{Match: "nas.test", Passthrough: config.Upstreams{"127.0.0.1:1"}, Allow: []string{"127.0.0.2"}})
	r := startRelay(t, cfg)
	get := func(src string) int {
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return fromDialer(src).DialContext(ctx, "tcp", r.HTTPAddr().String())
		}}
		defer tr.CloseIdleConnections()
		c := &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := c.Get("http://nas.test/x")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get("127.0.0.2"); code != http.StatusPermanentRedirect {
		t.Errorf("allowed client: %d, want 308", code)
	}
	if code := get("127.0.0.3"); code != http.StatusForbidden {
		t.Errorf("other client: %d, want 403", code)
	}
	if v := metricValue(r.metricsText(t), `relay_access_denied_total{reason="not_allowed",route="nas.test"}`); v != 1 {
		t.Errorf("access denied = %v, want 1", v)
	}
}

func TestAccessHTTPPortTransit(t *testing.T) {
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "origin")
	}))
	defer origin.Close()
	ap := netip.MustParseAddrPort(strings.TrimPrefix(origin.URL, "http://"))
	cfg := baseConfig()
	cfg.UnknownSNI = "original"
	cfg.TransparentAllow = []string{"127.0.0.2"}
	r := startRelay(t, cfg, func(o *Options) {
		o.OriginalDst = func(*net.TCPConn) (netip.AddrPort, bool, error) { return ap, true, nil }
		o.IsLocal = func(netip.Addr) bool { return false }
	})
	get := func(src string) (string, error) {
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return fromDialer(src).DialContext(ctx, "tcp", r.HTTPAddr().String())
		}}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Get("http://example.org/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if got, err := get("127.0.0.2"); err != nil || got != "origin" {
		t.Fatalf("allowed client: %q %v", got, err)
	}
	if got, err := get("127.0.0.3"); err == nil {
		t.Fatalf("other client reached the origin: %q", got)
	}
	if v := metricValue(r.metricsText(t), `relay_access_denied_total{reason="not_allowed",route="original"}`); v != 1 {
		t.Errorf("access denied = %v, want 1", v)
	}
}
