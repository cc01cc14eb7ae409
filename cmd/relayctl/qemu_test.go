package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// qemuArchs are the router CPUs `make dist` builds for, each with the
// qemu-user emulator that runs it (Debian's qemu-user-static).
var qemuArchs = []struct {
	name, qemu string
	env        []string
}{
	{"arm64", "qemu-aarch64-static", []string{"GOARCH=arm64"}},
	{"armv7", "qemu-arm-static", []string{"GOARCH=arm", "GOARM=7"}},
	{"mips", "qemu-mips-static", []string{"GOARCH=mips", "GOMIPS=softfloat"}},
	{"mipsle", "qemu-mipsel-static", []string{"GOARCH=mipsle", "GOMIPS=softfloat"}},
}

// TestQemuArchs runs each dist binary under qemu-user as a new user would:
// serve with a passthrough and a terminate route on loopback, passthrough,
// terminate over HTTP/1.1 and h2, a config edit that reloads (the inotify
// read that was SIGBUS on mips), check and stats.
func TestQemuArchs(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: cross-builds four binaries")
	}
	for _, a := range qemuArchs {
		if _, err := exec.LookPath(a.qemu); err != nil {
			t.Skipf("%s not installed (Debian package qemu-user-static; scripts/deps.sh installs it)", a.qemu)
		}
	}
	// Cross-build in parallel (two at a time: CI has two cores).
	bins := map[string]string{}
	dir := t.TempDir()
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 2)
	for _, a := range qemuArchs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			bin := filepath.Join(dir, "relayctl-"+a.name)
			cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
			cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux"), a.env...)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("build %s: %v\n%s", a.name, err, out)
				return
			}
			mu.Lock()
			bins[a.name] = bin
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	upCert := selfSignedForTest(t, "pt.test")
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{upCert}})
	if err != nil {
		t.Fatal(err)
	}
	defer upLn.Close()
	go http.Serve(upLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "passthrough") }))
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer appLn.Close()
	go http.Serve(appLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "app %s", r.Header.Get("X-Forwarded-Proto"))
	}))

	for _, a := range qemuArchs {
		t.Run(a.name, func(t *testing.T) {
			qemuSmoke(t, a.qemu, bins[a.name], upLn.Addr().String(), appLn.Addr().String())
		})
	}
}

func qemuSmoke(t *testing.T, qemu, bin, upstream, app string) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	https, httpp, mport := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	body := fmt.Sprintf(`state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
steer: {pin_dir: %s}
unknown_sni: reject
routes:
  - match: pt.test
    passthrough: %s
  - match: app.test
    terminate: {upstream: "http://%s", tls: internal}
`, state, https, httpp, mport, filepath.Join(dir, "no-pins"), upstream, app)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "RELAY_STEERING_STATE="+filepath.Join(dir, "steering.json"))

	// check
	cmd := exec.Command(qemu, bin, "check", "-c", cfg)
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "ok") {
		t.Fatalf("check: %v\n%s", err, out)
	}

	srv := exec.Command(qemu, bin, "serve", "-c", cfg)
	srv.Env = env
	var logs syncBuffer
	srv.Stdout, srv.Stderr = &logs, &logs
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	// exited is closed when serve ends, with its error in waitErr.
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = srv.Wait(); close(exited) }()
	defer func() {
		srv.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			srv.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("relay log:\n%s", logs.String())
		}
	}()
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", mport)
	waitFor := func(what string, ok func(metrics string) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-exited:
				t.Fatalf("relay exited while waiting for %s: %v", what, waitErr)
			default:
			}
			if resp, err := http.Get(metricsURL); err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if ok(string(b)) {
					return
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("timed out waiting for %s", what)
	}
	waitFor("the metrics listener", func(string) bool { return true })

	// Passthrough: the upstream's own certificate and answer.
	pool := x509.NewCertPool()
	leaf, _ := x509.ParseCertificate(selfSignedLeaf(t, upstream))
	pool.AddCert(leaf)
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", https))
	}
	get := func(name string, tr *http.Transport) (string, string) {
		t.Helper()
		tr.DialContext = dial
		c := &http.Client{Transport: tr, Timeout: 20 * time.Second}
		defer tr.CloseIdleConnections()
		resp, err := c.Get("https://" + name + "/")
		if err != nil {
			t.Fatalf("GET https://%s/: %v", name, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.Proto, string(b)
	}
	if _, got := get("pt.test", &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}); got != "passthrough" {
		t.Errorf("passthrough: %q", got)
	}
	// Terminate with the internal CA the relay made in state_dir.
	rootPEM, err := os.ReadFile(filepath.Join(state, "ca", "root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)
	h1 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
	if proto, got := get("app.test", h1); proto != "HTTP/1.1" || got != "app https" {
		t.Errorf("terminate h1: %s %q", proto, got)
	}
	h2 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}
	if proto, got := get("app.test", h2); proto != "HTTP/2.0" || got != "app https" {
		t.Errorf("terminate h2: %s %q", proto, got)
	}

	// A config edit is seen by the inotify watch and reloads.
	if err := os.WriteFile(cfg, []byte(body+fmt.Sprintf("  - match: new.test\n    passthrough: %s\n", upstream)), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor("the reload after the config edit", func(m string) bool {
		return strings.Contains(m, `relay_config_reloads_total{result="success"} 1`)
	})

	// stats
	cmd = exec.Command(qemu, bin, "stats", "-c", cfg)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "pt.test") || !strings.Contains(string(out), "app.test") {
		t.Errorf("stats: %v\n%s", err, out)
	}
}

// selfSignedLeaf returns the certificate the TLS listener at addr serves.
func selfSignedLeaf(t *testing.T, addr string) []byte {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].Raw
}
