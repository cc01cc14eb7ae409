package main

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/testutil"
)

// TestServeACME: `relayctl serve` gets certificates from a real ACME server
// (Pebble) for its tls: acme routes, answering the challenges on its own
// http and https listeners, and serves them to real TLS clients.
func TestServeACME(t *testing.T) {
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	peb := testutil.StartPebble(t, httpp, https)
	app := http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "app") })}
	appLn, _ := testListen()
	defer appLn.Close()
	go app.Serve(appLn)

	dir := t.TempDir()
	cfg := filepath.Join(dir, "relay.yaml")
	// First without acme.email: tls: acme routes use the internal CA.
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
routes:
  - match: app.acme.test
    terminate: {upstream: "http://%s", tls: acme}
`, dir, https, httpp, metrics, appLn.Addr())), 0o644)
	cmd := exec.Command(relayctlBin, "serve", "-c", cfg)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("relay log:\n%s", logs.String())
		}
	}()
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	waitMetric(t, metrics, `relay_acme_orders_total{result="success"} 0`)
	c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", https), &tls.Config{ServerName: "app.acme.test", InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	if iss := c.ConnectionState().PeerCertificates[0].Issuer.CommonName; !strings.HasPrefix(iss, "relay internal CA") {
		t.Errorf("without acme.email: certificate from %q, want the internal CA", iss)
	}
	c.Close()

	// Adding acme: to the running relay's config (a reload) starts ACME:
	// no restart needed.
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
acme: {email: admin@relay.test, ca: %q, ca_root: %q}
routes:
  - match: app.acme.test
    terminate: {upstream: "http://%s", tls: acme}
  - match: two.acme.test
    terminate: {upstream: "http://%s", tls: acme}
`, dir, https, httpp, metrics, peb.Dir, peb.CARoot, appLn.Addr(), appLn.Addr())), 0o644)
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), `relay_acme_orders_total{result="success"} 2`) {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no two successful ACME orders within 60s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	roots := peb.IssuingRoots(t)
	for _, name := range []string{"app.acme.test", "two.acme.test"} {
		c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", https), &tls.Config{ServerName: name, RootCAs: roots})
		if err != nil {
			t.Fatalf("%s: TLS through the relay with the ACME certificate: %v", name, err)
		}
		c.Close()
	}
	code, out, errs := runCLI(t, nil, "certs", "list", "-c", cfg)
	if code != 0 || !strings.Contains(out, "app.acme.test") || !strings.Contains(out, "Pebble") {
		t.Errorf("certs list: %d\n%s\n%s", code, out, errs)
	}
}
