package acme

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	acmeapi "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/challenge/dns01"
	"github.com/relay-gw/relay/internal/metrics"
	"github.com/relay-gw/relay/internal/testutil"
)

// pebbleEnv is a real ACME server (internal/testutil.Pebble) validating
// against test servers that answer from Manager.HTTP01 / Manager.TLSALPN01,
// the interfaces the relay's listeners use.
type pebbleEnv struct {
	*testutil.Pebble
	managers atomic.Pointer[Manager]
}

func startPebble(t *testing.T) *pebbleEnv {
	t.Helper()
	e := &pebbleEnv{}
	httpLn, _ := net.Listen("tcp", "127.0.0.1:0")
	t.Cleanup(func() { httpLn.Close() })
	go http.Serve(httpLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.Host)
		if host == "" {
			host = r.Host
		}
		token := strings.TrimPrefix(r.URL.Path, "/.well-known/acme-challenge/")
		if m := e.managers.Load(); m != nil {
			if ka, ok := m.HTTP01(host, token); ok {
				io.WriteString(w, ka)
				return
			}
		}
		http.NotFound(w, r)
	}))
	tlsLn, _ := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		NextProtos: []string{"acme-tls/1"},
		GetCertificate: func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if m := e.managers.Load(); m != nil {
				if c, ok := m.TLSALPN01(h.ServerName); ok {
					return c, nil
				}
			}
			return nil, fmt.Errorf("no challenge for %s", h.ServerName)
		},
	})
	t.Cleanup(func() { tlsLn.Close() })
	go func() {
		for {
			c, err := tlsLn.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	e.Pebble = testutil.StartPebble(t, httpLn.Addr().(*net.TCPAddr).Port, tlsLn.Addr().(*net.TCPAddr).Port)
	return e
}

// ctsDNS is a DNS-01 provider for tests: TXT records through
// pebble-challtestsrv's management API, plugged in like any lego provider.
type ctsDNS struct{ mgmt string }

func (p ctsDNS) post(path string, body map[string]string) error {
	b, _ := json.Marshal(body)
	resp, err := http.Post(p.mgmt+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("challtestsrv %s: %s", path, resp.Status)
	}
	return nil
}

func (p ctsDNS) Present(domain, _, keyAuth string) error {
	info := dns01.GetChallengeInfo(domain, keyAuth)
	return p.post("/set-txt", map[string]string{"host": info.EffectiveFQDN, "value": info.Value})
}

func (p ctsDNS) CleanUp(domain, _, keyAuth string) error {
	info := dns01.GetChallengeInfo(domain, keyAuth)
	return p.post("/clear-txt", map[string]string{"host": info.EffectiveFQDN})
}

func (e *pebbleEnv) manager(t *testing.T, state string, mod func(*Options)) (*Manager, *metrics.Registry) {
	reg := metrics.NewRegistry()
	o := Options{Email: "admin@relay.test", CA: e.Dir, CARoot: e.CARoot, StateDir: state, Registry: reg,
		DNS: ctsDNS{e.CTSMgmt}, DNSResolvers: []string{e.DNSAddr}}
	if testing.Verbose() {
		o.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	} else {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if mod != nil {
		mod(&o)
	}
	m, err := NewManager(o)
	if err != nil {
		t.Fatal(err)
	}
	e.managers.Store(m)
	return m, reg
}

// verify makes a real TLS handshake against m's certificate for name and
// checks the chain against Pebble's issuing root.
func verify(t *testing.T, m *Manager, name string, roots *x509.CertPool) *x509.Certificate {
	t.Helper()
	ln, _ := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: m.GetCertificate})
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: name, RootCAs: roots})
	if err != nil {
		t.Fatalf("TLS to %s with the ACME certificate: %v", name, err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0]
}

func orders(reg *metrics.Registry, result string) float64 {
	fams, _ := reg.Gather()
	for _, f := range fams {
		if f.Name == "relay_acme_orders_total" {
			for _, s := range f.Series {
				if s.Label("result") == result {
					return s.Value
				}
			}
		}
	}
	return -1
}

func TestACMEWithPebble(t *testing.T) {
	e := startPebble(t)
	roots := e.IssuingRoots(t)
	state := t.TempDir()

	for _, tc := range []struct{ name, challenge string }{
		{"http.relay.test", "http-01"},
		{"alpn.relay.test", "tls-alpn-01"},
		{"dns.relay.test", "dns-01"},
		{"*.wild.relay.test", "dns-01"},
	} {
		t.Run(tc.challenge+" "+tc.name, func(t *testing.T) {
			m, reg := e.manager(t, state, func(o *Options) { o.Challenges = []string{tc.challenge} })
			m.SetNames([]string{tc.name})
			m.CheckNow()
			if orders(reg, "success") != 1 {
				t.Fatalf("orders: success %v failure %v", orders(reg, "success"), orders(reg, "failure"))
			}
			name := tc.name
			if strings.HasPrefix(name, "*.") {
				name = "host" + name[1:]
			}
			leaf := verify(t, m, name, roots)
			if v := m.expiry.WithLabelValues(tc.name, leaf.Issuer.CommonName).Value(); v != float64(leaf.NotAfter.Unix()) {
				t.Errorf("expiry metric %v, want %d", v, leaf.NotAfter.Unix())
			}
			if st := m.loadState(tc.name); st.ARIRenewAt.IsZero() || !st.ARIRenewAt.Before(leaf.NotAfter) || st.ARINextCheck.IsZero() {
				t.Errorf("no ACME renewal info recorded: %+v", st)
			}
			if fi, err := os.Stat(filepath.Join(m.certDir(tc.name), "key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("stored key: %v %v, want 0600", err, fi)
			}
		})
	}

	t.Run("restart reuses stored certificates", func(t *testing.T) {
		m, reg := e.manager(t, state, nil)
		m.SetNames([]string{"http.relay.test", "alpn.relay.test"})
		m.CheckNow()
		if o := orders(reg, "success") + orders(reg, "failure"); o != 0 {
			t.Fatalf("%v orders after restart, want 0 (valid certificates are on disk)", o)
		}
		verify(t, m, "http.relay.test", roots)
	})

	t.Run("renew swaps the certificate without dropping a live connection", func(t *testing.T) {
		m, _ := e.manager(t, state, func(o *Options) { o.Profile = "shortlived" })
		m.SetNames([]string{"http.relay.test"})
		verify(t, m, "http.relay.test", roots)
		ln, _ := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: m.GetCertificate})
		defer ln.Close()
		go func() {
			c, _ := ln.Accept()
			io.Copy(c, c)
		}()
		live, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "http.relay.test", RootCAs: roots})
		if err != nil {
			t.Fatal(err)
		}
		defer live.Close()
		m2, _ := e.manager(t, t.TempDir(), func(o *Options) { o.Profile = "shortlived" })
		m2.SetNames([]string{"short.relay.test"})
		m2.CheckNow()
		first := verify(t, m2, "short.relay.test", roots)
		if d := first.NotAfter.Sub(first.NotBefore); d > 7*24*time.Hour {
			t.Fatalf("shortlived profile gave a %v certificate", d)
		}
		if err := m2.Renew("short.relay.test"); err != nil {
			t.Fatal(err)
		}
		second := verify(t, m2, "short.relay.test", roots)
		if second.SerialNumber.Cmp(first.SerialNumber) == 0 {
			t.Error("renew did not swap the certificate")
		}
		io.WriteString(live, "ping")
		buf := make([]byte, 4)
		if _, err := io.ReadFull(live, buf); err != nil || string(buf) != "ping" {
			t.Errorf("live connection after renew: %q %v", buf, err)
		}
	})

	t.Run("corrupt storage is reported and never overwritten", func(t *testing.T) {
		m, reg := e.manager(t, state, nil)
		p := filepath.Join(m.certDir("alpn.relay.test"), "cert.pem")
		os.WriteFile(p, []byte("-----BEGIN CERTIFICATE-----\nhalf"), 0o644)
		m.SetNames([]string{"alpn.relay.test"})
		m.CheckNow()
		if b, _ := os.ReadFile(p); !strings.HasSuffix(string(b), "half") {
			t.Error("corrupt certificate file was overwritten")
		}
		if orders(reg, "success") != 0 {
			t.Error("ordered over a corrupt stored certificate")
		}
		infos, _ := ListStored(state)
		found := false
		for _, i := range infos {
			if i.Name == "alpn.relay.test" && strings.Contains(i.LastError, "unreadable") {
				found = true
			}
		}
		if !found {
			t.Errorf("ListStored does not report the corrupt file: %+v", infos)
		}
	})
}

// TestACMEFailingCANeverStorms: a CA answering 500/429 gets a bounded
// number of requests, the backoff survives a restart, and a working
// certificate keeps serving.
func TestACMEFailingCANeverStorms(t *testing.T) {
	var hits atomic.Int64
	ca := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.Header().Set("Retry-After", "3600")
		http.Error(w, `{"type":"urn:ietf:params:acme:error:rateLimited","detail":"slow down"}`, http.StatusTooManyRequests)
	}))
	defer ca.Close()
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	os.WriteFile(rootFile, pemCert(ca.Certificate()), 0o644)
	state := t.TempDir()
	mk := func() *Manager {
		m, err := NewManager(Options{Email: "a@relay.test", CA: ca.URL + "/dir", CARoot: rootFile, StateDir: state,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	m := mk()
	m.SetNames([]string{"a.relay.test", "b.relay.test"})
	for i := 0; i < 20; i++ {
		m.CheckNow()
	}
	first := hits.Load()
	if first == 0 || first > 10 {
		t.Fatalf("%d requests for 20 checks of 2 names; want a few, then backoff", first)
	}
	for i := 0; i < 5; i++ { // restarts: backoff is on disk
		m := mk()
		m.SetNames([]string{"a.relay.test", "b.relay.test"})
		m.CheckNow()
	}
	if hits.Load() != first {
		t.Fatalf("restarts sent %d more requests during backoff", hits.Load()-first)
	}
	infos, _ := ListStored(state)
	if len(infos) != 2 || infos[0].LastError == "" || !infos[0].NextRenewal.After(time.Now()) {
		t.Errorf("certs list after failures: %+v", infos)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m.Run(ctx) // returns at once on a done context
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func TestRetryAfter(t *testing.T) {
	rl := func(v string) error {
		return fmt.Errorf("order: %w", &acmeapi.RateLimitedError{ProblemDetails: &acmeapi.ProblemDetails{HTTPStatus: 429}, RetryAfter: v})
	}
	if d := retryAfter(rl("3600")); d != time.Hour {
		t.Errorf("seconds: %v", d)
	}
	if d := retryAfter(rl(time.Now().Add(2 * time.Hour).UTC().Format(http.TimeFormat))); d < 119*time.Minute || d > 2*time.Hour {
		t.Errorf("http date: %v", d)
	}
	if d := retryAfter(fmt.Errorf("other")); d != 0 {
		t.Errorf("no rate limit: %v", d)
	}
	if b := backoff(1); b < time.Minute || b > 75*time.Second {
		t.Errorf("backoff(1) = %v", b)
	}
	if b := backoff(30); b < 24*time.Hour || b > 30*time.Hour {
		t.Errorf("backoff(30) = %v, want capped near 24h", b)
	}
}
