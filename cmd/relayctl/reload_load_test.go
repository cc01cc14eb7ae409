package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestReloadUnderLoad: 100 SIGHUP reloads alternating two configs that
// differ in routes, while 1,000 connections move data and a client opens
// 100 new connections a second: nothing dropped, nothing corrupted, and
// after each reload exactly the routes of the new config are served.
func TestReloadUnderLoad(t *testing.T) {
	const reloads = 100
	dir, state := restartDir(t)
	up := echoUpstream(t)
	https, httpp, metrics := freePort(t), freePort(t), freePort(t)
	conf := func(only string) []byte {
		return []byte(fmt.Sprintf(`
state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
unknown_sni: reject
routes:
  - match: echo.test
    passthrough: %s
  - match: %s
    passthrough: %s
`, state, https, httpp, metrics, up, only, up))
	}
	cfg := filepath.Join(dir, "relay.yaml")
	write := func(only string) {
		tmp := cfg + ".tmp"
		if err := os.WriteFile(tmp, conf(only), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, cfg); err != nil { // atomic: the file watch never reads half a file
			t.Fatal(err)
		}
	}
	write("only-x.test")
	addr := fmt.Sprintf("127.0.0.1:%d", https)
	hello := clientHello(t, "echo.test")
	helloFor := map[string][]byte{"only-x.test": clientHello(t, "only-x.test"), "only-y.test": clientHello(t, "only-y.test")}

	r := startRelayProc(t, "relay", []string{relayctlBin, "serve", "-c", cfg})
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))
	long := openLongConns(t, tcpDialer(addr), hello, longConnCount, 100*time.Millisecond)
	defer long.closeAll()
	fresh := startNewConns(tcpDialer(addr), hello, 10*time.Millisecond)

	served := func(name string) bool {
		c, err := dialEcho(addr, helloFor[name])
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	for i := 1; i <= reloads; i++ {
		now, gone := "only-y.test", "only-x.test"
		if i%2 == 0 {
			now, gone = gone, now
		}
		write(now)
		if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for !served(now) {
			if time.Now().After(deadline) || r.exited() {
				t.Fatalf("reload %d: route %s not served within 30s", i, now)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if served(gone) {
			t.Fatalf("reload %d: route %s of the previous config still served", i, gone)
		}
		time.Sleep(30 * time.Millisecond) // let data move between reloads
	}
	fresh.finish()
	rounds := long.rounds.Load()
	long.finish()
	ok, _ := strconv.Atoi(metricValue(t, metrics, `relay_config_reloads_total{result="success"}`))
	failed := metricValue(t, metrics, `relay_config_reloads_total{result="failure"}`)
	t.Logf("%d reloads counted (SIGHUP and file watch), %s failed; long connections: %d, %d exchanges; new connections: %d ok",
		ok, failed, longConnCount, rounds, fresh.ok.Load())
	long.fail.check(t, "long connections")
	fresh.fail.check(t, "new connections")
	if ok < reloads || failed != "0" {
		t.Errorf("relay_config_reloads_total: success %d (want >= %d), failure %s (want 0)", ok, reloads, failed)
	}
}
