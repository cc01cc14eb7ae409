package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// TestTLSProfile: terminate routes offer Mozilla's intermediate profile:
// no CBC suite on TLS 1.2, TLS 1.3, X25519MLKEM768 chosen when offered.
func TestTLSProfile(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t))
	dial := func(conf *tls.Config) (tls.ConnectionState, error) {
		conf.ServerName, conf.RootCAs = "h1.test", r.ca.pool
		c, err := tls.DialWithDialer(dialer(5*time.Second), "tcp", r.HTTPSAddr().String(), conf)
		if err != nil {
			return tls.ConnectionState{}, err
		}
		defer c.Close()
		return c.ConnectionState(), nil
	}
	cbc := []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA, tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA}
	if _, err := dial(&tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: cbc}); err == nil {
		t.Error("TLS 1.2 with only CBC suites offered: handshake succeeded, want refused")
	}
	st, err := dial(&tls.Config{MaxVersion: tls.VersionTLS12})
	if err != nil || st.CipherSuite != tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 && st.CipherSuite != tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 {
		t.Errorf("TLS 1.2: %s (%v), want an ECDHE AEAD suite", tls.CipherSuiteName(st.CipherSuite), err)
	}
	st, err = dial(&tls.Config{CurvePreferences: []tls.CurveID{tls.X25519, tls.X25519MLKEM768}})
	if err != nil || st.Version != tls.VersionTLS13 || st.CurveID != tls.X25519MLKEM768 {
		t.Errorf("TLS 1.3: version %x group %v (%v), want TLS 1.3 with X25519MLKEM768", st.Version, st.CurveID, err)
	}
}

// TestNoSNIGetsTheRoutesCertificate: a client that sends no server name,
// routed by unknown_sni to a terminate route, gets a certificate for the
// route's name.
func TestNoSNIGetsTheRoutesCertificate(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t), func(c *config.Config) { c.UnknownSNI = "h1.test" })
	c, err := tls.DialWithDialer(dialer(5*time.Second), "tcp", r.HTTPSAddr().String(), &tls.Config{
		InsecureSkipVerify: true, // no name to verify: checked below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := cs.PeerCertificates[0].VerifyHostname("h1.test"); err != nil {
				return err
			}
			return nil
		},
	})
	if err != nil {
		t.Fatalf("handshake without SNI: %v", err)
	}
	c.Close()
}

// TestHSTS: hsts adds Strict-Transport-Security to answers over h1 and h2,
// and leaves an upstream's own.
func TestHSTS(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/own" {
			w.Header().Set("Strict-Transport-Security", "max-age=5")
		}
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	r, _ := h1Relay(t, up.URL, func(c *config.Config) { c.Routes[0].Terminate.HSTS = config.Duration(time.Hour) })
	for _, h2 := range []bool{false, true} {
		tr := h2Transport(r)
		if !h2 {
			tr.ForceAttemptHTTP2 = false
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		for path, want := range map[string]string{"/": "max-age=3600", "/own": "max-age=5"} {
			resp, err := client.Get("https://h1.test" + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := resp.Header.Get("Strict-Transport-Security"); got != want || resp.ProtoMajor != map[bool]int{false: 1, true: 2}[h2] {
				t.Errorf("%s %s: Strict-Transport-Security %q, want %q", resp.Proto, path, got, want)
			}
		}
		tr.CloseIdleConnections()
	}
}

// TestTestSSL: Debian's testssl.sh rates nothing on a terminate route
// VULNERABLE or "potentially VULNERABLE" (protocols, cipher categories,
// vulnerabilities; about a minute).
func TestTestSSL(t *testing.T) {
	bin, err := exec.LookPath("testssl")
	if err != nil {
		t.Skip("testssl not installed (scripts/deps.sh installs testssl.sh)")
	}
	if testing.Short() {
		t.Skip("testssl takes about a minute")
	}
	cfg := baseConfig(config.Route{Match: "localhost", Terminate: &config.Terminate{Upstream: bulkUpstream(t), TLS: config.TLS{Mode: "internal"}}})
	r := startRelay(t, cfg)
	port := strconv.Itoa(r.HTTPSAddr().(*net.TCPAddr).Port)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, bin, "--quiet", "--warnings", "off", "--color", "0", "--ip", "127.0.0.1",
		"-p", "-s", "-U", "localhost:"+port).CombinedOutput()
	t.Logf("testssl -p -s -U: %v", time.Since(start).Round(time.Second))
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("testssl: %v\n%s", err, out)
	}
	bad := regexp.MustCompile(`(?i)vulnerable`)
	notBad := regexp.MustCompile(`(?i)not vulnerable`)
	var found []string
	for _, line := range strings.Split(string(out), "\n") {
		if bad.MatchString(line) && !notBad.MatchString(line) {
			found = append(found, strings.TrimSpace(line))
		}
	}
	if len(found) > 0 || !strings.Contains(string(out), "not vulnerable") {
		t.Fatalf("testssl findings:\n%s\n\nfull output:\n%s", strings.Join(found, "\n"), out)
	}
}
