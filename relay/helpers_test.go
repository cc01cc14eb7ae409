package relay

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// testCA is a throwaway CA issuing leaves for any name, standing in for
// acme/'s internal CA so relay tests stay independent of it.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
	mu   sync.Mutex
	leaf map[string]*tls.Certificate
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "relay test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool, leaf: map[string]*tls.Certificate{}}
}

func (ca *testCA) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return ca.issue(hello.ServerName), nil
}

func (ca *testCA) issue(name string) *tls.Certificate {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if c, ok := ca.leaf[name]; ok {
		return c
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		panic(err)
	}
	c := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	ca.leaf[name] = c
	return c
}

// tlsUpstream starts a TLS server on loopback whose every connection is
// handled by h after the handshake.
func tlsUpstream(t testing.TB, ca *testCA, h func(c *tls.Conn)) string {
	t.Helper()
	ln := listenLoopback(t)
	conf := &tls.Config{GetCertificate: ca.GetCertificate}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := tls.Server(c, conf)
				if tc.Handshake() != nil {
					return
				}
				h(tc)
			}()
		}
	}()
	return ln.Addr().String()
}

func listenLoopback(t testing.TB) net.Listener {
	t.Helper()
	ln, err := listenConfig().Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// baseConfig returns a valid config with test-friendly limits.
func baseConfig(routes ...config.Route) *config.Config {
	cfg := &config.Config{
		StateDir:   os.TempDir(),
		UnknownSNI: "reject",
		Listen:     config.Listen{HTTPS: "127.0.0.1:0", HTTP: "127.0.0.1:0", Metrics: "127.0.0.1:0"},
		Routes:     routes,
	}
	cfg.ApplyDefaults()
	return cfg
}

type testRelay struct {
	*Server
	cancel context.CancelFunc
	done   chan error
	ca     *testCA // certificates of terminate routes
}

// startRelay runs a relay with cfg until the test ends.
func startRelay(t testing.TB, cfg *config.Config, mod ...func(*Options)) *testRelay {
	t.Helper()
	ca := newTestCA(t)
	opts := Options{
		Config: cfg,
		Certs:  func(*config.Route) (CertSource, error) { return ca, nil },
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if testing.Verbose() {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	for _, m := range mod {
		m(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tr := &testRelay{Server: s, cancel: cancel, done: make(chan error, 1), ca: ca}
	go func() { tr.done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-tr.done:
		case <-time.After(20 * time.Second):
			t.Error("relay did not stop within 20s of cancel")
		}
	})
	return tr
}

// stopWithin cancels the relay (SIGTERM) and fails unless Serve returns,
// without error, within d.
func (r *testRelay) stopWithin(t testing.TB, d time.Duration) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil && !errors.Is(err, net.ErrClosed) {
			t.Fatal(err)
		}
	case <-time.After(d):
		t.Fatalf("Serve did not return within %v of cancel", d)
	}
	r.done <- nil // for the cleanup
}

// dialTLS connects to the relay's https port with SNI name, trusting roots.
func (r *testRelay) dialTLS(t testing.TB, name string, roots *x509.CertPool, alpn ...string) (*tls.Conn, error) {
	t.Helper()
	d := dialer(5 * time.Second)
	c, err := tls.DialWithDialer(d, "tcp", r.HTTPSAddr().String(), &tls.Config{
		ServerName: name,
		RootCAs:    roots,
		NextProtos: alpn,
	})
	if err == nil {
		// Closed before the relay stops (cleanups run last-in first-out), so
		// a test that forgets never makes the relay wait out its drain.
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// metricsText scrapes /metrics.
func (r *testRelay) metricsText(t testing.TB) string {
	t.Helper()
	resp, err := http.Get("http://" + r.MetricsAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// metricValue returns the value of the series whose line starts with
// series (name{labels}), or -1.
func metricValue(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			var v float64
			if _, err := fmt.Sscan(rest, &v); err == nil {
				return v
			}
		}
	}
	return -1
}

// clientHello returns the bytes of a real crypto/tls ClientHello.
func clientHello(t testing.TB, name string, alpn ...string) []byte {
	t.Helper()
	a, b := net.Pipe()
	go func() {
		tls.Client(a, &tls.Config{ServerName: name, NextProtos: alpn, InsecureSkipVerify: true}).Handshake()
		a.Close()
	}()
	var buf bytes.Buffer
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		t.Fatal(err)
	}
	b.Close()
	buf.Write(hdr)
	buf.Write(body)
	return buf.Bytes()
}

func mustAP(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
