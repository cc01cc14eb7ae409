package relay

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

func TestIdleTimeoutClosesOnlyIdleConnections(t *testing.T) {
	hello := clientHello(t, "idle.test")
	up := rawUpstream(t, func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c) // echo
	})
	cfg := baseConfig(config.Route{Match: "idle.test", Passthrough: config.Upstreams{up}})
	cfg.Limits.IdleTimeout = config.Duration(time.Second)
	r := startRelay(t, cfg)

	idle := dialRelay(t, r)
	idle.Write(hello)
	busy := dialRelay(t, r)
	busy.Write(hello)
	// busy keeps talking for three idle periods and must survive.
	for i := 0; i < 12; i++ {
		busy.Write([]byte("x"))
		busy.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(busy, make([]byte, 1)); err != nil {
			t.Fatalf("busy connection cut after %d round trips: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(idle); err != nil {
		t.Fatalf("idle connection: %v, want EOF from the relay", err)
	}
	if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="idle_timeout"}`); v < 1 {
		t.Errorf("idle_timeout counter = %v", v)
	}
}

func TestMaxConnections(t *testing.T) {
	cfg := baseConfig()
	cfg.Limits.MaxConnections = 2
	r := startRelay(t, cfg)
	a, b := dialRelay(t, r), dialRelay(t, r)
	_ = a
	_ = b
	waitFor(t, func() bool { return r.active.Load() == 2 })
	c := dialRelay(t, r)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF && (err == nil || !strings.Contains(err.Error(), "reset")) {
		t.Fatalf("third connection: %v, want closed by the relay", err)
	}
	if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="max_connections"}`); v != 1 {
		t.Errorf("max_connections counter = %v", v)
	}
}

func TestProxyHeaderV1(t *testing.T) {
	src := &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 40000}
	dst := mustAP("198.51.100.2:443")
	if got := string(proxyHeaderV1(src, dst)); got != "PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\n" {
		t.Errorf("v4: %q", got)
	}
	src6 := &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 40000}
	if got := string(proxyHeaderV1(src6, mustAP("[2001:db8::2]:443"))); got != "PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n" {
		t.Errorf("v6: %q", got)
	}
	h := proxyHeaderV2(src6, mustAP("[2001:db8::2]:443"), &ClientHello{ServerName: "a.test"})
	if !bytes.HasPrefix(h, proxyV2Sig) || h[13] != 0x21 || int(h[14])<<8|int(h[15]) != 36+3+6 {
		t.Errorf("v2 over IPv6: %x", h)
	}
}

func TestRouteTable(t *testing.T) {
	rt := newRouteTable[string]()
	for _, m := range []string{"a.example.com", "*.example.com", "*.b.example.com", "Exact.Test."} {
		rt.add(m, m)
	}
	for name, want := range map[string]string{
		"a.example.com":   "a.example.com",
		"A.EXAMPLE.COM.":  "a.example.com",
		"x.example.com":   "*.example.com",
		"x.b.example.com": "*.b.example.com",
		"exact.test":      "Exact.Test.",
		"example.com":     "",
		"y.x.example.com": "",
		"":                "",
	} {
		got, _ := rt.lookup(name)
		if got != want {
			t.Errorf("lookup(%q) = %q, want %q", name, got, want)
		}
	}
}
