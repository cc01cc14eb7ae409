package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// relayctlBin is built once by TestMain, so tests run the real binary the
// way users do (and can drop privileges for it).
var relayctlBin string

func TestMain(m *testing.M) {
	if mode := os.Getenv("RELAY_TEST_HELPER"); mode != "" {
		runHelper(mode, os.Args[1:])
	}
	dir, err := os.MkdirTemp("", "relayctl-test")
	if err != nil {
		panic(err)
	}
	os.Chmod(dir, 0o755)
	relayctlBin = filepath.Join(dir, "relayctl")
	out, err := exec.Command("go", "build", "-o", relayctlBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build relayctl: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// runCLI runs relayctl in-process and returns exit status, stdout, stderr.
func runCLI(t *testing.T, envv map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	e := &env{ctx: context.Background(), stdout: &out, stderr: &errb, getenv: func(k string) string { return envv[k] }}
	code := run(e, args)
	return code, out.String(), errb.String()
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("routes:\n  - match: a.example.com\n    passthrough: 10.0.0.1:443\n"), 0o644)
	if code, out, errs := runCLI(t, map[string]string{"RELAY_CONFIG": good}, "check"); code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("check good: %d %q %q", code, out, errs)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("routes:\n  - match: a.example.com\n    passthru: 10.0.0.1:443\n"), 0o644)
	code, _, errs := runCLI(t, nil, "check", "-c", bad)
	if code != 1 || !strings.Contains(errs, bad+":3:") {
		t.Fatalf("check bad: exit %d, stderr %q; want exit 1 and %s:3: ...", code, errs, bad)
	}
}

// TestServeUnprivileged runs the real binary as uid 65534 (nobody) with no
// capabilities and drives passthrough, termination, the http port and
// metrics through it.
func TestServeUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test starts relayctl as uid 65534 to prove serve needs no privilege")
	}
	dir, err := os.MkdirTemp("", "relayctl-serve") // t.TempDir's parent is 0700: nobody could not read the config
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	state := filepath.Join(dir, "state")
	os.Mkdir(state, 0o700)
	os.Chown(state, 65534, 65534)

	// A TLS upstream for the passthrough route.
	upCert := selfSignedForTest(t, "nas.test")
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{upCert}})
	if err != nil {
		t.Fatal(err)
	}
	defer upLn.Close()
	go http.Serve(upLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "nas") }))
	// An HTTP upstream for the terminate route.
	appLn, _ := net.Listen("tcp", "127.0.0.1:0")
	defer appLn.Close()
	go http.Serve(appLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "app xff=%s", r.Header.Get("X-Forwarded-For"))
	}))

	// A terminate route with certificate files.
	fileCert := selfSignedForTest(t, "files.test")
	keyDER, _ := x509.MarshalPKCS8PrivateKey(fileCert.PrivateKey)
	certFile, keyFile := filepath.Join(dir, "files.pem"), filepath.Join(dir, "files.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: fileCert.Certificate[0]}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o644)
	fileLeaf, _ := x509.ParseCertificate(fileCert.Certificate[0])

	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
unknown_sni: reject
routes:
  - match: nas.test
    passthrough: %s
  - match: app.test
    terminate: {upstream: "http://%s", tls: internal}
  - match: files.test
    terminate: {upstream: "http://%s", tls: {cert: %s, key: %s}}
`, state, https, httpp, metrics, upLn.Addr(), appLn.Addr(), appLn.Addr(), certFile, keyFile)), 0o644)

	cmd := exec.Command(relayctlBin, "serve", "-c", cfg)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var logs bytes.Buffer
	cmd.Stderr = &logs
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

	// Passthrough: the upstream's own certificate arrives.
	c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", https), &tls.Config{ServerName: "nas.test", InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	if cn := c.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "nas.test (upstream)" {
		t.Errorf("passthrough served certificate %q, want the upstream's", cn)
	}
	c.Close()

	// Terminate with the internal CA, whose root the unprivileged relay
	// created in state_dir.
	rootPEM, err := os.ReadFile(filepath.Join(state, "ca", "root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots},
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", https))
		},
	}}
	resp, err := client.Get("https://app.test/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "app xff=127.0.0.1" {
		t.Errorf("terminate: %q", body)
	}
	if fi, err := os.Stat(filepath.Join(state, "ca")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 {
		t.Errorf("internal CA dir not created by uid 65534: %v", err)
	}
	// Every certificate served has its expiry exported, not only ACME's.
	rootCert, _ := pem.Decode(rootPEM)
	root, _ := x509.ParseCertificate(rootCert.Bytes)
	waitMetric(t, metrics, fmt.Sprintf(`relay_certificate_expiry_timestamp_seconds{issuer=%q,name="app.test"}`, root.Subject.CommonName))
	waitMetric(t, metrics, fmt.Sprintf(`relay_certificate_expiry_timestamp_seconds{issuer="files.test (upstream)",name="files.test"} %s`,
		strconv.FormatFloat(float64(fileLeaf.NotAfter.Unix()), 'g', -1, 64)))

	// Editing the file reloads it: a broken edit is refused (the old
	// routes keep serving), a good one adds the new route.
	orig := mustRead(t, cfg)
	os.WriteFile(cfg, []byte(orig+"  - match: broken.test\n    passthrough: no-port\n"), 0o644)
	waitMetric(t, metrics, `relay_config_reloads_total{result="failure"} 1`)
	os.WriteFile(cfg, []byte(orig+fmt.Sprintf("  - match: new.test\n    passthrough: %s\n", upLn.Addr())), 0o644)
	waitMetric(t, metrics, `relay_config_reloads_total{result="success"} 1`)
	nc, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", https), &tls.Config{ServerName: "new.test", InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("route added by editing the config: %v", err)
	}
	nc.Close()

	// stats reads the running relay's counters.
	code, out, errs := runCLI(t, nil, "stats", "-c", cfg)
	if code != 0 || !strings.Contains(out, "nas.test") || !strings.Contains(out, "app.test") {
		t.Errorf("stats: %d\n%s\n%s", code, out, errs)
	}
}

func waitHTTP(t *testing.T, url string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not come up", url)
}

func waitMetric(t *testing.T, port int, line string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port)); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), line) {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("metrics never showed %s", line)
}
