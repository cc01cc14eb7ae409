package relay

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TestH2FloodClient is the flooding client of BenchmarkH2FloodCPU, run in
// a child process (so that its CPU is not the relay's): it floods
// RELAY_FLOOD_ADDR with RELAY_FLOOD_PATTERN until the connection ends or
// RELAY_FLOOD_SECONDS pass, then prints the rounds written.
func TestH2FloodClient(t *testing.T) {
	addr := os.Getenv("RELAY_FLOOD_ADDR")
	if addr == "" {
		t.Skip("the child process of BenchmarkH2FloodCPU")
	}
	if os.Getenv("RELAY_FLOOD_PATTERN") == "normal" {
		normalClient(t, addr)
		return
	}
	pattern := h2Floods[os.Getenv("RELAY_FLOOD_PATTERN")]
	secs, _ := strconv.Atoi(os.Getenv("RELAY_FLOOD_SECONDS"))
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "h1.test", InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	end := time.Now().Add(time.Duration(secs) * time.Second)
	c.SetDeadline(end)
	w := &h2Flooder{fr: http2.NewFramer(c, nil)}
	w.fr.AllowIllegalWrites = true
	w.enc = hpack.NewEncoder(&w.hbuf)
	io.WriteString(c, http2.ClientPreface)
	w.fr.WriteSettings()
	w.fr.WriteSettingsAck()
	go io.Copy(io.Discard, c) // answers are read, not looked at
	i := 0
	for ; time.Now().Before(end) && i < 1<<30; i++ {
		if pattern(w, i) != nil {
			break
		}
	}
	fmt.Printf("rounds %d\n", i)
}

// normalClient does GETs one after another on one h2 connection for a
// second and prints their latency's p50 and p99 in microseconds.
func normalClient(t *testing.T, addr string) {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{ServerName: "h1.test", InsecureSkipVerify: true},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	get := func() error {
		resp, err := client.Get("https://h1.test/bytes?n=100")
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	get() // the handshake, not timed
	var lat []time.Duration
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		t0 := time.Now()
		if err := get(); err != nil {
			fmt.Printf("error %v\n", err)
			return
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	fmt.Printf("latency %d %d %d\n", lat[len(lat)/2].Microseconds(), lat[len(lat)*99/100].Microseconds(), len(lat))
}

// cpuSeconds of a process (from /proc/PID/stat: utime + stime).
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / 100 // USER_HZ
}

// BenchmarkH2FloodCPU: the CPU-seconds one flooding h2 connection costs
// the relay (until the glitch budget closes it) and HAProxy (which, in
// Debian 12's 2.6, has no such budget: a 5 s flood), per pattern, with
// the flooder in a child process. Run with -benchtime=1x.
func BenchmarkH2FloodCPU(b *testing.B) {
	up := bulkUpstream(b)
	r, _ := h1Relay(b, up)
	self, _ := os.Executable()
	child := func(addr, pattern string, secs int) string {
		cmd := exec.Command(self, "-test.run=^TestH2FloodClient$", "-test.count=1")
		cmd.Env = append(os.Environ(), "RELAY_FLOOD_ADDR="+addr, "RELAY_FLOOD_PATTERN="+pattern, "RELAY_FLOOD_SECONDS="+strconv.Itoa(secs))
		out, _ := cmd.CombinedOutput()
		return string(out)
	}
	run := func(addr, pattern string, secs int) string {
		out := child(addr, pattern, secs)
		if i := strings.Index(out, "rounds "); i >= 0 {
			return strings.Fields(out[i:])[1]
		}
		return "?"
	}
	latency := func(out string) string {
		if i := strings.Index(out, "latency "); i >= 0 {
			f := strings.Fields(out[i:])
			return fmt.Sprintf("p50 %s us, p99 %s us (%s GETs)", f[1], f[2], f[3])
		}
		return "?"
	}
	fmt.Printf("normal client alone: %s\n", latency(child(r.HTTPSAddr().String(), "normal", 1)))
	haproxy := startHAProxy(b, r, up)
	names := make([]string, 0, len(h2Floods))
	for name := range h2Floods {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		b.Run(strings.ReplaceAll(name, " ", "_"), func(b *testing.B) {
			var ru0, ru1 syscall.Rusage
			normal := make(chan string, 1)
			go func() { normal <- child(r.HTTPSAddr().String(), "normal", 1) }()
			time.Sleep(50 * time.Millisecond) // started, handshaken
			syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
			start := time.Now()
			rounds := run(r.HTTPSAddr().String(), name, 10)
			took := time.Since(start)
			syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
			relayCPU := tv(ru1.Utime) + tv(ru1.Stime) - tv(ru0.Utime) - tv(ru0.Stime)
			b.ReportMetric(relayCPU, "relay-cpu-s")
			msg := fmt.Sprintf("%-24s relay: %.3f CPU-s, %s rounds, connection ended after %v; normal client meanwhile: %s", name, relayCPU, rounds, took.Round(time.Millisecond), latency(<-normal))
			if haproxy > 0 {
				c0 := cpuSeconds(haproxy)
				hr := run(haproxyAddr, name, 5)
				hcpu := cpuSeconds(haproxy) - c0
				b.ReportMetric(hcpu, "haproxy-cpu-s")
				msg += fmt.Sprintf("; haproxy 2.6: %.2f CPU-s, %s rounds in 5 s", hcpu, hr)
			}
			b.Log(msg)
		})
	}
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

var haproxyAddr string

// startHAProxy runs haproxy (if installed) with an h2 TLS frontend to up;
// its pid, or 0.
func startHAProxy(b *testing.B, r *testRelay, up string) int {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		b.Log("haproxy not installed: relay figures only")
		return 0
	}
	dir := b.TempDir()
	cert := r.ca.issue("h1.test")
	var pemData []byte
	for _, der := range cert.Certificate {
		pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	kb, _ := x509.MarshalECPrivateKey(cert.PrivateKey.(*ecdsa.PrivateKey))
	pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})...)
	os.WriteFile(filepath.Join(dir, "h1.pem"), pemData, 0o600)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	haproxyAddr = ln.Addr().String()
	ln.Close()
	u, _ := url.Parse(up)
	conf := fmt.Sprintf(`global
  maxconn 1000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind %s ssl crt %s alpn h2,http/1.1
  default_backend be
backend be
  server up %s
`, haproxyAddr, filepath.Join(dir, "h1.pem"), u.Host)
	os.WriteFile(filepath.Join(dir, "haproxy.cfg"), []byte(conf), 0o600)
	cmd := exec.Command(bin, "-db", "-f", filepath.Join(dir, "haproxy.cfg"))
	if err := cmd.Start(); err != nil {
		b.Logf("haproxy: %v", err)
		return 0
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for range 50 {
		if c, err := net.Dial("tcp", haproxyAddr); err == nil {
			c.Close()
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return cmd.Process.Pid
}
