package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/metrics"
	"github.com/relay-gw/relay/relay"
)

// TestStatusPage drives traffic through passthrough, terminate and reject
// routes, opens the status page in headless Chromium and checks that the
// numbers it shows are those of /status and /metrics. With
// RELAY_STATUS_SCREENSHOT=FILE it saves the page there (docs/status.png).
func TestStatusPage(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium not installed (Debian package chromium; scripts/deps.sh installs it)")
	}
	dir := t.TempDir()
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{selfSignedForTest(t, "nas.test")}})
	if err != nil {
		t.Fatal(err)
	}
	defer upLn.Close()
	go http.Serve(upLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "nas") }))
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer appLn.Close()
	go http.Serve(appLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, strings.Repeat("x", 10000))
	}))
	https, httpp, mport := freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir: %s
listen: {https: "127.0.0.1:%d", http: "127.0.0.1:%d", metrics: "127.0.0.1:%d"}
steer: {pin_dir: %s}
unknown_sni: reject
routes:
  - match: nas.test
    passthrough: [%s, "127.0.0.1:1"]
  - match: app.test
    terminate: {upstream: "http://%s", tls: internal}
  - match: old.test
    reject: true
`, filepath.Join(dir, "state"), https, httpp, mport, filepath.Join(dir, "no-pins"), upLn.Addr(), appLn.Addr())), 0o644)
	envv := map[string]string{"RELAY_STEERING_STATE": filepath.Join(dir, "steering.json")}
	cmd := exec.Command(relayctlBin, "serve", "-c", cfg)
	cmd.Env = append(os.Environ(), "RELAY_STEERING_STATE="+envv["RELAY_STEERING_STATE"])
	var logs syncBuffer
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
	base := fmt.Sprintf("http://127.0.0.1:%d", mport)
	waitHTTP(t, base+"/metrics")

	// Traffic: passthrough (round-robin: every other dial meets the dead
	// upstream first and fails over), terminate, reject.
	relayAddr := fmt.Sprintf("127.0.0.1:%d", https)
	for i := 0; i < 6; i++ {
		c, err := tls.Dial("tcp", relayAddr, &tls.Config{ServerName: "nas.test", InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("passthrough: %v", err)
		}
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: nas.test\r\nConnection: close\r\n\r\n")
		io.ReadAll(c)
		c.Close()
	}
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", relayAddr)
		},
	}}
	for i := 0; i < 10; i++ {
		resp, err := client.Get("https://app.test/")
		if err != nil {
			t.Fatalf("terminate: %v", err)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	for i := 0; i < 3; i++ {
		if c, err := tls.Dial("tcp", relayAddr, &tls.Config{ServerName: "old.test", InsecureSkipVerify: true}); err == nil {
			c.Close()
			t.Error("reject route: handshake succeeded")
		}
	}
	if c, err := net.Dial("tcp", relayAddr); err == nil { // not TLS: a ClientHello error
		io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
		io.ReadAll(c)
		c.Close()
	}
	// Let the relay close everything and take a per-second sample.
	waitFor(t, func() bool {
		st := getStatus(t, base)
		return st.Process.ActiveConnections == 0 && sum(routeOf(t, st, "app.test").ConnectionsPerSecond) > 0
	})

	page := fetch(t, base+"/")
	if len(page) > 30<<10 {
		t.Errorf("status page is %d bytes, budget 30 KiB", len(page))
	}
	if m := regexp.MustCompile(`(?i)(src|href)\s*=|@import|url\(`).FindString(page); m != "" {
		t.Errorf("status page loads an external asset: %q", m)
	}

	// The page as Chromium renders it after its first fetch of /status.
	dom := runChromium(t, chromium, dir, base+"/", "--dump-dom")
	if !strings.Contains(dom, "data-updated=") {
		t.Fatalf("the page never rendered /status:\n%s", dom)
	}
	shown := map[string]string{}
	for _, m := range regexp.MustCompile(`data-k="([^"]*)" data-v="([^"]*)"`).FindAllStringSubmatch(dom, -1) {
		shown[m[1]] = m[2]
	}
	st := getStatus(t, base)
	fams := scrapeFamilies(t, base)
	metricSum := func(name, route, label, value string) float64 {
		var v float64
		for _, s := range fams[name] {
			if s.Label("route") == route && (label == "" || s.Label(label) == value) {
				v += s.Value
			}
		}
		return v
	}
	for _, route := range []string{"nas.test", "app.test", "old.test", "unknown"} {
		r := routeOf(t, st, route)
		for _, c := range []struct {
			key          string
			status, prom float64
		}{
			{"connections_total", r.Connections, metricSum("relay_connections_total", route, "", "")},
			{"active_connections", r.ActiveConnections, metricSum("relay_active_connections", route, "", "")},
			{"bytes_upstream_total", r.BytesUpstream, metricSum("relay_bytes_total", route, "direction", "upstream")},
			{"bytes_downstream_total", r.BytesDownstream, metricSum("relay_bytes_total", route, "direction", "downstream")},
			{"upstream_errors_total", r.UpstreamErrors, metricSum("relay_upstream_errors_total", route, "", "")},
		} {
			k := "route." + route + "." + c.key
			if c.status != c.prom {
				t.Errorf("%s: /status %v, /metrics %v", k, c.status, c.prom)
			}
			if got := shown[k]; got != strconv.FormatFloat(c.status, 'f', -1, 64) {
				t.Errorf("%s: page shows %q, /status %v", k, got, c.status)
			}
		}
	}
	if n := routeOf(t, st, "app.test").Connections; n != 10 {
		t.Errorf("app.test: %v connections, want 10", n)
	}
	if n := routeOf(t, st, "old.test").Connections; n != 3 {
		t.Errorf("old.test: %v connections, want 3", n)
	}
	if r := routeOf(t, st, "nas.test"); r.Connections != 6 || len(r.Upstreams) != 2 || r.Upstreams[1].LastError == nil {
		t.Errorf("nas.test: %+v; want 6 connections and the dead upstream's last error", r)
	}
	if v := shown["clienthello.not_tls"]; v != "1" || st.ClientHelloErrors["not_tls"] != 1 {
		t.Errorf("clienthello not_tls: page %q, /status %v, want 1", v, st.ClientHelloErrors["not_tls"])
	}
	if v, want := shown["process.max_open_files"], fams["process_max_fds"][0].Value; v != strconv.FormatFloat(want, 'f', -1, 64) {
		t.Errorf("max open files: page %q, /metrics %v", v, want)
	}
	if len(st.Certificates) != 1 || st.Certificates[0].Name != "app.test" {
		t.Errorf("certificates: %+v", st.Certificates)
	}

	// stats --json prints the same document.
	code, out, errs := runCLI(t, envv, "stats", "-c", cfg, "--json")
	var js relay.Status
	if err := json.Unmarshal([]byte(out), &js); code != 0 || err != nil || len(js.Routes) != len(st.Routes) || js.Version == "" {
		t.Errorf("stats --json: exit %d, %v\n%s\n%s", code, err, out, errs)
	}

	shot := os.Getenv("RELAY_STATUS_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(dir, "status.png")
	} else if shot, err = filepath.Abs(shot); err != nil {
		t.Fatal(err)
	}
	runChromium(t, chromium, dir, base+"/", "--screenshot="+shot, "--window-size=1400,900", "--hide-scrollbars")
	if fi, err := os.Stat(shot); err != nil || fi.Size() < 10000 {
		t.Errorf("screenshot %s: %v", shot, err)
	}
}

func runChromium(t *testing.T, chromium, dir, url string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	a := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--user-data-dir=" + filepath.Join(dir, "chromium"), "--virtual-time-budget=4000"}, args...)
	cmd := exec.CommandContext(ctx, chromium, append(a, url)...)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, stderr.String())
	}
	return string(out)
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if ok() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("timed out")
}

func fetch(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	return string(b)
}

func getStatus(t *testing.T, base string) *relay.Status {
	t.Helper()
	var st relay.Status
	if err := json.Unmarshal([]byte(fetch(t, base+"/status")), &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

func scrapeFamilies(t *testing.T, base string) map[string][]metrics.Series {
	t.Helper()
	fams, err := metrics.Parse(strings.NewReader(fetch(t, base+"/metrics")))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]metrics.Series{}
	for _, f := range fams {
		out[f.Name] = f.Series
	}
	return out
}

func routeOf(t *testing.T, st *relay.Status, match string) relay.RouteStatus {
	t.Helper()
	for _, r := range st.Routes {
		if r.Match == match {
			return r
		}
	}
	t.Fatalf("no route %s in /status", match)
	return relay.RouteStatus{}
}

func sum(v []float64) float64 {
	var s float64
	for _, x := range v {
		s += x
	}
	return s
}
