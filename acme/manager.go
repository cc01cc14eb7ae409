package acme

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	acmeapi "github.com/go-acme/lego/v4/acme"
	"github.com/go-acme/lego/v4/certcrypto"
	"github.com/go-acme/lego/v4/certificate"
	"github.com/go-acme/lego/v4/challenge"
	"github.com/go-acme/lego/v4/challenge/dns01"
	"github.com/go-acme/lego/v4/challenge/tlsalpn01"
	"github.com/go-acme/lego/v4/lego"
	"github.com/go-acme/lego/v4/registration"

	"github.com/relay-gw/relay/internal/metrics"
)

// Well-known directories.
const (
	LetsEncrypt        = "https://acme-v02.api.letsencrypt.org/directory"
	LetsEncryptStaging = "https://acme-staging-v02.api.letsencrypt.org/directory"
)

// Options configure a Manager.
type Options struct {
	Email    string
	CA       string // letsencrypt | letsencrypt-staging | directory URL
	CARoot   string // PEM bundle trusted for the ACME server's HTTPS (Pebble, step-ca)
	Profile  string // ACME profile; "" = the CA's default
	KeyType  string // ec256 (default) | ec384 | rsa2048 | rsa4096
	StateDir string // certificates under StateDir/acme
	// DNS is a DNS-01 provider (lego interface), needed for wildcards.
	// nil = no DNS-01. cmd/relayctl builds it from acme.dns.
	DNS challenge.Provider
	// Fallback serves a name until it has a certificate (e.g. the internal
	// CA); nil = handshakes for such names fail.
	Fallback interface {
		GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
	}
	Logger   *slog.Logger
	Registry *metrics.Registry // nil = no metrics

	// CheckEvery is the maintenance period; default 12h (twice a day).
	CheckEvery time.Duration
	// Challenges restricts the challenge types used (http-01, tls-alpn-01,
	// dns-01); empty = every one that can work.
	Challenges []string
	// DNSResolvers checks DNS-01 propagation against these (host:port)
	// instead of the system resolvers.
	DNSResolvers []string
	// EABKID and EABHMAC bind the account to an external account (CAs
	// such as ZeroSSL or a corporate step-ca require it).
	EABKID, EABHMAC string
}

// Manager obtains and renews certificates for a set of names and serves
// them from memory. One failing name never blocks the others.
type Manager struct {
	o    Options
	log  *slog.Logger
	dir  string // StateDir/acme/<ca host>
	http *http.Client

	mu     sync.RWMutex
	names  []string
	certs  map[string]*tls.Certificate
	tokens map[string]string           // HTTP-01: host/token -> key authorization
	alpn   map[string]*tls.Certificate // TLS-ALPN-01 challenge certificates by name

	clientMu sync.Mutex
	client   *lego.Client

	kick chan struct{}

	expiry *metrics.GaugeVec
	orders *metrics.CounterVec
}

// NewManager loads stored certificates; issuance happens in Run.
func NewManager(o Options) (*Manager, error) {
	if o.Email == "" {
		return nil, errors.New("acme: an email is required (acme.email)")
	}
	dirURL := map[string]string{"": LetsEncrypt, "letsencrypt": LetsEncrypt, "letsencrypt-staging": LetsEncryptStaging}[o.CA]
	if dirURL == "" {
		dirURL = o.CA
	}
	o.CA = dirURL
	u, err := url.Parse(dirURL)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("acme: directory URL %q: not a URL", dirURL)
	}
	if o.CheckEvery == 0 {
		o.CheckEvery = 12 * time.Hour
	}
	m := &Manager{
		o:      o,
		log:    o.Logger,
		dir:    filepath.Join(o.StateDir, "acme", strings.ReplaceAll(u.Host, ":", "_")),
		certs:  map[string]*tls.Certificate{},
		tokens: map[string]string{},
		alpn:   map[string]*tls.Certificate{},
		kick:   make(chan struct{}, 1),
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if o.CARoot != "" {
		pemBytes, err := os.ReadFile(o.CARoot)
		if err != nil {
			return nil, fmt.Errorf("acme.ca_root: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("acme.ca_root %s: no PEM certificates in it", o.CARoot)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	m.http = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	if err := os.MkdirAll(filepath.Join(m.dir, "certs"), 0o700); err != nil {
		return nil, fmt.Errorf("acme storage: %w", err)
	}
	m.expiry = metrics.NewGaugeVec("relay_certificate_expiry_timestamp_seconds",
		"Expiry (notAfter, Unix time) of each certificate served.", "name", "issuer")
	m.orders = metrics.NewCounterVec("relay_acme_orders_total", "ACME certificate orders, by result.", "result")
	m.orders.WithLabelValues("success")
	m.orders.WithLabelValues("failure")
	if o.Registry != nil {
		for _, c := range m.Collectors() {
			if err := o.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("acme metrics: %w", err)
			}
		}
	}
	return m, nil
}

// storeName maps a certificate name to its directory ("*" is awkward in paths).
func storeName(name string) string { return strings.ReplaceAll(name, "*", "_wildcard_") }

func (m *Manager) certDir(name string) string { return filepath.Join(m.dir, "certs", storeName(name)) }

// state is the per-name bookkeeping kept beside the certificate, so that
// backoff survives restarts: a crash-looping gateway cannot storm the CA.
type state struct {
	Failures    int       `json:"failures"`
	NextAttempt time.Time `json:"next_attempt"`
	LastError   string    `json:"last_error,omitempty"`
	LastSuccess time.Time `json:"last_success,omitempty"`
	// ARI (RFC 9773): the CA's suggested renewal time, and when to ask again.
	ARIRenewAt   time.Time `json:"ari_renew_at,omitempty"`
	ARINextCheck time.Time `json:"ari_next_check,omitempty"`
}

func (m *Manager) loadState(name string) state {
	var s state
	b, err := os.ReadFile(filepath.Join(m.certDir(name), "state.json"))
	if err == nil {
		json.Unmarshal(b, &s)
	}
	return s
}

func (m *Manager) saveState(name string, s state) {
	os.MkdirAll(m.certDir(name), 0o700)
	b, _ := json.MarshalIndent(s, "", "  ")
	if err := WriteFileAtomic(filepath.Join(m.certDir(name), "state.json"), b, 0o600); err != nil {
		m.log.Warn("acme: save state", "name", name, "err", err)
	}
}

// loadStored reads name's stored certificate. A corrupt file is an error
// that names it; it is left as it is.
func (m *Manager) loadStored(name string) (*tls.Certificate, error) {
	d := m.certDir(name)
	cert, key := filepath.Join(d, "cert.pem"), filepath.Join(d, "key.pem")
	if _, err := os.Stat(cert); errors.Is(err, os.ErrNotExist) {
		return nil, os.ErrNotExist
	}
	c, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, fmt.Errorf("stored certificate %s is unreadable (%w); it is kept as is: fix or remove %s to order a new one", cert, err, d)
	}
	if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
		return nil, fmt.Errorf("stored certificate %s: %w", cert, err)
	}
	return &c, nil
}

// SetNames sets the names to manage (start and reload) and loads what is
// stored; Run orders what is missing.
func (m *Manager) SetNames(names []string) {
	names = slices.Clone(names)
	slices.Sort(names)
	names = slices.Compact(names)
	for _, n := range names {
		c, err := m.loadStored(n)
		switch {
		case err == nil:
			m.install(n, c)
		case !errors.Is(err, os.ErrNotExist):
			m.log.Error("acme", "name", n, "err", err)
		}
	}
	m.mu.Lock()
	m.names = names
	m.mu.Unlock()
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

func (m *Manager) install(name string, c *tls.Certificate) {
	m.mu.Lock()
	m.certs[name] = c
	m.mu.Unlock()
	issuer := c.Leaf.Issuer.CommonName
	m.expiry.WithLabelValues(name, issuer).Set(float64(c.Leaf.NotAfter.Unix()))
}

// GetCertificate serves from memory: the exact name, else its wildcard,
// else the fallback. It never blocks on the network.
func (m *Manager) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	m.mu.RLock()
	c := m.certs[name]
	if c == nil {
		if i := strings.IndexByte(name, '.'); i > 0 {
			c = m.certs["*"+name[i:]]
		}
	}
	m.mu.RUnlock()
	if c != nil {
		return c, nil
	}
	if m.o.Fallback != nil {
		return m.o.Fallback.GetCertificate(hello)
	}
	return nil, fmt.Errorf("acme: no certificate for %q yet (order pending or failing; see the log and `relayctl certs list`)", name)
}

// HTTP01 answers the relay's http port for ACME HTTP-01.
func (m *Manager) HTTP01(host, token string) (string, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	ka, ok := m.tokens[host+"/"+token]
	return ka, ok
}

// TLSALPN01 answers the relay's https port for "acme-tls/1" handshakes.
func (m *Manager) TLSALPN01(name string) (*tls.Certificate, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	c, ok := m.alpn[name]
	return c, ok
}

// Providers publishing tokens into the Manager's memory: the relay's own
// listeners serve them; lego opens no sockets.
type httpProvider struct{ m *Manager }

func (p httpProvider) Present(domain, token, keyAuth string) error {
	p.m.mu.Lock()
	p.m.tokens[domain+"/"+token] = keyAuth
	p.m.mu.Unlock()
	return nil
}

func (p httpProvider) CleanUp(domain, token, _ string) error {
	p.m.mu.Lock()
	delete(p.m.tokens, domain+"/"+token)
	p.m.mu.Unlock()
	return nil
}

type alpnProvider struct{ m *Manager }

func (p alpnProvider) Present(domain, _, keyAuth string) error {
	c, err := tlsalpn01.ChallengeCert(domain, keyAuth)
	if err != nil {
		return err
	}
	p.m.mu.Lock()
	p.m.alpn[domain] = c
	p.m.mu.Unlock()
	return nil
}

func (p alpnProvider) CleanUp(domain, _, _ string) error {
	p.m.mu.Lock()
	delete(p.m.alpn, domain)
	p.m.mu.Unlock()
	return nil
}

// account is the lego user: one per CA and email, key kept in storage.
type account struct {
	Email string                 `json:"email"`
	Reg   *registration.Resource `json:"registration"`
	key   crypto.PrivateKey
}

func (a *account) GetEmail() string                        { return a.Email }
func (a *account) GetRegistration() *registration.Resource { return a.Reg }
func (a *account) GetPrivateKey() crypto.PrivateKey        { return a.key }

func (m *Manager) accountDir() string {
	h := sha256.Sum256([]byte(m.o.Email))
	return filepath.Join(m.dir, "accounts", hex.EncodeToString(h[:8]))
}

// legoClient returns the client, registering (or loading) the account.
func (m *Manager) legoClient() (*lego.Client, error) {
	m.clientMu.Lock()
	defer m.clientMu.Unlock()
	if m.client != nil {
		return m.client, nil
	}
	dir := m.accountDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("acme account dir: %w", err)
	}
	acct := &account{Email: m.o.Email}
	keyPath, regPath := filepath.Join(dir, "key.pem"), filepath.Join(dir, "account.json")
	if b, err := os.ReadFile(keyPath); err == nil {
		blk, _ := pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("acme account key %s is corrupt; restore it or remove the directory to register a new account", keyPath)
		}
		k, err := x509.ParseECPrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("acme account key %s: %w", keyPath, err)
		}
		acct.key = k
		if b, err := os.ReadFile(regPath); err == nil {
			json.Unmarshal(b, acct)
		}
	} else {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		der, _ := x509.MarshalECPrivateKey(k)
		if err := WriteFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, err
		}
		acct.key = k
	}
	cfg := lego.NewConfig(acct)
	cfg.CADirURL = m.o.CA
	cfg.HTTPClient = m.http
	cfg.UserAgent = "relay"
	cfg.Certificate.KeyType = map[string]certcrypto.KeyType{"": certcrypto.EC256, "ec256": certcrypto.EC256, "ec384": certcrypto.EC384,
		"rsa2048": certcrypto.RSA2048, "rsa4096": certcrypto.RSA4096}[m.o.KeyType]
	c, err := lego.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("acme: connect to %s: %w", m.o.CA, err)
	}
	allowed := func(ch string) bool { return len(m.o.Challenges) == 0 || slices.Contains(m.o.Challenges, ch) }
	if allowed("http-01") {
		c.Challenge.SetHTTP01Provider(httpProvider{m})
	}
	if allowed("tls-alpn-01") {
		c.Challenge.SetTLSALPN01Provider(alpnProvider{m})
	}
	if m.o.DNS != nil && allowed("dns-01") {
		opts := []dns01.ChallengeOption{dns01.DisableAuthoritativeNssPropagationRequirement()}
		if len(m.o.DNSResolvers) > 0 {
			opts = append(opts, dns01.AddRecursiveNameservers(m.o.DNSResolvers))
		}
		c.Challenge.SetDNS01Provider(m.o.DNS, opts...)
	}
	if acct.Reg == nil {
		var reg *registration.Resource
		var err error
		if m.o.EABKID != "" {
			reg, err = c.Registration.RegisterWithExternalAccountBinding(registration.RegisterEABOptions{
				TermsOfServiceAgreed: true, Kid: m.o.EABKID, HmacEncoded: m.o.EABHMAC})
		} else {
			reg, err = c.Registration.Register(registration.RegisterOptions{TermsOfServiceAgreed: true})
		}
		if err != nil {
			return nil, fmt.Errorf("acme: register account %s at %s: %w", m.o.Email, m.o.CA, err)
		}
		acct.Reg = reg
		b, _ := json.MarshalIndent(acct, "", "  ")
		if err := WriteFileAtomic(regPath, b, 0o600); err != nil {
			return nil, err
		}
	}
	m.client = c
	return c, nil
}

// renewAt is when c is due: a third of its lifetime before expiry (30 days
// for 90-day certificates, 2 days for 6-day ones), with up to 5% jitter
// so that many names do not renew in the same minute.
func renewAt(c *x509.Certificate, name string) time.Time {
	life := c.NotAfter.Sub(c.NotBefore)
	at := c.NotAfter.Add(-life / 3)
	h := sha256.Sum256([]byte(name))
	jitter := time.Duration(new(big.Int).SetBytes(h[:4]).Int64() % int64(life/20+1))
	return at.Add(-jitter)
}

// backoff is the wait after n consecutive failures: 1m, 2m, 4m, ... capped
// at 24h, with up to 25% jitter.
func backoff(n int) time.Duration {
	d := time.Minute << min(n-1, 11)
	d = min(d, 24*time.Hour)
	j, _ := rand.Int(rand.Reader, big.NewInt(int64(d/4)+1))
	return d + time.Duration(j.Int64())
}

// due reports whether name needs an order now: no certificate, or the
// renewal time has come (the CA's ARI suggestion when it gave one, else a
// third of the lifetime before expiry), and no backoff in force.
func (m *Manager) due(name string, now time.Time) bool {
	st := m.loadState(name)
	if now.Before(st.NextAttempt) {
		return false
	}
	m.mu.RLock()
	c := m.certs[name]
	m.mu.RUnlock()
	if c == nil {
		return true
	}
	at := renewAt(c.Leaf, name)
	if !st.ARIRenewAt.IsZero() && st.ARIRenewAt.Before(c.Leaf.NotAfter) {
		at = st.ARIRenewAt
	}
	return !now.Before(at)
}

// refreshARI asks the CA when to renew name (ACME Renewal Information),
// at most as often as the CA's Retry-After (default 6h). A CA without ARI
// leaves the 1/3-lifetime rule in force.
func (m *Manager) refreshARI(name string, now time.Time) {
	st := m.loadState(name)
	m.mu.RLock()
	c := m.certs[name]
	m.mu.RUnlock()
	if c == nil || now.Before(st.ARINextCheck) || c.Leaf == nil || len(c.Certificate) < 2 {
		return
	}
	client, err := m.legoClient()
	if err != nil {
		return
	}
	st.ARINextCheck = now.Add(24 * time.Hour)
	ri, err := client.Certificate.GetRenewalInfo(certificate.RenewalInfoRequest{Cert: c.Leaf})
	if err == nil {
		if at := ri.ShouldRenewAt(now, m.o.CheckEvery); at != nil {
			st.ARIRenewAt = *at
		} else {
			// Window is later than our next check: aim at its start.
			st.ARIRenewAt = ri.SuggestedWindow.Start
		}
		next := 6 * time.Hour
		if ri.RetryAfter > 0 {
			next = ri.RetryAfter
		}
		st.ARINextCheck = now.Add(next)
		m.log.Debug("acme: renewal info", "name", name, "renew_at", st.ARIRenewAt)
	} else {
		m.log.Debug("acme: no renewal info (ARI) from the CA; renewing at 1/3 of the lifetime", "name", name, "err", err)
	}
	m.saveState(name, st)
}

// retryAfter returns the wait a rate-limited CA asked for, if any.
func retryAfter(err error) time.Duration {
	var rl *acmeapi.RateLimitedError
	if !errors.As(err, &rl) || rl.RetryAfter == "" {
		return 0
	}
	if secs, err := strconv.Atoi(strings.TrimSpace(rl.RetryAfter)); err == nil {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(rl.RetryAfter); err == nil {
		return time.Until(t)
	}
	return 0
}

// obtain orders a certificate for name and installs it. A failure keeps
// whatever certificate name had.
func (m *Manager) obtain(name string, force bool) error {
	if !force && !m.due(name, time.Now()) {
		return nil
	}
	unlock, err := lockDir(m.dir) // two processes never order at once
	if err != nil {
		return err
	}
	defer unlock()
	// Another process may have renewed while we waited for the lock. A
	// corrupt stored file stops here: it is reported, never overwritten.
	if c, err := m.loadStored(name); err == nil {
		m.install(name, c)
		if !force && time.Now().Before(renewAt(c.Leaf, name)) {
			return nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		m.log.Error("acme", "name", name, "err", err)
		return err
	}
	st := m.loadState(name)
	err = m.order(name)
	if err != nil {
		m.orders.WithLabelValues("failure").Inc()
		st.Failures++
		st.LastError = err.Error()
		st.NextAttempt = time.Now().Add(max(backoff(st.Failures), retryAfter(err)))
		m.saveState(name, st)
		m.log.Error("acme: order failed; the current certificate (if any) keeps serving", "name", name, "retry_at", st.NextAttempt.Format(time.RFC3339), "err", err)
		return err
	}
	m.orders.WithLabelValues("success").Inc()
	m.saveState(name, state{LastSuccess: time.Now()})
	m.refreshARI(name, time.Now())
	return nil
}

func (m *Manager) order(name string) error {
	c, err := m.legoClient()
	if err != nil {
		return err
	}
	why := "http-01 or tls-alpn-01 (served by the relay's own listeners)"
	if strings.HasPrefix(name, "*.") {
		if m.o.DNS == nil {
			return fmt.Errorf("%s is a wildcard: it needs DNS-01; set acme.dns", name)
		}
		why = "dns-01 (wildcards can only be validated by DNS)"
	}
	m.log.Info("acme: ordering certificate", "name", name, "ca", m.o.CA, "challenge", why)
	res, err := c.Certificate.Obtain(certificate.ObtainRequest{Domains: []string{name}, Bundle: true, Profile: m.o.Profile})
	if err != nil {
		return err
	}
	cert, err := tls.X509KeyPair(res.Certificate, res.PrivateKey)
	if err != nil {
		return fmt.Errorf("acme: CA returned an unusable certificate: %w", err)
	}
	if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
		return err
	}
	// Never worse than what we have: a new certificate may not expire
	// before the one it replaces (e.g. a shorter profile by mistake).
	m.mu.RLock()
	old := m.certs[name]
	m.mu.RUnlock()
	if old != nil && cert.Leaf.NotAfter.Before(old.Leaf.NotAfter) {
		return fmt.Errorf("acme: new certificate for %s expires %s, before the current one (%s): keeping the current one", name, cert.Leaf.NotAfter, old.Leaf.NotAfter)
	}
	d := m.certDir(name)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return err
	}
	// Key first, then certificate: a crash in between leaves a mismatched
	// pair that fails to load (and is reported), never a silent downgrade.
	if err := WriteFileAtomic(filepath.Join(d, "key.pem"), res.PrivateKey, 0o600); err != nil {
		return err
	}
	if err := WriteFileAtomic(filepath.Join(d, "cert.pem"), res.Certificate, 0o644); err != nil {
		return err
	}
	m.install(name, &cert)
	m.log.Info("acme: certificate installed", "name", name, "not_after", cert.Leaf.NotAfter.Format(time.RFC3339), "issuer", cert.Leaf.Issuer.CommonName)
	return nil
}

// Run obtains missing certificates and renews due ones until ctx ends:
// at start, on SetNames, and every CheckEvery. Names are independent.
func (m *Manager) Run(ctx context.Context) {
	t := time.NewTicker(m.o.CheckEvery)
	defer t.Stop()
	poll := time.NewTicker(30 * time.Second)
	defer poll.Stop()
	for {
		m.mu.RLock()
		names := slices.Clone(m.names)
		m.mu.RUnlock()
		for _, n := range names {
			if ctx.Err() != nil {
				return
			}
			m.refreshARI(n, time.Now())
			m.obtain(n, m.takeRenewRequest(n))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.kick:
		case <-poll.C: // renewal requests from `relayctl certs renew`
		}
	}
}

// renewMarker is dropped into a certificate's directory by `relayctl certs
// renew` (a separate, possibly unprivileged process that cannot answer
// challenges itself); the running relay's Manager picks it up.
const renewMarker = "renew-requested"

// RequestRenewal asks the running relay to renew name now, for every CA
// it has stored name under.
func RequestRenewal(stateDir, name string) error {
	dirs, _ := filepath.Glob(filepath.Join(stateDir, "acme", "*", "certs", storeName(name)))
	if len(dirs) == 0 {
		return fmt.Errorf("no ACME certificate named %s in %s (is it a tls: acme route?)", name, stateDir)
	}
	for _, d := range dirs {
		if err := os.WriteFile(filepath.Join(d, renewMarker), nil, 0o600); err != nil {
			return fmt.Errorf("request renewal of %s: %w", name, err)
		}
	}
	return nil
}

// takeRenewRequest reports (and clears) a pending renewal request.
func (m *Manager) takeRenewRequest(name string) bool {
	return os.Remove(filepath.Join(m.certDir(name), renewMarker)) == nil
}

// CheckNow runs one maintenance pass synchronously.
func (m *Manager) CheckNow() {
	m.mu.RLock()
	names := slices.Clone(m.names)
	m.mu.RUnlock()
	for _, n := range names {
		m.refreshARI(n, time.Now())
		m.obtain(n, m.takeRenewRequest(n))
	}
}

// Renew orders a new certificate for name now, ignoring due dates and
// backoff (`relayctl certs renew`).
func (m *Manager) Renew(name string) error { return m.obtain(name, true) }

// CertInfo describes one certificate for `relayctl certs list`.
type CertInfo struct {
	Name        string    `json:"name"`
	Issuer      string    `json:"issuer"`
	NotAfter    time.Time `json:"not_after"`
	NextRenewal time.Time `json:"next_renewal"`
	LastError   string    `json:"last_error,omitempty"`
	Failures    int       `json:"failures,omitempty"`
	// NextAttempt is when a failed order is tried again (nil: none failed).
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
}

// ListStored lists the certificates stored under stateDir/acme, for every
// CA, without a running Manager.
func ListStored(stateDir string) ([]CertInfo, error) {
	var out []CertInfo
	cas, _ := filepath.Glob(filepath.Join(stateDir, "acme", "*", "certs", "*"))
	for _, d := range cas {
		name := strings.ReplaceAll(filepath.Base(d), "_wildcard_", "*")
		m := &Manager{dir: filepath.Dir(filepath.Dir(d))}
		info := CertInfo{Name: name}
		st := m.loadState(name)
		info.LastError, info.Failures = st.LastError, st.Failures
		if st.Failures > 0 && !st.NextAttempt.IsZero() {
			t := st.NextAttempt
			info.NextAttempt = &t
		}
		if c, err := m.loadStored(name); err == nil {
			info.Issuer, info.NotAfter = c.Leaf.Issuer.CommonName, c.Leaf.NotAfter
			info.NextRenewal = renewAt(c.Leaf, name)
		} else if !errors.Is(err, os.ErrNotExist) {
			info.LastError = err.Error()
		}
		if st.NextAttempt.After(info.NextRenewal) {
			info.NextRenewal = st.NextAttempt
		}
		out = append(out, info)
	}
	return out, nil
}

// Collectors are the manager's metrics, for a caller that registers them
// itself (Options.Registry nil), e.g. to swap managers on reload.
func (m *Manager) Collectors() []metrics.Collector {
	return []metrics.Collector{m.expiry, m.orders}
}
