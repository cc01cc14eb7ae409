package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/relay-gw/relay/acme"
	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/internal/filewatch"
	"github.com/relay-gw/relay/internal/metrics"
	"github.com/relay-gw/relay/relay"
)

func init() {
	register("serve", "serve [-c FILE]", cmdServe)
	register("check", "check [-c FILE]", cmdCheck)
}

// loadConfig resolves -c and loads the file. On error it prints every
// problem (FILE:LINE: what; fix) to stderr and returns exit status 1.
func loadConfig(e *env, flagPath string) (*config.Config, error) {
	path := config.ResolvePath(flagPath, e.getenv)
	cfg, err := config.Load(path)
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return nil, exitError{1}
	}
	return cfg, nil
}

// configFromArgs serves the commands whose only flag is -c: it parses
// args and loads the config.
func configFromArgs(e *env, name string, args []string) (*config.Config, error) {
	fs, cfgPath := newConfigFlagSet(e, name)
	if _, err := parseInterspersed(fs, args); err != nil {
		return nil, err
	}
	return loadConfig(e, *cfgPath)
}

func cmdCheck(e *env, args []string) error {
	cfg, err := configFromArgs(e, "check", args)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: ok (%d routes, unknown_sni: %s)\n", cfg.Path, len(cfg.Routes), cfg.UnknownSNI)
	return nil
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func cmdServe(e *env, args []string) error {
	cfg, err := configFromArgs(e, "serve", args)
	if err != nil {
		return err
	}
	log := newLogger(cfg.Log, e.stderr)
	slog.SetDefault(log)
	if os.Geteuid() == 0 {
		log.Warn("serve is running as root: it needs no privilege (ports 8080/8443, steering by `rules apply`); run it as user "+cfg.User, "user", cfg.User)
	}

	reg := newRegistry()
	registerSteeringHealth(e.ctx, reg, cfg, e.getenv, log)
	certs := &certSources{stateDir: cfg.StateDir, log: log}
	mgr, _, err := certs.prepareACME(cfg)
	if err != nil {
		return err
	}
	certs.setACME(mgr, acmeKey(cfg))
	if err := reg.Register(certMetrics{certs}); err != nil {
		return err
	}
	opts := relay.Options{
		Config:      cfg,
		Certs:       certs.forRoute,
		OriginalDst: relay.SOOriginalDst,
		Logger:      log,
		Registry:    reg,
	}
	if sp := openSplicer(cfg, log); sp != nil {
		opts.Splicer = sp
	}
	// Challenges go to whichever ACME manager is current (reloads may
	// replace it).
	opts.HTTPChallenges, opts.ALPNChallenges = acmeChallenges{certs}, acmeChallenges{certs}
	// Listeners from systemd (relay.socket) or from the relay this one
	// takes over from (handover.go); none: relay.New binds its own.
	inherited, takeover, err := listenersFor(cfg, log)
	if err != nil {
		return err
	}
	opts.HTTPSListener, opts.HTTPListener, opts.MetricsListener = inherited["https"], inherited["http"], inherited["metrics"]
	certs.beginBuild()
	srv, err := relay.New(opts)
	if err != nil {
		inherited.close()
		takeover.abort() // the running relay keeps serving
		return fmt.Errorf("start: %w", err)
	}
	certs.commitBuild(cfg)
	srv.SetStatusHook(statusHook(certs, steeringStatePath(e.getenv)))
	if st := attachBPF(srv, cfg, log); st != nil {
		defer st.Close()
	}

	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	certs.runACME(ctx, mgr, cfg)
	// Signals are caught before the listeners serve: a SIGHUP or SIGUSR1
	// (logrotate) must never meet the default action, which kills.
	hup, usr1 := make(chan os.Signal, 1), make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	signal.Notify(usr1, syscall.SIGUSR1) // reopen the access log
	go func() {
		defer signal.Stop(hup)
		defer signal.Stop(usr1)
		watchReload(ctx, cfg.Path, srv, certs, log, hup, usr1)
	}()
	return serveHandingOver(ctx, cancel, cfg, srv, takeover, log)
}

// watchReload reloads on SIGHUP and when the config file changes. The
// directory is watched, not the file, because editors and config
// managers replace files by rename.
func watchReload(ctx context.Context, path string, srv *relay.Server, certs *certSources, log *slog.Logger, hup, usr1 <-chan os.Signal) {

	var events <-chan struct{}
	if w, err := filewatch.New(path); err != nil {
		log.Warn("config file watch unavailable; reload with SIGHUP", "err", err)
	} else {
		defer w.Close()
		events = w.C
	}
	reload := func(why string) {
		cfg, err := config.Load(path)
		if err != nil {
			srv.RecordReloadFailure()
			log.Error("reload refused; the previous config keeps serving", "why", why, "err", err)
			return
		}
		// A changed acme: block (or a first acme route) gets a new
		// manager; routes are built with it, and it starts running only
		// once the config is in use.
		mgr, fresh, err := certs.prepareACME(cfg)
		if err != nil {
			srv.RecordReloadFailure()
			log.Error("reload refused; the previous config keeps serving", "why", why, "err", err)
			return
		}
		prev, prevKey := certs.setACME(mgr, acmeKey(cfg))
		prevDir := certs.setStateDir(cfg.StateDir)
		certs.beginBuild()
		if err := srv.Reload(cfg); err != nil {
			certs.setACME(prev, prevKey)
			certs.setStateDir(prevDir)
			log.Error("reload refused; the previous config keeps serving", "why", why, "err", err)
			return
		}
		certs.commitBuild(cfg)
		if fresh || mgr == nil {
			certs.runACME(ctx, mgr, cfg)
			if fresh {
				log.Info("acme settings changed: new ACME manager running", "ca", cfg.ACME.CA)
			}
		} else {
			mgr.SetNames(acmeNames(cfg))
		}
	}
	// Debounce: editors write several events per save.
	var timer *time.Timer
	fire := make(chan struct{}, 1)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			reload("SIGHUP")
		case <-usr1:
			if err := srv.ReopenAccessLog(); err != nil {
				log.Error("reopen access log", "err", err)
			} else {
				log.Info("access log reopened (SIGUSR1)")
			}
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			if timer != nil {
				timer.Stop()
			}
			timer = time.AfterFunc(200*time.Millisecond, func() {
				select {
				case fire <- struct{}{}:
				default:
				}
			})
		case <-fire:
			reload("config file changed")
		}
	}
}

// certSources builds the certificate source of each terminate route.
type certSources struct {
	mu       sync.Mutex
	stateDir string
	log      *slog.Logger
	ca       *acme.InternalCA
	caDir    string
	warned   bool
	acme     *acme.Manager // nil without acme.email
	acmeKey  string
	acmeStop context.CancelFunc

	// File certificates of the routes being served (route match →
	// source), and those of a config being built; for metrics.
	files, building map[string]*acme.FileSource
	acmeNames       map[string]bool
}

// beginBuild starts collecting the file certificates of a new config;
// commitBuild makes them the served ones once the config is in use.
func (c *certSources) beginBuild() {
	c.mu.Lock()
	c.building = map[string]*acme.FileSource{}
	c.mu.Unlock()
}

func (c *certSources) commitBuild(cfg *config.Config) {
	c.mu.Lock()
	c.files, c.building = c.building, nil
	c.acmeNames = map[string]bool{}
	if c.acme != nil {
		for _, n := range acmeNames(cfg) {
			c.acmeNames[n] = true
		}
	}
	c.mu.Unlock()
}

var certExpiryDesc = metrics.NewDesc("relay_certificate_expiry_timestamp_seconds",
	"Expiry (notAfter, Unix time) of each certificate served.", metrics.KindGauge, "name", "issuer")

// collectLeaves exports the expiry of internal-CA leaves and certificate
// files (ACME certificates are exported by the ACME manager).
func (c *certSources) collectLeaves(s *metrics.Sink) {
	c.mu.Lock()
	var leaves []*x509.Certificate
	names := map[*x509.Certificate]string{}
	if c.ca != nil {
		leaves = c.ca.Leaves()
	}
	for match, f := range c.files {
		l := f.Leaf()
		names[l] = match
		leaves = append(leaves, l)
	}
	skip := c.acmeNames
	c.mu.Unlock()
	seen := map[string]bool{}
	for _, l := range leaves {
		name := names[l]
		if name == "" {
			name = l.Subject.CommonName
			if len(l.DNSNames) > 0 {
				name = l.DNSNames[0]
			}
		}
		if seen[name] || skip[name] {
			continue
		}
		seen[name] = true
		s.Add(certExpiryDesc, float64(l.NotAfter.Unix()), name, l.Issuer.CommonName)
	}
}

func (c *certSources) setStateDir(d string) (prev string) {
	c.mu.Lock()
	prev, c.stateDir = c.stateDir, d
	c.mu.Unlock()
	return prev
}

// acmeKey identifies the ACME settings a manager was built with.
func acmeKey(cfg *config.Config) string {
	b, _ := json.Marshal(struct {
		A config.ACME
		S string
	}{cfg.ACME, cfg.StateDir})
	return string(b)
}

// prepareACME returns the ACME manager cfg wants: the current one when the
// settings did not change (fresh false), a new one not yet running, or nil
// when no route needs ACME (or acme.email is unset).
func (c *certSources) prepareACME(cfg *config.Config) (m *acme.Manager, fresh bool, err error) {
	if cfg.ACME.Email == "" || len(acmeNames(cfg)) == 0 {
		return nil, false, nil
	}
	c.mu.Lock()
	cur, key := c.acme, c.acmeKey
	c.mu.Unlock()
	if cur != nil && key == acmeKey(cfg) {
		return cur, false, nil
	}
	m, err = newACME(cfg, c.log)
	return m, err == nil, err
}

// setACME makes m the manager routes and challenges use.
func (c *certSources) setACME(m *acme.Manager, key string) (prev *acme.Manager, prevKey string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev, prevKey = c.acme, c.acmeKey
	c.acme, c.acmeKey = m, key
	return prev, prevKey
}

// runACME stops the running manager's loop and starts m's (nil: none).
func (c *certSources) runACME(ctx context.Context, m *acme.Manager, cfg *config.Config) {
	c.mu.Lock()
	stop := c.acmeStop
	c.acmeStop = nil
	if m != nil {
		var mctx context.Context
		mctx, c.acmeStop = context.WithCancel(ctx)
		m.SetNames(acmeNames(cfg))
		go m.Run(mctx)
	}
	c.mu.Unlock()
	if stop != nil {
		stop()
	}
}

func (c *certSources) current() *acme.Manager {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.acme
}

// acmeChallenges answers ACME challenges with the current manager.
type acmeChallenges struct{ c *certSources }

func (a acmeChallenges) HTTP01(host, token string) (string, bool) {
	if m := a.c.current(); m != nil {
		return m.HTTP01(host, token)
	}
	return "", false
}

func (a acmeChallenges) TLSALPN01(name string) (*tls.Certificate, bool) {
	if m := a.c.current(); m != nil {
		return m.TLSALPN01(name)
	}
	return nil, false
}

var ordersDesc = metrics.NewDesc("relay_acme_orders_total", "ACME certificate orders, by result.", metrics.KindCounter, "result")

// certMetrics exports the certificate families: the current ACME
// manager's series (reloads may replace the manager) and the expiry of
// the other certificates. Without ACME the order counters exist at zero,
// so dashboards and alerts need no special case.
type certMetrics struct{ c *certSources }

func (cm certMetrics) Describe() []*metrics.Desc {
	return []*metrics.Desc{certExpiryDesc, ordersDesc}
}

func (cm certMetrics) Collect(s *metrics.Sink) error {
	if m := cm.c.current(); m != nil {
		for _, col := range m.Collectors() {
			if err := col.Collect(s); err != nil {
				return err
			}
		}
	} else {
		for _, r := range []string{"success", "failure"} {
			s.Add(ordersDesc, 0, r)
		}
	}
	cm.c.collectLeaves(s)
	return nil
}

func (c *certSources) internalCA() (*acme.InternalCA, error) {
	dir := filepath.Join(c.stateDir, "ca")
	if c.ca != nil && c.caDir == dir {
		return c.ca, nil
	}
	ca, err := acme.OpenInternalCA(dir)
	if err != nil {
		return nil, fmt.Errorf("internal CA in %s: %w", dir, err)
	}
	c.ca, c.caDir = ca, dir
	return ca, nil
}

func (c *certSources) forRoute(r *config.Route) (relay.CertSource, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch r.Terminate.TLS.Mode {
	case "files":
		f, err := acme.NewFileSource(r.Terminate.TLS.Cert, r.Terminate.TLS.Key)
		if err == nil && c.building != nil {
			c.building[r.Match] = f
		}
		return f, err
	case "acme":
		if c.acme != nil {
			return c.acme, nil
		}
		if !c.warned {
			c.log.Warn("tls: acme without acme.email: using the internal CA (set acme.email for publicly trusted certificates)", "route", r.Match)
			c.warned = true
		}
		return c.internalCA()
	case "internal", "":
		return c.internalCA()
	default:
		return nil, errors.New("unknown tls mode " + r.Terminate.TLS.Mode)
	}
}

// newRegistry is the /metrics registry: the relay's series plus the Go
// runtime and process collectors.
func newRegistry() *metrics.Registry {
	reg := metrics.NewRegistry()
	reg.MustRegister(metrics.NewGoCollector(), metrics.NewProcessCollector())
	return reg
}

// newACME builds an ACME manager for cfg (its metrics are exported by
// acmeMetrics).
func newACME(cfg *config.Config, log *slog.Logger) (*acme.Manager, error) {
	dns, err := dnsProvider(cfg.ACME.DNS)
	if err != nil {
		return nil, err
	}
	o := acme.Options{
		Email: cfg.ACME.Email, CA: cfg.ACME.CA, CARoot: cfg.ACME.CARoot, Profile: cfg.ACME.Profile,
		KeyType: cfg.ACME.KeyType, StateDir: cfg.StateDir, Challenges: cfg.ACME.Challenges,
		Logger: log,
	}
	if dns != nil {
		o.DNS = dns
	}
	if cfg.ACME.EAB != nil {
		o.EABKID, o.EABHMAC = cfg.ACME.EAB.KID, cfg.ACME.EAB.HMACKey
	}
	m, err := acme.NewManager(o)
	if err != nil {
		return nil, fmt.Errorf("acme: %w", err)
	}
	return m, nil
}

// acmeNames are the matches of the tls: acme routes.
func acmeNames(cfg *config.Config) []string {
	var names []string
	for _, r := range cfg.Routes {
		if n := config.NormalizeName(r.Match); r.Terminate != nil && r.Terminate.TLS.Mode == "acme" && !slices.Contains(names, n) {
			names = append(names, n) // a name with alpn routes has one certificate
		}
	}
	return names
}
