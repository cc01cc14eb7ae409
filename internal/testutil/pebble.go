// Package testutil holds helpers shared by tests: a real ACME server
// (Pebble) with its DNS (pebble-challtestsrv), built from the versions
// pinned in go.mod.
package testutil

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Pebble is a running Pebble + challtestsrv pair. challtestsrv answers
// 127.0.0.1 for every name, so Pebble validates HTTP-01 at
// 127.0.0.1:HTTPPort and TLS-ALPN-01 at 127.0.0.1:TLSPort.
type Pebble struct {
	Dir     string // ACME directory URL
	CARoot  string // PEM file: Pebble's HTTPS root (what acme.ca_root trusts)
	Mgmt    string // management API (issuing roots at /roots/0)
	DNSAddr string // challtestsrv DNS, host:port
	CTSMgmt string // challtestsrv management API URL (/set-txt, /clear-txt)
}

var (
	buildOnce sync.Once
	bins      string
	buildErr  error
)

// FreePort returns a TCP port free on 127.0.0.1 right now.
func FreePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// StartPebble runs Pebble validating against httpPort and tlsPort on
// 127.0.0.1, until the test ends.
func StartPebble(t testing.TB, httpPort, tlsPort int) *Pebble {
	t.Helper()
	buildOnce.Do(func() {
		bins, buildErr = os.MkdirTemp("", "pebble-bin")
		for _, tool := range []string{"pebble", "pebble-challtestsrv"} {
			out, err := exec.Command("go", "build", "-o", filepath.Join(bins, tool), "github.com/letsencrypt/pebble/v2/cmd/"+tool).CombinedOutput()
			if err != nil {
				buildErr = fmt.Errorf("build %s: %v\n%s", tool, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	modDir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/letsencrypt/pebble/v2").Output()
	if err != nil {
		t.Fatal(err)
	}
	certs := filepath.Join(strings.TrimSpace(string(modDir)), "test", "certs")
	p := &Pebble{CARoot: filepath.Join(certs, "pebble.minica.pem")}
	dnsPort, ctsMgmt, pebPort, pebMgmt := FreePort(t), FreePort(t), FreePort(t), FreePort(t)
	p.DNSAddr = fmt.Sprintf("127.0.0.1:%d", dnsPort)
	p.CTSMgmt = fmt.Sprintf("http://127.0.0.1:%d", ctsMgmt)
	p.Dir = fmt.Sprintf("https://127.0.0.1:%d/dir", pebPort)
	p.Mgmt = fmt.Sprintf("https://127.0.0.1:%d", pebMgmt)
	cfg := map[string]any{"pebble": map[string]any{
		"listenAddress":           fmt.Sprintf("127.0.0.1:%d", pebPort),
		"managementListenAddress": fmt.Sprintf("127.0.0.1:%d", pebMgmt),
		"certificate":             filepath.Join(certs, "localhost", "cert.pem"),
		"privateKey":              filepath.Join(certs, "localhost", "key.pem"),
		"httpPort":                httpPort,
		"tlsPort":                 tlsPort,
		"ocspResponderURL":        "",
		"keyAlgorithm":            "ecdsa",
		"profiles": map[string]any{
			"default":    map[string]any{"description": "default", "validityPeriod": 7776000},
			"shortlived": map[string]any{"description": "6 days", "validityPeriod": 518400},
		},
	}}
	dir, err := os.MkdirTemp("", "pebble-cfg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfgPath := filepath.Join(dir, "pebble.json")
	b, _ := json.Marshal(cfg)
	os.WriteFile(cfgPath, b, 0o644)

	run := func(name string, env []string, args ...string) {
		cmd := exec.Command(filepath.Join(bins, name), args...)
		cmd.Env = append(os.Environ(), env...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
			if t.Failed() && testing.Verbose() {
				t.Logf("%s output:\n%s", name, out.String())
			}
		})
	}
	run("pebble-challtestsrv", nil, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
		"-dnsserver", p.DNSAddr, "-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", "",
		"-management", fmt.Sprintf("127.0.0.1:%d", ctsMgmt))
	run("pebble", []string{"PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0"},
		"-config", cfgPath, "-dnsserver", p.DNSAddr, "-strict=false")

	client := p.HTTPClient(t)
	for i := 0; ; i++ {
		resp, err := client.Get(p.Dir)
		if err == nil {
			resp.Body.Close()
			break
		}
		if i > 100 {
			t.Fatalf("pebble did not come up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return p
}

// HTTPClient trusts Pebble's HTTPS root.
func (p *Pebble) HTTPClient(t testing.TB) *http.Client {
	pemBytes, err := os.ReadFile(p.CARoot)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pemBytes)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 10 * time.Second}
}

// IssuingRoots fetches Pebble's issuing root (new for every Pebble run).
func (p *Pebble) IssuingRoots(t testing.TB) *x509.CertPool {
	resp, err := p.HTTPClient(t).Get(p.Mgmt + "/roots/0")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		t.Fatalf("pebble roots: %s", b)
	}
	return pool
}
