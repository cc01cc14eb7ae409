package config

import (
	"strings"
	"testing"
	"time"
)

func TestMatchForms(t *testing.T) {
	y := `routes:
  - match: {sni: chat.example.com, alpn: [xmpp-client]}
    passthrough: 192.168.1.5:5223
  - match: chat.example.com
    passthrough: 192.168.1.6:443
  - match: {sni: "*.example.com", alpn: [h2, http/1.1]}
    passthrough: 192.168.1.7:443
  - match: {protocol: ssh}
    passthrough: 127.0.0.1:22
  - match: {silence: 3s}
    passthrough: 127.0.0.1:25
`
	c, err := Parse("f.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	r := c.Routes
	if r[0].Match != "chat.example.com" || len(r[0].ALPN) != 1 || r[0].Label() != "chat.example.com alpn=xmpp-client" || r[0].Line != 2 {
		t.Errorf("route 0: %+v label %q", r[0], r[0].Label())
	}
	if r[1].Label() != "chat.example.com" || !r[1].IsName() {
		t.Errorf("route 1 label %q", r[1].Label())
	}
	if r[3].Protocol != "ssh" || r[3].IsName() || r[3].Label() != "protocol:ssh" || r[3].Match != "" {
		t.Errorf("route 3: %+v", r[3])
	}
	if r[4].Silence.D() != 3*time.Second || r[4].Label() != "silence:3s" {
		t.Errorf("route 4: %+v", r[4])
	}
}

func TestMatchErrors(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"ambiguous alpn", `routes:
  - match: {sni: a.example.com, alpn: [h2, http/1.1]}
    passthrough: 10.0.0.1:443
  - match: {sni: A.example.com, alpn: [http/1.1]}
    passthrough: 10.0.0.2:443
`, `f.yaml:4: ambiguous routes: "A.example.com" with ALPN "http/1.1" is also matched by the route at line 2`},
		{"alpn without sni", "routes:\n  - match: {alpn: [h2]}\n    passthrough: 10.0.0.1:443\n", "f.yaml:2: match.alpn without sni"},
		{"unknown protocol", "routes:\n  - match: {protocol: rdp}\n    passthrough: 10.0.0.1:3389\n", `f.yaml:2: match.protocol "rdp" is not a protocol`},
		{"two kinds", "routes:\n  - match: {protocol: ssh, silence: 2s}\n    passthrough: 10.0.0.1:22\n", "f.yaml:2: match must have exactly one of"},
		{"duplicate protocol", "routes:\n  - match: {protocol: ssh}\n    passthrough: 10.0.0.1:22\n  - match: {protocol: ssh}\n    passthrough: 10.0.0.2:22\n", "f.yaml:4: duplicate match {protocol: ssh} (first at line 2)"},
		{"terminate protocol", "routes:\n  - match: {protocol: openvpn}\n    terminate: {upstream: \"http://10.0.0.1:80\", tls: internal}\n", "passthrough only"},
		{"two silences", "routes:\n  - match: {silence: 2s}\n    passthrough: 10.0.0.1:25\n  - match: {silence: 3s}\n    passthrough: 10.0.0.2:25\n", "f.yaml:4: a second silence route"},
		{"silence too long", "limits: {hello_timeout: 5s}\nroutes:\n  - match: {silence: 5s}\n    passthrough: 10.0.0.1:25\n", "f.yaml:3: match.silence 5s is not shorter than limits.hello_timeout"},
		{"unknown match key", "routes:\n  - match: {name: a.example.com}\n    passthrough: 10.0.0.1:443\n", `f.yaml:2: unknown key "name" in routes[0].match`},
		{"empty map", "routes:\n  - match: {}\n    passthrough: 10.0.0.1:443\n", "f.yaml:2: match must have exactly one of"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}

func TestAccessLogConfig(t *testing.T) {
	c, err := Parse("f.yaml", []byte("log: {level: info, access: {path: /var/log/relay/access.log}}\n"))
	if err != nil || c.Log.Access == nil || c.Log.Access.Format != "json" || c.Log.Access.Path != "/var/log/relay/access.log" {
		t.Fatalf("%v %+v", err, c)
	}
	if c, err := Parse("f.yaml", []byte("log:\n  access: {path: stdout, format: combined}\n")); err != nil || c.Log.Access.Format != "combined" {
		t.Errorf("stdout combined: %v", err)
	}
	for y, want := range map[string]string{
		"log:\n  access: {path: /x, format: clf}\n": `f.yaml:2: log.access.format: "clf" is not allowed`,
		"log:\n  access: {format: json}\n":          "f.yaml:2: log.access without path",
		"log:\n  access: {path: access.log}\n":      `f.yaml:2: log.access.path "access.log" is not an absolute path`,
		"log:\n  access: {file: /x}\n":              `f.yaml:2: unknown key "file" in log.access`,
	} {
		if _, err := Parse("f.yaml", []byte(y)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want %q", y, err, want)
		}
	}
}
