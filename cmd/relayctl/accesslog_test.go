package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestServeAccessLogSIGUSR1: logrotate renames the access log and sends
// SIGUSR1; the running relay writes its next lines to a new file.
func TestServeAccessLogSIGUSR1(t *testing.T) {
	dir, state := restartDir(t)
	logs := filepath.Join(dir, "log")
	os.Mkdir(logs, 0o750)
	if os.Geteuid() == 0 {
		os.Chown(logs, 65534, 65534) // serve runs as nobody
	}
	access := filepath.Join(logs, "access.log")
	up := echoUpstream(t)
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
unknown_sni: reject
log: {access: {path: %s, format: json}}
routes:
  - match: echo.test
    passthrough: %s
`, state, https, httpp, metrics, access, up)), 0o644)
	r := startRelayProc(t, "relay", []string{relayctlBin, "serve", "-c", cfg})
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	addr := fmt.Sprintf("127.0.0.1:%d", https)
	connect := func() {
		t.Helper()
		c, err := dialEcho(addr, clientHello(t, "echo.test"))
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	waitLines := func(path string, n int) string {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
			b, _ := os.ReadFile(path)
			if strings.Count(string(b), "\n") >= n {
				return string(b)
			}
		}
		b, _ := os.ReadFile(path)
		t.Fatalf("%s: want %d lines, have:\n%s\nrelay log:\n%s", path, n, b, r.logs.String())
		return ""
	}
	connect()
	if l := waitLines(access, 1); !strings.Contains(l, `"route":"echo.test","action":"passthrough"`) {
		t.Errorf("first line: %s", l)
	}
	if fi, err := os.Stat(access); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("access log mode %v (%v), want 0640", fi.Mode(), err)
	}
	if err := os.Rename(access, access+".1"); err != nil {
		t.Fatal(err)
	}
	if err := r.cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	// The reopen is asynchronous: connect until the new file has a line.
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		connect()
		if b, _ := os.ReadFile(access); len(b) > 0 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("no new %s after SIGUSR1; relay log:\n%s", access, r.logs.String())
		}
	}
	if !strings.Contains(r.logs.String(), "access log reopened") {
		t.Errorf("relay did not log the reopen:\n%s", r.logs.String())
	}
}
