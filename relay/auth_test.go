package relay

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/relay-gw/relay/internal/config"
)

// clientCert issues a client certificate (clientAuth usage) for cn from ca.
func clientCert(t testing.TB, ca *testCA, cn string) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"Home"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func writePEM(t testing.TB, path, typ string, der []byte) string {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// headersUpstream answers with the request headers it got, as JSON.
func headersUpstream(t testing.TB) *httptest.Server {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(r.Header)
	}))
	t.Cleanup(up.Close)
	return up
}

// httpsClient talks to the relay's https port for any name, with h2 or
// HTTP/1.1 only, presenting certs.
func httpsClient(r *testRelay, h2 bool, certs ...tls.Certificate) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: r.ca.pool, Certificates: certs},
		ForceAttemptHTTP2: h2,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer(5*time.Second).DialContext(ctx, "tcp", r.HTTPSAddr().String())
		},
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// seenHeaders GETs url with hdr and decodes the upstream's echo.
func seenHeaders(t testing.TB, c *http.Client, url string, hdr map[string]string) (http.Header, error) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	var h http.Header
	return h, json.NewDecoder(resp.Body).Decode(&h)
}

func TestClientAuthMTLS(t *testing.T) {
	dir := t.TempDir()
	clientCA := newTestCA(t)
	caFile := writePEM(t, filepath.Join(dir, "r20-clients-ca.pem"), "CERTIFICATE", clientCA.cert.Raw)
	alice := clientCert(t, clientCA, "alice")
	sum := sha256.Sum256(alice.Certificate[0])
	wantSum := hex.EncodeToString(sum[:])
	stranger := clientCert(t, newTestCA(t), "mallory") // signed by another CA
	up := headersUpstream(t)
	cfg := baseConfig(
		config.Route{Match: "req.test", Terminate: &config.Terminate{Upstream: up.URL, TLS: config.TLS{Mode: "internal"},
			ClientAuth: &config.ClientAuth{CA: caFile, Required: true}}},
		config.Route{Match: "opt.test", Terminate: &config.Terminate{Upstream: up.URL, TLS: config.TLS{Mode: "internal"},
			ClientAuth: &config.ClientAuth{CA: caFile}}},
		config.Route{Match: "plain.test", Terminate: &config.Terminate{Upstream: up.URL + "/base", TLS: config.TLS{Mode: "internal"}}},
	)
	r := startRelay(t, cfg)
	spoof := map[string]string{hdrClientCertSubject: "CN=admin", hdrClientCertSHA256: "00"}
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			for _, url := range []string{"https://req.test/", "https://opt.test/"} {
				h, err := seenHeaders(t, httpsClient(r, h2, alice), url, spoof)
				if err != nil {
					t.Fatalf("%s with a certificate: %v", url, err)
				}
				if got := h.Values(hdrClientCertSubject); len(got) != 1 || got[0] != "CN=alice,O=Home" {
					t.Errorf("%s: subject %q, want [CN=alice,O=Home]", url, got)
				}
				if got := h.Values(hdrClientCertSHA256); len(got) != 1 || got[0] != wantSum {
					t.Errorf("%s: sha256 %q, want %s", url, got, wantSum)
				}
			}
			if _, err := seenHeaders(t, httpsClient(r, h2), "https://req.test/", nil); err == nil {
				t.Error("required client_auth let a client without a certificate in")
			}
			if _, err := seenHeaders(t, httpsClient(r, h2, stranger), "https://req.test/", nil); err == nil {
				t.Error("a certificate of another CA was accepted")
			}
			for _, url := range []string{"https://opt.test/", "https://plain.test/"} {
				h, err := seenHeaders(t, httpsClient(r, h2), url, spoof)
				if err != nil {
					t.Fatalf("%s without a certificate: %v", url, err)
				}
				if h.Get(hdrClientCertSubject) != "" || h.Get(hdrClientCertSHA256) != "" {
					t.Errorf("%s: the client's own certificate headers reached the upstream: %v", url, h)
				}
			}
		})
	}

	waitFor(t, func() bool { // no certificate, and another CA's, over h1 and h2
		return metricValue(r.metricsText(t), `relay_access_denied_total{reason="client_cert",route="req.test"}`) == 4
	})

	t.Run("curl", func(t *testing.T) {
		if _, err := exec.LookPath("curl"); err != nil {
			t.Skip("curl not installed (scripts/deps.sh installs it)")
		}
		serverCA := writePEM(t, filepath.Join(dir, "r20-server-ca.pem"), "CERTIFICATE", r.ca.cert.Raw)
		certFile := writePEM(t, filepath.Join(dir, "r20-alice.pem"), "CERTIFICATE", alice.Certificate[0])
		keyDER, _ := x509.MarshalPKCS8PrivateKey(alice.PrivateKey)
		keyFile := writePEM(t, filepath.Join(dir, "r20-alice.key"), "PRIVATE KEY", keyDER)
		_, port, _ := net.SplitHostPort(r.HTTPSAddr().String())
		curl := func(args ...string) (string, error) {
			base := []string{"-sS", "--max-time", "20", "--cacert", serverCA, "--resolve", "req.test:" + port + ":127.0.0.1",
				"-H", hdrClientCertSubject + ": CN=admin"}
			out, err := exec.Command("curl", append(append(base, args...), "https://req.test:"+port+"/")...).CombinedOutput()
			return string(out), err
		}
		out, err := curl("--cert", certFile, "--key", keyFile)
		if err != nil {
			t.Fatalf("curl --cert: %v: %s", err, out)
		}
		var h http.Header
		if err := json.Unmarshal([]byte(out), &h); err != nil || h.Get(hdrClientCertSubject) != "CN=alice,O=Home" || h.Get(hdrClientCertSHA256) != wantSum {
			t.Errorf("curl --cert: upstream saw %s", out)
		}
		if out, err := curl(); err == nil {
			t.Errorf("curl without a certificate got through: %s", out)
		}
	})
}

func TestBasicAuth(t *testing.T) {
	htpasswdBin, err := exec.LookPath("htpasswd")
	if err != nil {
		t.Skip("htpasswd not installed (scripts/deps.sh installs apache2-utils)")
	}
	dir := t.TempDir()
	users := filepath.Join(dir, "r20-htpasswd")
	// Debian's htpasswd -B (bcrypt), and one line from Go's bcrypt.
	if out, err := exec.Command(htpasswdBin, "-B", "-c", "-b", users, "alice", "s3cret").CombinedOutput(); err != nil {
		t.Fatalf("htpasswd: %v: %s", err, out)
	}
	bob, _ := bcrypt.GenerateFromPassword([]byte("hunter2"), bcrypt.MinCost)
	f, _ := os.OpenFile(users, os.O_APPEND|os.O_WRONLY, 0)
	fmt.Fprintf(f, "bob:%s\n", bob)
	f.Close()
	up := headersUpstream(t)
	cfg := baseConfig(config.Route{Match: "ba.test", Terminate: &config.Terminate{Upstream: up.URL, TLS: config.TLS{Mode: "internal"},
		BasicAuth: &config.BasicAuth{UsersFile: users}}})
	r := startRelay(t, cfg)
	status := func(c *http.Client, user, pass string) (int, http.Header) {
		t.Helper()
		req, _ := http.NewRequest("GET", "https://ba.test/", nil)
		if user != "" {
			req.SetBasicAuth(user, pass)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header
	}
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			c := httpsClient(r, h2)
			code, h := status(c, "", "")
			if code != 401 || h.Get("WWW-Authenticate") != `Basic realm="ba.test", charset="UTF-8"` {
				t.Errorf("no credentials: %d %q", code, h.Get("WWW-Authenticate"))
			}
			for _, tc := range []struct {
				user, pass string
				want       int
			}{{"alice", "s3cret", 200}, {"alice", "s3cret", 200}, {"bob", "hunter2", 200}, {"alice", "wrong", 401}, {"nobody", "s3cret", 401}, {"bob", "", 401}} {
				if code, _ := status(c, tc.user, tc.pass); code != tc.want {
					t.Errorf("%s:%s: %d, want %d", tc.user, tc.pass, code, tc.want)
				}
			}
		})
	}
	// A 401 to a bodiless HTTP/1.1 request keeps the connection: the
	// browser's retry with credentials needs no new handshake.
	var dials atomic.Int32
	kc := httpsClient(r, false)
	kc.Transport.(*http.Transport).DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		dials.Add(1)
		return dialer(5*time.Second).DialContext(ctx, "tcp", r.HTTPSAddr().String())
	}
	if code, _ := status(kc, "", ""); code != 401 {
		t.Fatalf("no credentials: %d", code)
	}
	if code, _ := status(kc, "alice", "s3cret"); code != 200 || dials.Load() != 1 {
		t.Errorf("after a 401: %d over %d connections, want 200 over 1", code, dials.Load())
	}

	// The file is read again when it changes: carol is added, alice removed.
	if out, err := exec.Command(htpasswdBin, "-B", "-b", users, "carol", "pw").CombinedOutput(); err != nil {
		t.Fatalf("htpasswd: %v: %s", err, out)
	}
	if out, err := exec.Command(htpasswdBin, "-D", users, "alice").CombinedOutput(); err != nil {
		t.Fatalf("htpasswd -D: %v: %s", err, out)
	}
	c := httpsClient(r, false)
	waitFor(t, func() bool { code, _ := status(c, "carol", "pw"); return code == 200 })
	if code, _ := status(c, "alice", "s3cret"); code != 401 {
		t.Errorf("a removed user still gets in: %d", code)
	}
	// A broken file keeps the last good one.
	os.WriteFile(users, []byte("carol:$apr1$notbcrypt\n"), 0o600)
	time.Sleep(1100 * time.Millisecond) // past the once-a-second check
	if code, _ := status(c, "carol", "pw"); code != 200 {
		t.Errorf("an invalid users file replaced the good one: %d", code)
	}
	if v := metricValue(r.metricsText(t), `relay_access_denied_total{reason="basic_auth",route="ba.test"}`); v < 8 {
		t.Errorf("basic_auth denials = %v, want >= 8", v)
	}
}

// authServer behaves as Authelia's /api/verify does: 200 with Remote-User
// and Remote-Groups for a valid session cookie, else 302 to its login page
// with the original URL in rd.
func authServer(t testing.TB, seen chan<- http.Header) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case seen <- r.Header.Clone():
		default:
		}
		if c, err := r.Cookie("session"); err == nil && c.Value == "good" {
			w.Header().Set("Remote-User", "alice")
			w.Header().Set("Remote-Groups", "admins")
			w.WriteHeader(http.StatusOK)
			return
		}
		rd := r.Header.Get("X-Forwarded-Proto") + "://" + r.Header.Get("X-Forwarded-Host") + r.Header.Get("X-Forwarded-Uri")
		w.Header().Set("Set-Cookie", "auth_flow=1; Secure")
		http.Redirect(w, r, "https://auth.test/?rd="+rd, http.StatusFound)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestForwardAuth(t *testing.T) {
	seen := make(chan http.Header, 64)
	auth := authServer(t, seen)
	upCalls := make(chan string, 64)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		upCalls <- r.URL.Path
		if r.Header.Get("Upgrade") == "websocket" {
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n%s\n", r.Header.Get("Remote-User"))
			brw.Flush()
			return
		}
		json.NewEncoder(w).Encode(r.Header)
	}))
	defer up.Close()
	cfg := baseConfig(config.Route{Match: "fa.test", Terminate: &config.Terminate{Upstream: up.URL, TLS: config.TLS{Mode: "internal"},
		ForwardAuth: &config.ForwardAuth{URL: auth.URL + "/api/verify", CopyHeaders: []string{"Remote-User", "remote-groups"}}}})
	r := startRelay(t, cfg)
	drain := func() {
		for len(seen) > 0 {
			<-seen
		}
	}
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			c := httpsClient(r, h2)
			drain()
			// No session: the auth server's 302 to its login page goes
			// back as it is, and the upstream sees nothing.
			resp, err := c.Get("https://fa.test/app?x=1")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if h2 != (resp.ProtoMajor == 2) {
				t.Errorf("client spoke %s", resp.Proto)
			}
			if resp.StatusCode != 302 || resp.Header.Get("Location") != "https://auth.test/?rd=https://fa.test/app?x=1" ||
				resp.Header.Get("Set-Cookie") != "auth_flow=1; Secure" || !strings.Contains(string(body), "Found") {
				t.Errorf("no session: %d %v %q", resp.StatusCode, resp.Header, body)
			}
			select {
			case p := <-upCalls:
				t.Fatalf("the upstream got %s without a session", p)
			default:
			}
			h := <-seen
			for k, want := range map[string]string{"X-Forwarded-Method": "GET", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "fa.test",
				"X-Forwarded-Uri": "/app?x=1", "X-Forwarded-For": "127.0.0.1"} {
				if got := h.Get(k); got != want {
					t.Errorf("auth server got %s %q, want %q", k, got, want)
				}
			}

			// A session: through, with the auth server's headers (the
			// client's own Remote-User is not trusted).
			got, err := seenHeaders(t, c, "https://fa.test/app", map[string]string{"Cookie": "session=good", "Remote-User": "root"})
			if err != nil {
				t.Fatal(err)
			}
			if got.Values("Remote-User")[0] != "alice" || len(got.Values("Remote-User")) != 1 || got.Get("Remote-Groups") != "admins" {
				t.Errorf("upstream saw Remote-User %q Remote-Groups %q", got.Values("Remote-User"), got.Get("Remote-Groups"))
			}
			<-upCalls
		})
	}
	t.Run("websocket", func(t *testing.T) {
		upgrade := func(cookie string) (*http.Response, *bufio.Reader) {
			c, err := r.dialTLS(t, "fa.test", r.ca.pool, "http/1.1")
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(20 * time.Second))
			fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: fa.test\r\nCookie: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", cookie)
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			return resp, br
		}
		if resp, _ := upgrade("session=bad"); resp.StatusCode != 302 {
			t.Errorf("upgrade without a session: %d, want the auth server's 302", resp.StatusCode)
		}
		resp, br := upgrade("session=good")
		if resp.StatusCode != 101 {
			t.Fatalf("upgrade with a session: %d", resp.StatusCode)
		}
		if line, _ := br.ReadString('\n'); line != "alice\n" {
			t.Errorf("upstream's Remote-User over the upgrade: %q", line)
		}
	})
	m := r.metricsText(t)
	if v := metricValue(m, `relay_access_denied_total{reason="forward_auth",route="fa.test"}`); v != 3 {
		t.Errorf("forward_auth denials = %v, want 3", v)
	}
}

func TestForwardAuthDown(t *testing.T) {
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := dead.Addr().String()
	dead.Close()
	up := headersUpstream(t)
	cfg := baseConfig(config.Route{Match: "fa.test", Terminate: &config.Terminate{Upstream: up.URL, TLS: config.TLS{Mode: "internal"},
		ForwardAuth: &config.ForwardAuth{URL: "http://" + addr + "/verify"}}})
	r := startRelay(t, cfg)
	resp, err := httpsClient(r, false).Get("https://fa.test/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("auth server down: %d, want 502 (closed, not open)", resp.StatusCode)
	}
}
