package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAccessKeys(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), 0o600)
	users := filepath.Join(dir, "htpasswd")
	os.WriteFile(users, []byte("# users\nalice:$2y$05$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0\n"), 0o600)
	y := `listen: {proxy_protocol_from: [203.0.113.7, "10.0.0.0/8"]}
transparent_allow: [lan, "192.168.0.0/16"]
limits:
  per_client: {connections: 32, rate: 10/s, burst: 20}
routes:
  - match: nas.example.com
    passthrough: 192.168.1.20:443
    allow: [lan, "fd00::/8"]
    deny: [192.168.1.66]
  - match: ha.example.com
    terminate:
      upstream: "http://192.168.1.30:8123"
      tls: internal
      client_auth: {ca: ` + ca + `, required: true}
      basic_auth: {users_file: ` + users + `}
      forward_auth: {url: "http://127.0.0.1:9091/api/verify", copy_headers: [Remote-User, Remote-Groups]}
`
	c, err := Parse("f.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	if pc := c.Limits.PerClient; pc == nil || pc.Connections != 32 || pc.Rate != 10 || pc.Burst != 20 {
		t.Errorf("per_client: %+v", c.Limits.PerClient)
	}
	if len(c.Listen.ProxyProtocolFrom) != 2 || len(c.TransparentAllow) != 2 {
		t.Errorf("listen %+v transparent_allow %v", c.Listen, c.TransparentAllow)
	}
	if r := c.Routes[0]; r.Allow[0] != "lan" || r.Deny[0] != "192.168.1.66" {
		t.Errorf("route 0: %+v", r)
	}
	tm := c.Routes[1].Terminate
	if tm.ClientAuth == nil || !tm.ClientAuth.Required || tm.BasicAuth.UsersFile != users || tm.ForwardAuth.CopyHeaders[1] != "Remote-Groups" {
		t.Errorf("terminate: %+v", tm)
	}

	c, err = Parse("f.yaml", []byte("limits:\n  per_client: {rate: 120/m}\n"))
	if err != nil || c.Limits.PerClient.Rate != 2 {
		t.Errorf("rate 120/m: %v %+v", err, c)
	}
}

func TestAccessErrors(t *testing.T) {
	dir := t.TempDir()
	md5 := filepath.Join(dir, "md5")
	os.WriteFile(md5, []byte("alice:$apr1$Vx3c9aQ0$8y8aD/1S0kE1n3yR8Cq5W.\n"), 0o600)
	notPEM := filepath.Join(dir, "x.pem")
	os.WriteFile(notPEM, []byte("hello"), 0o600)
	term := func(extra string) string {
		return "routes:\n  - match: a.example.com\n    terminate:\n      upstream: \"http://10.0.0.1:80\"\n      tls: internal\n      " + extra + "\n"
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"bad allow", "routes:\n  - match: a.example.com\n    passthrough: 10.0.0.1:443\n    allow: [10.0.0.0/33]\n",
			`f.yaml:4: routes[0].allow[0]: "10.0.0.0/33" is not a CIDR, an IP address or lan; write e.g. 192.168.1.0/24`},
		{"bad deny", "routes:\n  - match: a.example.com\n    reject: true\n    deny:\n      - 10.0.0.1\n      - wan\n",
			`f.yaml:6: routes[0].deny[1]: "wan" is not a CIDR`},
		{"bad transparent_allow", "transparent_allow: [192.168.1.300]\n", `f.yaml:1: transparent_allow[0]: "192.168.1.300" is not a CIDR`},
		{"bad proxy_protocol_from", "listen:\n  proxy_protocol_from: [lan]\n", `f.yaml:2: listen.proxy_protocol_from "lan" is not a CIDR or IP address`},
		{"bad rate", "limits:\n  per_client:\n    rate: fast\n", `f.yaml:3: rate "fast" is not a rate; write connections per second, like "10/s"`},
		{"burst without rate", "limits:\n  per_client:\n    burst: 5\n", `f.yaml:3: limits.per_client.burst without rate`},
		{"missing ca", term("client_auth: {ca: " + filepath.Join(dir, "none.pem") + "}"),
			`f.yaml:6: client_auth.ca ` + filepath.Join(dir, "none.pem") + `: no such file or directory; write the path of a PEM file`},
		{"ca not pem", term("client_auth: {ca: " + notPEM + "}"), `f.yaml:6: client_auth.ca ` + notPEM + ` has no PEM certificate in it`},
		{"htpasswd not bcrypt", term("basic_auth: {users_file: " + md5 + "}"),
			`f.yaml:6: basic_auth.users_file ` + md5 + `: line 1 (user "alice") is not a bcrypt hash; write each user with ` + "`htpasswd -B FILE USER`"},
		{"missing htpasswd", term("basic_auth:\n        users_file: /nonexistent/r20-htpasswd"), `f.yaml:7: basic_auth.users_file /nonexistent/r20-htpasswd: no such file or directory`},
		{"forward_auth url", term("forward_auth: {url: \"127.0.0.1:9091\"}"), `f.yaml:6: forward_auth.url "127.0.0.1:9091" is not an http:// or https:// URL`},
		{"unknown auth key", term("basic_auth: {file: x}"), `unknown key "file" in routes[0].terminate.basic_auth`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
		})
	}
}
