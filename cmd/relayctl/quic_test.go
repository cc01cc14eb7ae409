package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// runQUICHelper plays a QUIC peer in a namespace:
//
//	quic-echo ADDR            server; answers each stream with "echo:" + what it read
//	quic-get ADDR NAME        client; prints the server certificate's name and the echo
//	h3-get ADDR URL           HTTP/3 client; prints the body
func runQUICHelper(mode string, args []string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fail := func(err error) { fmt.Println("error:", err); os.Exit(1) }
	switch mode {
	case "quic-echo":
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "quic-echo upstream"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		ln, err := quic.ListenAddr(args[0], &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"echo"}}, nil)
		if err != nil {
			fail(err)
		}
		for {
			c, err := ln.Accept(context.Background())
			if err != nil {
				fail(err)
			}
			go func() {
				st, err := c.AcceptStream(context.Background())
				if err != nil {
					return
				}
				b, _ := io.ReadAll(st)
				st.Write(append([]byte("echo:"), b...))
				st.Close()
				<-c.Context().Done()
			}()
		}
	case "quic-get":
		c, err := quic.DialAddr(ctx, args[0], &tls.Config{ServerName: args[1], InsecureSkipVerify: true, NextProtos: []string{"echo"}}, nil)
		if err != nil {
			fail(err)
		}
		defer c.CloseWithError(0, "")
		st, err := c.OpenStreamSync(ctx)
		if err != nil {
			fail(err)
		}
		st.Write([]byte("ping"))
		st.Close()
		b, err := io.ReadAll(st)
		if err != nil {
			fail(err)
		}
		fmt.Printf("cert=%q %s\n", c.ConnectionState().TLS.PeerCertificates[0].Subject.CommonName, b)
	case "h3-get":
		tr := &http3.Transport{
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
			Dial: func(ctx context.Context, _ string, tc *tls.Config, qc *quic.Config) (*quic.Conn, error) {
				return quic.DialAddrEarly(ctx, args[0], tc, qc)
			},
		}
		defer tr.Close()
		req, _ := http.NewRequestWithContext(ctx, "GET", args[1], nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			fail(err)
		}
		b, _ := io.ReadAll(resp.Body)
		fmt.Printf("%s %s\n", resp.Proto, b)
	}
	os.Exit(0)
}

// TestGatewayQUIC: UDP 443 through the netns gateway, steered by `rules
// apply` (REDIRECT for UDP) into `relayctl serve` running as nobody: a
// QUIC passthrough route (the upstream's own certificate reaches the
// client), an HTTP/3 terminate route, transit and addressed to the
// gateway; rules show lists the UDP rules, rules delete removes them.
func TestGatewayQUIC(t *testing.T) {
	n := newGatewayNetPrefix(t, fmt.Sprintf("rq%d", os.Getpid()%100000))
	upBin := filepath.Join(n.dir, "demo-upstream")
	if out, err := exec.Command("go", "build", "-o", upBin, "../../scripts/demo-upstream").CombinedOutput(); err != nil {
		t.Fatalf("build demo-upstream: %v\n%s", err, out)
	}
	self, _ := os.Executable()
	n.start(t, "up", upBin, "-http", ":80", "-names", "h3.test", "-label", "up")
	n.start(t, "up", "env", "RELAY_TEST_HELPER=quic-echo", self, ":443")

	state := filepath.Join(n.dir, "state")
	os.Mkdir(state, 0o700)
	os.Chown(state, 65534, 65534)
	cfg := n.writeConfig(t, "relay.yaml", fmt.Sprintf(`
user: nobody
state_dir: %s
listen: {https: ":8443", http: ":8080", metrics: "127.0.0.1:9090"}
unknown_sni: reject
steer: {bpf: off}
routes:
  - match: q.test
    passthrough: 10.10.2.2:443
    quic: true
  - match: h3.test
    terminate: {upstream: "http://10.10.2.2:80", tls: internal}
`, state))
	before4, before6 := n.save(t, "iptables-save"), n.save(t, "ip6tables-save")
	n.run(t, "gw", relayctlBin, "rules", "apply", "-c", cfg)
	if s := n.save(t, "iptables-save"); !strings.Contains(s, "-p udp -m udp --dport 443 -j REDIRECT --to-ports 8443") {
		t.Fatalf("no UDP REDIRECT rule:\n%s", s)
	}
	if out := n.run(t, "gw", relayctlBin, "rules", "apply", "-c", cfg); !strings.Contains(out, "nothing to change") {
		t.Fatalf("second apply changed something:\n%s", out)
	}
	if show := n.run(t, "gw", relayctlBin, "rules", "show", "-c", cfg); !strings.Contains(show, "-p udp") {
		t.Errorf("rules show lacks the UDP rules:\n%s", show)
	}
	n.start(t, "gw", asNobody(relayctlBin, "serve", "-c", cfg)...)
	waitIn(t, n, "gw", "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:9090/metrics")

	helper := func(mode string, args ...string) string {
		c := n.in("client", append([]string{"env", "RELAY_TEST_HELPER=" + mode, self}, args...)...)
		out, _ := c.CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	// Transit (to the upstream's address) and addressed to the gateway.
	for _, addr := range []string{"10.10.2.2:443", "10.10.1.1:443", "[fd10:2::2]:443"} {
		if got := helper("quic-get", addr, "q.test"); got != `cert="quic-echo upstream" echo:ping` {
			t.Errorf("QUIC passthrough via %s: %q", addr, got)
		}
		if got := helper("h3-get", addr, "https://h3.test/x"); !strings.HasPrefix(got, "HTTP/3.0 ") || !strings.Contains(got, "hello from up") {
			t.Errorf("HTTP/3 via %s: %q", addr, got)
		}
	}
	metrics := n.run(t, "gw", "curl", "-s", "http://127.0.0.1:9090/metrics")
	for _, want := range []string{
		`relay_quic_connections_total{action="passthrough",route="q.test"} 3`,
		`relay_quic_connections_total{action="terminate",route="h3.test"} 3`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s\n%s", want, grepLines(metrics, "relay_quic"))
		}
	}
	if st := n.run(t, "gw", relayctlBin, "stats", "-c", cfg); !strings.Contains(st, "QUIC ROUTE") || !strings.Contains(st, "q.test") {
		t.Errorf("relayctl stats lacks the QUIC flows:\n%s", st)
	}

	n.run(t, "gw", relayctlBin, "rules", "delete", "-c", cfg)
	if a, b := withoutEmptyNat(n.save(t, "iptables-save")), withoutEmptyNat(before4); a != b {
		t.Errorf("iptables-save after delete differs:\n--- before\n%s\n--- after\n%s", b, a)
	}
	if a, b := withoutEmptyNat(n.save(t, "ip6tables-save")), withoutEmptyNat(before6); a != b {
		t.Errorf("ip6tables-save after delete differs:\n--- before\n%s\n--- after\n%s", b, a)
	}
	// Without rules the client reaches the QUIC upstream directly.
	if got := helper("quic-get", "10.10.2.2:443", "q.test"); got != `cert="quic-echo upstream" echo:ping` {
		t.Errorf("direct after delete: %q", got)
	}
}
