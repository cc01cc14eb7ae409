package relay

import (
	"crypto/tls"
	"io"
	"testing"

	"github.com/relay-gw/relay/internal/config"
)

// TestALPNRouting checks the documented order with real crypto/tls
// clients: name + ALPN, name, wildcard + ALPN, wildcard.
func TestALPNRouting(t *testing.T) {
	ca := newTestCA(t)
	upstream := func(id string, protos ...string) string {
		ln := listenLoopback(t)
		conf := &tls.Config{GetCertificate: ca.GetCertificate, NextProtos: protos}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					tc := tls.Server(c, conf)
					if tc.Handshake() == nil {
						io.WriteString(tc, id)
					}
				}()
			}
		}()
		return ln.Addr().String()
	}
	all := []string{"xmpp-client", "h2", "http/1.1"}
	routes := []config.Route{
		{Match: "chat.test", ALPN: []string{"xmpp-client"}, Passthrough: config.Upstreams{upstream("name+alpn", all...)}},
		{Match: "chat.test", Passthrough: config.Upstreams{upstream("name", all...)}},
		{Match: "*.test", ALPN: []string{"h2", "xmpp-client"}, Passthrough: config.Upstreams{upstream("wild+alpn", all...)}},
		{Match: "*.test", Passthrough: config.Upstreams{upstream("wild", all...)}},
		{Match: "only.example", ALPN: []string{"h2"}, Passthrough: config.Upstreams{upstream("only-alpn", all...)}},
	}
	r := startRelay(t, baseConfig(routes...))
	for _, tc := range []struct {
		name string
		alpn []string
		want string
	}{
		{"chat.test", []string{"xmpp-client"}, "name+alpn"},
		{"chat.test", []string{"h2", "xmpp-client"}, "name+alpn"}, // any offered protocol of the route
		{"chat.test", []string{"h2"}, "name"},                     // the name beats wildcard + ALPN
		{"chat.test", nil, "name"},
		{"other.test", []string{"http/1.1", "h2"}, "wild+alpn"},
		{"other.test", []string{"http/1.1"}, "wild"},
		{"other.test", nil, "wild"},
		{"only.example", []string{"h2"}, "only-alpn"},
		{"only.example", []string{"http/1.1"}, ""}, // no route without alpn: unknown_sni (reject)
	} {
		c, err := r.dialTLS(t, tc.name, ca.pool, tc.alpn...)
		if tc.want == "" {
			if err == nil {
				t.Errorf("%s %v: connected, want rejected", tc.name, tc.alpn)
				c.Close()
			}
			continue
		}
		if err != nil {
			t.Errorf("%s %v: %v", tc.name, tc.alpn, err)
			continue
		}
		got, _ := io.ReadAll(c)
		c.Close()
		if string(got) != tc.want {
			t.Errorf("%s offering %v went to %q, want %q", tc.name, tc.alpn, got, tc.want)
		}
	}
	m := r.metricsText(t)
	if v := metricValue(m, `relay_connections_total{action="passthrough",route="chat.test alpn=xmpp-client"}`); v != 2 {
		t.Errorf("connections of the alpn route = %v, want 2", v)
	}
}
