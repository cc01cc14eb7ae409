package relay

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/relay-gw/relay/internal/config"
)

// Headers the relay sets from a verified client certificate; a client's
// own copies never reach the upstream.
const (
	hdrClientCertSubject = "X-Client-Cert-Subject"
	hdrClientCertSHA256  = "X-Client-Cert-Sha256"
)

// Reasons of relay_access_denied_total for terminate routes' checks.
const (
	deniedClientCert  = "client_cert"
	deniedBasicAuth   = "basic_auth"
	deniedForwardAuth = "forward_auth"
)

// certRefused counts a handshake that client_auth failed: no certificate
// where one is required, or one that does not verify against the CA.
func (s *Server) certRefused(rt *route, err error) bool {
	if rt.term.tlsConf.ClientCAs == nil {
		return false
	}
	var cve *tls.CertificateVerificationError
	// crypto/tls has no error value for a missing certificate, only this text.
	if errors.As(err, &cve) || strings.Contains(err.Error(), "didn't provide a certificate") {
		s.m.accessDenied.WithLabelValues(rt.label, deniedClientCert).Inc()
		return true
	}
	return false
}

// routeAuth is what a terminate route checks on every request: HTTP basic
// credentials and a forward-auth server. nil = nothing.
type routeAuth struct {
	s     *Server
	label string
	basic *htpasswd
	fwd   *forwardAuth
}

// clientAuthConfig adds client_auth (mTLS) to a terminate route's TLS
// config.
func clientAuthConfig(conf *tls.Config, ca *config.ClientAuth) error {
	if ca == nil {
		return nil
	}
	pem, err := os.ReadFile(ca.CA)
	if err != nil {
		return fmt.Errorf("read client_auth.ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("client_auth.ca %s: no PEM certificates in it", ca.CA)
	}
	conf.ClientCAs = pool
	conf.ClientAuth = tls.VerifyClientCertIfGiven
	if ca.Required {
		conf.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return nil
}

// newRouteAuth builds basic_auth and forward_auth of a terminate route;
// nil when it has neither.
func (s *Server) newRouteAuth(label string, t *config.Terminate) (*routeAuth, error) {
	if t.BasicAuth == nil && t.ForwardAuth == nil {
		return nil, nil
	}
	a := &routeAuth{s: s, label: label}
	if b := t.BasicAuth; b != nil {
		a.basic = &htpasswd{path: b.UsersFile, realm: label, log: s.log}
		if err := a.basic.load(); err != nil {
			return nil, err
		}
	}
	if f := t.ForwardAuth; f != nil {
		u, err := url.Parse(f.URL)
		if err != nil {
			return nil, fmt.Errorf("forward_auth.url: %w", err)
		}
		a.fwd = &forwardAuth{url: u, copy: f.CopyHeaders, client: &http.Client{
			Timeout: 10 * time.Second,
			// The auth server's redirect (to its login page) is the
			// client's to follow, not ours.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
			Transport: &http.Transport{
				DialContext:         dialer(5 * time.Second).DialContext,
				MaxIdleConnsPerHost: 16,
				IdleConnTimeout:     90 * time.Second,
				DisableCompression:  true,
			},
		}}
	}
	return a, nil
}

// denial is an answer that replaces the upstream's.
type denial struct {
	code   int
	header http.Header
	body   []byte
	result string // for the access log: access_denied or upstream_error
	reason string
}

// check runs a request through the route's checks: the certificate
// headers are set (from cs) or removed, then basic auth, then forward auth.
// nil lets the request through (with forward auth's headers copied in).
func (a *routeAuth) check(req *http.Request, cs *tls.ConnectionState, client string) *denial {
	delete(req.Header, hdrClientCertSubject)
	delete(req.Header, hdrClientCertSHA256)
	if cs != nil && len(cs.PeerCertificates) > 0 && len(cs.VerifiedChains) > 0 {
		c := cs.PeerCertificates[0]
		sum := sha256.Sum256(c.Raw)
		req.Header[hdrClientCertSubject] = []string{c.Subject.String()}
		req.Header[hdrClientCertSHA256] = []string{hex.EncodeToString(sum[:])}
	}
	if a == nil {
		return nil
	}
	if a.basic != nil && !a.basic.allows(req) {
		a.s.m.accessDenied.WithLabelValues(a.label, deniedBasicAuth).Inc()
		h := http.Header{}
		h.Set("WWW-Authenticate", `Basic realm="`+a.basic.realm+`", charset="UTF-8"`)
		h.Set("Content-Type", "text/plain; charset=utf-8")
		return &denial{code: http.StatusUnauthorized, header: h, body: []byte("401 unauthorized\n"), result: resultAccessDenied, reason: deniedBasicAuth}
	}
	if a.fwd != nil {
		d, err := a.fwd.ask(req, client)
		if err != nil {
			a.s.upstreamError(a.label, "forward_auth")
			a.s.log.Warn("forward auth", "route", a.label, "url", a.fwd.url.Redacted(), "err", err)
			return &denial{code: http.StatusBadGateway, header: http.Header{}, result: resultUpstreamError, reason: "forward_auth"}
		}
		if d != nil {
			a.s.m.accessDenied.WithLabelValues(a.label, deniedForwardAuth).Inc()
			d.result, d.reason = resultAccessDenied, deniedForwardAuth
			return d
		}
	}
	return nil
}

// authorizeH1 checks a request of the relay's HTTP/1 proxy loop before
// its upstream round trip. A refused request (ok false) has been answered;
// keep says the connection may serve the next request (the refused one
// had no body, which would still be unread).
func (s *Server) authorizeH1(h *h1Conn, req *http.Request) (ok, keep bool) {
	rt := h.cc.route.term
	var cs *tls.ConnectionState
	if rt.tlsConf.ClientCAs != nil { // only mTLS routes have certificates to forward
		st := h.tc.ConnectionState()
		cs = &st
	}
	d := rt.auth.check(req, cs, clientHost(h.cc.RemoteAddr()))
	if d == nil {
		return true, false
	}
	h.status, h.result, h.reason = d.code, d.result, d.reason
	h.startFinal()
	keep = req.Body == http.NoBody && !req.Close && req.ProtoAtLeast(1, 1) && !s.term().draining.Load()
	bw := getWriter(h.w)
	defer putWriter(bw)
	fmt.Fprintf(bw, "HTTP/1.1 %d %s\r\n", d.code, http.StatusText(d.code))
	removeHopByHop(d.header)
	d.header.Del("Content-Length")
	d.header.Write(bw)
	fmt.Fprintf(bw, "Content-Length: %d\r\n", len(d.body))
	if !keep {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	if req.Method != http.MethodHead {
		bw.Write(d.body)
	}
	return false, keep && bw.Flush() == nil
}

// authorizeHTTP is authorizeH1 for a handler's request (h2 streams, and
// terminate routes served by net/http); false: answered on w.
func (s *Server) authorizeHTTP(w http.ResponseWriter, req *http.Request, rt *route) bool {
	var ra net.Addr
	if ap, err := netip.ParseAddrPort(req.RemoteAddr); err == nil {
		ra = net.TCPAddrFromAddrPort(ap)
	}
	d := rt.term.auth.check(req, req.TLS, clientHost(ra))
	if d == nil {
		return true
	}
	noteResult(w, d.result, d.reason)
	removeHopByHop(d.header)
	d.header.Del("Content-Length")
	copyHeader(w.Header(), d.header)
	w.Header().Set("Content-Length", strconv.Itoa(len(d.body)))
	w.WriteHeader(d.code)
	if req.Method != http.MethodHead {
		w.Write(d.body)
	}
	return false
}

// authorizeH2 is authorizeHTTP for a stream of the relay's h2 server.
func (s *Server) authorizeH2(c *h2Conn, w http.ResponseWriter, req *http.Request) bool {
	return s.authorizeHTTP(w, req, c.cc.route)
}

func clientHost(a net.Addr) string {
	if a == nil {
		return ""
	}
	h, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return h
}

// htpasswd is a basic_auth users file of bcrypt hashes, read again when
// its size or modification time changes (checked at most once a second).
type htpasswd struct {
	path  string
	realm string
	log   *slog.Logger

	users   atomic.Pointer[htUsers]
	checked atomic.Int64 // unix nanoseconds of the last stat

	mu sync.Mutex // one reload at a time
}

type htUsers struct {
	hash    map[string]string
	dummy   []byte // one of the hashes, checked for unknown users
	mod     time.Time
	size    int64
	okCache sync.Map // sha256(user, password, hash) → struct{}: bcrypt runs once per credential
	cached  atomic.Int32
}

// htCacheMax bounds the verified-credential cache (per file version).
const htCacheMax = 1024

// dummyHash is checked for an unknown user of an empty file.
var dummyHash = sync.OnceValue(func() []byte {
	h, _ := bcrypt.GenerateFromPassword([]byte("relay-dummy"), bcrypt.DefaultCost)
	return h
})

func (h *htpasswd) load() error {
	fi, err := os.Stat(h.path)
	if err != nil {
		return fmt.Errorf("basic_auth.users_file: %w", err)
	}
	data, err := os.ReadFile(h.path)
	if err != nil {
		return fmt.Errorf("basic_auth.users_file: %w", err)
	}
	users, err := config.ParseHtpasswd(data)
	if err != nil {
		return fmt.Errorf("basic_auth.users_file %s: %w", h.path, err)
	}
	u := &htUsers{hash: users, mod: fi.ModTime(), size: fi.Size()}
	for _, hash := range users {
		u.dummy = []byte(hash) // same cost as the file's: a wrong name takes as long as a wrong password
		break
	}
	h.users.Store(u)
	h.checked.Store(time.Now().UnixNano())
	return nil
}

// current returns the users, reloading the file when it changed. A file
// that became unreadable or invalid keeps the last good version (logged).
func (h *htpasswd) current() *htUsers {
	u := h.users.Load()
	now := time.Now().UnixNano()
	last := h.checked.Load()
	if now-last < int64(time.Second) || !h.checked.CompareAndSwap(last, now) {
		return u
	}
	fi, err := os.Stat(h.path)
	if err != nil || (fi.ModTime().Equal(u.mod) && fi.Size() == u.size) {
		return u
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.load(); err != nil {
		h.log.Warn("basic_auth users file not reloaded; the previous version stays in use", "err", err)
		return u
	}
	h.log.Info("basic_auth users file reloaded", "file", h.path)
	return h.users.Load()
}

// allows reports whether req carries a user and password of the file.
func (h *htpasswd) allows(req *http.Request) bool {
	user, pass, ok := req.BasicAuth()
	if !ok {
		return false
	}
	u := h.current()
	hash, known := u.hash[user]
	key := sha256.Sum256([]byte(user + "\x00" + pass + "\x00" + hash))
	if known {
		if _, hit := u.okCache.Load(key); hit {
			return true
		}
	}
	ref := []byte(hash)
	if !known {
		if ref = u.dummy; ref == nil {
			ref = dummyHash()
		}
	}
	// bcrypt compares in constant time.
	if bcrypt.CompareHashAndPassword(ref, []byte(pass)) != nil || !known {
		return false
	}
	if u.cached.Add(1) <= htCacheMax {
		u.okCache.Store(key, struct{}{})
	}
	return true
}

// forwardAuth asks an auth server (Authelia, Authentik, oauth2-proxy)
// about each request.
type forwardAuth struct {
	url    *url.URL
	copy   []string
	client *http.Client
}

// fwdMaxBody bounds the auth server's answer passed to the client (a
// login page redirect has next to none).
const fwdMaxBody = 64 << 10

// ask sends the request's headers to the auth server with
// X-Forwarded-Method, -Proto, -Host, -Uri and -For. On a 2xx it copies the
// copy_headers into req and returns nil; any other answer is returned
// to be sent to the client as it is.
func (f *forwardAuth) ask(req *http.Request, client string) (*denial, error) {
	out, err := http.NewRequestWithContext(req.Context(), http.MethodGet, f.url.String(), nil)
	if err != nil {
		return nil, err
	}
	for k, vv := range req.Header {
		out.Header[k] = append([]string(nil), vv...)
	}
	removeHopByHop(out.Header)
	for _, k := range []string{"Content-Length", "Expect", "Forwarded", "X-Forwarded-Prefix"} {
		delete(out.Header, k)
	}
	out.Header.Set("X-Forwarded-Method", req.Method)
	out.Header.Set("X-Forwarded-Proto", "https")
	out.Header.Set("X-Forwarded-Host", req.Host)
	out.Header.Set("X-Forwarded-Uri", req.URL.RequestURI())
	out.Header.Set("X-Forwarded-For", client)
	resp, err := f.client.Do(out)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		io.Copy(io.Discard, io.LimitReader(resp.Body, fwdMaxBody))
		for _, k := range f.copy {
			k = http.CanonicalHeaderKey(k)
			delete(req.Header, k) // the client's own copy is never trusted
			if vv := resp.Header.Values(k); len(vv) > 0 {
				req.Header[k] = append([]string(nil), vv...)
			}
		}
		return nil, nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, fwdMaxBody+1))
	if err != nil {
		return nil, fmt.Errorf("read answer: %w", err)
	}
	if len(body) > fwdMaxBody {
		return nil, errors.New("answer body larger than 64 KiB")
	}
	return &denial{code: resp.StatusCode, header: resp.Header.Clone(), body: body}, nil
}
