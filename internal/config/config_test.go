package config

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestExampleFromDesign(t *testing.T) {
	c, err := Load("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Routes) != 3 || c.Routes[0].Passthrough[0] != "192.168.1.20:443" || c.Routes[0].ProxyProtocol != "v2" {
		t.Errorf("routes: %+v", c.Routes)
	}
	if r := c.Routes[1]; r.Terminate == nil || r.Terminate.TLS.Mode != "acme" || r.Terminate.Upstream != "http://192.168.1.30:8123" || r.Line != 28 {
		t.Errorf("terminate route: %+v line %d", r.Terminate, r.Line)
	}
	if !c.Routes[2].Reject || c.Routes[2].Action() != "reject" {
		t.Errorf("reject route: %+v", c.Routes[2])
	}
	if c.Limits.HelloTimeout.D() != 10*time.Second || c.Limits.IdleTimeout.D() != 5*time.Minute || c.Limits.MaxHandshakes != 512 {
		t.Errorf("limits: %+v", c.Limits)
	}
	if c.Steer.Interfaces[0] != "br-lan" || !c.Steer.IPv6Enabled() || c.Steer.Bypass[0] != "192.168.1.1/32" {
		t.Errorf("steer: %+v", c.Steer)
	}
}

func TestDefaults(t *testing.T) {
	c, err := Parse("empty.yaml", []byte("# nothing\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen.HTTPS != ":8443" || c.Listen.HTTP != ":8080" || c.Listen.Metrics != "127.0.0.1:9090" ||
		c.UnknownSNI != "original" || c.StateDir != "/var/lib/relay" || c.Limits.MaxHelloBytes != 65536 ||
		c.Limits.DrainTimeout.D() != 30*time.Second || c.Splice != "auto" || c.Steer.BPF != "auto" {
		t.Errorf("defaults: %+v", c)
	}
	if d := Default(); !d.Listen.SameAddrs(c.Listen) {
		t.Errorf("Default() differs from an empty file")
	}
}

func TestErrorsNameFileLineAndFix(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown key", "routes:\n  - match: a.example.com\n    passthru: 10.0.0.1:443\n",
			`f.yaml:3: unknown key "passthru" in routes[0]; did you mean passthrough?`},
		{"unknown top key", "listn: {https: \":8443\"}\n", `f.yaml:1: unknown key "listn" at the top level; did you mean listen?`},
		{"duplicate match", "routes:\n  - match: a.example.com\n    reject: true\n  - match: A.Example.com.\n    reject: true\n",
			`f.yaml:4: duplicate match "A.Example.com." (first at line 2)`},
		{"two actions", "routes:\n  - match: a.example.com\n    reject: true\n    passthrough: 1.2.3.4:443\n",
			`f.yaml:2: route "a.example.com" must have exactly one of passthrough, terminate, reject (has 2)`},
		{"no port", "routes:\n  - match: a.example.com\n    passthrough: 10.0.0.1\n",
			`f.yaml:3: passthrough[0] "10.0.0.1": address 10.0.0.1: missing port in address; write host:port`},
		{"bad wildcard", "routes:\n  - match: a.*.example.com\n    reject: true\n", `f.yaml:2: match "a.*.example.com": a wildcard must be the whole leftmost label`},
		{"wildcard acme without dns", "acme: {email: me@example.com}\nroutes:\n  - match: \"*.example.com\"\n    terminate: {upstream: \"http://10.0.0.1:80\", tls: acme}\n",
			`f.yaml:4: route "*.example.com": wildcard certificates need DNS-01; set acme.dns`},
		{"unknown_sni route", "unknown_sni: nas.example.com\n", `f.yaml:1: unknown_sni "nas.example.com" names no route`},
		{"unknown_sni wildcard terminate", "unknown_sni: \"*.example.com\"\nroutes:\n  - match: \"*.example.com\"\n    terminate: {upstream: \"http://10.0.0.1:80\", tls: internal}\n",
			`f.yaml:1: unknown_sni "*.example.com" names a wildcard terminate route: a client without SNI would get no certificate; name an exact route`},
		{"hsts on tcp", "routes:\n  - match: a.example.com\n    terminate: {upstream: \"tcp://10.0.0.1:22\", tls: internal, hsts: 1h}\n",
			`f.yaml:3: hsts applies to http:// and https:// upstreams only`},
		{"privileged listen", "listen: {https: \":443\"}\n", `f.yaml:1: listen.https uses privileged port 443`},
		{"bad listen", "listen:\n  metrics: localhost\n", `f.yaml:2: listen.metrics "localhost": address localhost: missing port in address`},
		{"bad duration", "limits:\n  hello_timeout: 10\n", `f.yaml:2: "10" is not a duration; write it with a unit`},
		{"bad enum", "splice: fast\n", `f.yaml:1: splice: "fast" is not allowed; write one of: auto, sockmap, splice`},
		{"bad bypass", "steer:\n  bypass: [10.0.0.0/33]\n", `f.yaml:2: steer.bypass "10.0.0.0/33" is not a CIDR`},
		{"bad scheme", "routes:\n  - match: a.example.com\n    terminate:\n      upstream: ftp://x:21\n      tls: internal\n",
			`f.yaml:4: terminate.upstream "ftp://x:21": scheme "ftp" is not supported`},
		{"quic on terminate", "routes:\n  - match: a.example.com\n    terminate: {upstream: \"http://10.0.0.1:80\", tls: internal}\n    quic: true\n",
			`f.yaml:4: quic applies to passthrough routes only`},
		{"h3 on passthrough", "routes:\n  - match: a.example.com\n    passthrough: 10.0.0.1:443\n    h3: false\n",
			`f.yaml:4: h3 applies to terminate routes only`},
		{"proxy protocol", "routes:\n  - match: a.example.com\n    passthrough: 10.0.0.1:443\n    proxy_protocol: v3\n",
			`f.yaml:4: routes[0].proxy_protocol: "v3" is not allowed; write one of: v1, v2`},
		{"files tls", "routes:\n  - match: a.example.com\n    terminate: {upstream: \"http://10.0.0.1:80\", tls: {cert: /x.crt}}\n",
			`f.yaml:3: tls {cert, key}: both cert and key are required`},
		{"syntax", "routes: [\n", `f.yaml:1: did not find expected node content`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
			var e *Error
			if !errors.As(err, &e) || e.File != "f.yaml" || e.Line < 1 {
				t.Errorf("error is not a located *Error: %#v", err)
			}
		})
	}
}

func TestResolvePath(t *testing.T) {
	env := map[string]string{"RELAY_CONFIG": "/env.yaml"}
	if p := ResolvePath("/flag.yaml", func(k string) string { return env[k] }); p != "/flag.yaml" {
		t.Error(p)
	}
	if p := ResolvePath("", func(k string) string { return env[k] }); p != "/env.yaml" {
		t.Error(p)
	}
	if p := ResolvePath("", func(string) string { return "" }); p != DefaultPath {
		t.Error(p)
	}
}

func TestQUICDefaults(t *testing.T) {
	yes, no := true, false
	for _, c := range []struct {
		r    Route
		want bool
	}{
		{Route{Passthrough: Upstreams{"10.0.0.1:443"}}, true},
		{Route{Passthrough: Upstreams{"10.0.0.1:443", "10.0.0.2:8443"}}, false},
		{Route{Passthrough: Upstreams{"10.0.0.1:8443"}, QUIC: &yes}, true},
		{Route{Passthrough: Upstreams{"10.0.0.1:443"}, QUIC: &no}, false},
		{Route{Terminate: &Terminate{}}, false},
	} {
		if got := c.r.QUICEnabled(); got != c.want {
			t.Errorf("%+v: QUICEnabled %v", c.r, got)
		}
	}
	if (&Route{Terminate: &Terminate{H3: &no}}).H3Enabled() || !(&Route{Terminate: &Terminate{H3: &no}, H3: &yes}).H3Enabled() {
		t.Error("h3 inside terminate")
	}
	if !(&Route{Terminate: &Terminate{}}).H3Enabled() || (&Route{Terminate: &Terminate{}, H3: &no}).H3Enabled() || (&Route{Passthrough: Upstreams{"a:443"}}).H3Enabled() {
		t.Error("H3Enabled defaults")
	}
}

func TestParseQUICKeys(t *testing.T) {
	c, err := Parse("f.yaml", []byte(`routes:
  - match: a.example.com
    passthrough: 10.0.0.1:8443
    quic: true
  - match: b.example.com
    terminate: {upstream: "http://10.0.0.1:80", tls: internal}
    h3: false
  - match: c.example.com
    terminate: {upstream: "http://10.0.0.1:80", tls: internal, h3: false}
  - match: d.example.com
    terminate: {upstream: "http://10.0.0.1:80", tls: internal}
`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Routes[0].QUICEnabled() || c.Routes[1].H3Enabled() || c.Routes[2].H3Enabled() || !c.Routes[3].H3Enabled() {
		t.Fatalf("quic %v, h3 %v %v %v", c.Routes[0].QUICEnabled(), c.Routes[1].H3Enabled(), c.Routes[2].H3Enabled(), c.Routes[3].H3Enabled())
	}
}
