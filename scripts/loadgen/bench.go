package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"
)

// Report is what `loadgen bench` measured in one run.
type Report struct {
	Machine  map[string]string `json:"machine"`
	Versions map[string]string `json:"versions"`
	Command  string            `json:"command"`
	Settings Settings          `json:"settings"`
	Skipped  map[string]string `json:"skipped,omitempty"` // peer → why
	Paths    []*PathResult     `json:"paths"`
}

// Settings are the sizes and counts of the run.
type Settings struct {
	BulkBytes   int64   `json:"bulk_bytes"`
	Runs        int     `json:"runs"`
	IdleConns   int     `json:"idle_conns"`
	LoadSeconds float64 `json:"load_seconds"`
	Concurrency int     `json:"concurrency"`
	RTTs        int     `json:"round_trips"`
	Workers     int     `json:"workers"`
}

// PathResult is one path (direct, relay passthrough, a peer, ...).
type PathResult struct {
	Name  string `json:"name"`
	Kind  string `json:"kind"` // passthrough | terminate
	Proxy string `json:"proxy,omitempty"`

	// passthrough
	UpGbps       float64 `json:"up_gbit_s,omitempty"`   // median
	DownGbps     float64 `json:"down_gbit_s,omitempty"` // median
	RatioUp      float64 `json:"ratio_up,omitempty"`    // to direct
	RatioDown    float64 `json:"ratio_down,omitempty"`
	CPUSecPerGiB float64 `json:"proxy_cpu_s_per_gib,omitempty"`
	RTT          Latency `json:"rtt_64b"`
	Conns        Rate    `json:"conns"`
	RatioConns   float64 `json:"ratio_conns,omitempty"`

	// terminate
	H1            Rate    `json:"get_h1"`
	H2            Rate    `json:"get_h2"`
	RatioH1       float64 `json:"ratio_h1,omitempty"`
	RatioH2       float64 `json:"ratio_h2,omitempty"`
	CPUUsPerReqH1 float64 `json:"proxy_cpu_us_per_req_h1,omitempty"`
	CPUUsPerReqH2 float64 `json:"proxy_cpu_us_per_req_h2,omitempty"`

	IdleRSSKB     int64   `json:"idle_rss_kb,omitempty"`
	LoadedRSSKB   int64   `json:"rss_with_idle_conns_kb,omitempty"`
	KBPerIdleConn float64 `json:"kb_per_idle_conn,omitempty"`
	// The same 0.5 s after the last connection opened, before the proxy
	// settled (the relay parks quiet connections after 1 s and returns
	// the memory a burst freed once new connections stop for 2 s).
	KBPerIdleConnAtOpen float64 `json:"kb_per_idle_conn_at_open,omitempty"`
	// Anonymous (private) memory only, without the binary's and
	// libraries' file pages.
	IdleAnonKB   int64 `json:"idle_rss_anon_kb,omitempty"`
	LoadedAnonKB int64 `json:"rss_anon_with_idle_conns_kb,omitempty"`
	// The relay's Go runtime at idle and with the idle connections (stack
	// and heap bytes from its /metrics): where the per-connection memory
	// goes.
	GoIdle   map[string]float64 `json:"go_runtime_idle,omitempty"`
	GoLoaded map[string]float64 `json:"go_runtime_with_idle_conns,omitempty"`
	OK       bool               `json:"ok"`
	Error    string             `json:"error,omitempty"`
}

type benchOpts struct {
	relay   string // relayctl binary
	configs string // directory with the peer config templates
	out     string // docs/BENCHMARKS.md
	json    string
	peers   []string
	only    string
	size    int64
	runs    int
	idle    int
	dur     time.Duration
	conc    int
	rttN    int
	workers int
	self    string // this binary
	dir     string // scratch directory
	quick   bool
}

// pathSpec says how to run one path.
type pathSpec struct {
	name, kind, proxy string
	tmpl              string // template file in configs; "" = no proxy
	splice            bool   // haproxy: option splice-request/-response
	sockmap           bool   // relay: load the BPF sockmap splice first
	argv              func(cfg, dir string) []string
	env               func(dir string) []string
}

func (o benchOpts) specs() []pathSpec {
	goEnv := func(string) []string { return []string{"GOMAXPROCS=" + strconv.Itoa(o.workers)} }
	relay := func(cfg, _ string) []string { return []string{o.relay, "serve", "-c", cfg} }
	haproxy := func(cfg, _ string) []string { return []string{"haproxy", "-db", "-f", cfg} }
	nginx := func(cfg, dir string) []string { return []string{"nginx", "-p", dir, "-c", cfg, "-e", "stderr"} }
	sniproxy := func(cfg, _ string) []string { return []string{"sniproxy", "-f", "-c", cfg} }
	caddy := func(cfg, _ string) []string {
		return []string{"caddy", "run", "--config", cfg, "--adapter", "caddyfile"}
	}
	caddyEnv := func(dir string) []string {
		return []string{"GOMAXPROCS=" + strconv.Itoa(o.workers), "HOME=" + dir,
			"XDG_DATA_HOME=" + filepath.Join(dir, "data"), "XDG_CONFIG_HOME=" + filepath.Join(dir, "config")}
	}
	return []pathSpec{
		{name: "direct", kind: "passthrough"},
		{name: "relay passthrough (splice)", kind: "passthrough", proxy: "relay", tmpl: "relay-passthrough.yaml", argv: relay, env: goEnv},
		{name: "relay passthrough (sockmap)", kind: "passthrough", proxy: "relay", tmpl: "relay-sockmap.yaml", sockmap: true, argv: relay, env: goEnv},
		{name: "haproxy tcp + splice", kind: "passthrough", proxy: "haproxy", tmpl: "haproxy-tcp.cfg", splice: true, argv: haproxy},
		{name: "haproxy tcp", kind: "passthrough", proxy: "haproxy", tmpl: "haproxy-tcp.cfg", argv: haproxy},
		{name: "nginx stream ssl_preread", kind: "passthrough", proxy: "nginx", tmpl: "nginx-stream.conf", argv: nginx},
		{name: "sniproxy", kind: "passthrough", proxy: "sniproxy", tmpl: "sniproxy.conf", argv: sniproxy},
		{name: "direct (Go HTTPS server)", kind: "terminate"},
		{name: "relay terminate", kind: "terminate", proxy: "relay", tmpl: "relay-terminate.yaml", argv: relay, env: goEnv},
		{name: "haproxy TLS", kind: "terminate", proxy: "haproxy", tmpl: "haproxy-tls.cfg", argv: haproxy},
		{name: "nginx TLS", kind: "terminate", proxy: "nginx", tmpl: "nginx-tls.conf", argv: nginx},
		{name: "caddy tls internal", kind: "terminate", proxy: "caddy", tmpl: "Caddyfile", argv: caddy, env: caddyEnv},
	}
}

// tmplData fills the peer config templates in scripts/bench/.
type tmplData struct {
	Listen       string // host:port the proxy listens on
	ListenHost   string
	ListenPort   string
	Metrics      string // relay metrics listener
	Upstream     string // TLS endpoint (passthrough target)
	HTTPUpstream string // plain HTTP endpoint (terminate target)
	Dir          string // scratch directory of this proxy
	Cert, Key    string // PEM files (certificate of bench.test and term.test)
	CertKey      string // both in one file (HAProxy)
	Workers      int    // = nproc = the relay's GOMAXPROCS
	Listen2      string // soak: HAProxy's terminating frontend
	NOFILE       uint64 // soak: the open-file limit every process gets
	MaxConn      uint64 // soak: HAProxy's maxconn, fitted to NOFILE
	Splice       bool
}

func benchMain(args []string) {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	o := benchOpts{}
	fs.StringVar(&o.relay, "relay", "bin/relayctl", "relayctl binary")
	fs.StringVar(&o.configs, "configs", "scripts/bench", "directory with the proxies' config templates")
	fs.StringVar(&o.out, "out", "", "write the markdown report here (e.g. docs/BENCHMARKS.md)")
	fs.StringVar(&o.json, "json", "bench-results.json", "write JSON results here")
	peers := fs.String("peers", "auto", "peer proxies to run: auto (those installed), none, or a list like haproxy,nginx,sniproxy,caddy")
	fs.StringVar(&o.only, "only", "", "run only paths whose name contains this (debugging)")
	fs.BoolVar(&o.quick, "quick", false, "tiny sizes: a functional check of every path, not a measurement")
	command := fs.String("command", "make bench", "command recorded in the report")
	fs.Parse(args)
	o.size, o.runs, o.idle, o.dur, o.conc, o.rttN = 1<<30, 3, 1000, 3*time.Second, 32, 5000
	if o.quick {
		o.size, o.runs, o.idle, o.dur, o.rttN = 4<<20, 1, 20, 200*time.Millisecond, 100
	}
	o.workers = runtime.NumCPU()
	o.self, _ = os.Executable()
	var err error
	if o.dir, err = os.MkdirTemp("", "relay-bench-"); err != nil {
		log.Fatal(err)
	}
	os.Chmod(o.dir, 0o755) // proxies that drop privileges read their files here
	cleanup := func() { stopAll(); os.RemoveAll(o.dir) }
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sig
		log.Printf("%v: stopping every process started", s)
		cleanup()
		os.Exit(1)
	}()

	rep := &Report{Machine: machineFacts(), Versions: map[string]string{}, Skipped: map[string]string{}, Command: *command}
	rep.Settings = Settings{BulkBytes: o.size, Runs: o.runs, IdleConns: o.idle, LoadSeconds: o.dur.Seconds(),
		Concurrency: o.conc, RTTs: o.rttN, Workers: o.workers}
	switch *peers {
	case "none":
	case "auto":
		for _, p := range []string{"haproxy", "nginx", "sniproxy", "caddy"} {
			if _, err := exec.LookPath(p); err != nil {
				rep.Skipped[p] = "not installed"
				continue
			}
			o.peers = append(o.peers, p)
		}
	default:
		o.peers = strings.Split(*peers, ",")
	}
	rep.Versions["relay"] = version(o.relay, "version")
	for _, p := range o.peers {
		rep.Versions[p] = peerVersion(p)
	}
	err = runBench(o, rep)
	cleanup()
	if err != nil {
		log.Fatal(err)
	}
	table := rep.markdown()
	fmt.Print("\n" + table)
	if o.json != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(o.json, append(b, '\n'), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	failed := false
	for _, p := range rep.Paths {
		if !p.OK {
			failed = true
			log.Printf("path %q failed, its figures are not valid: %s", p.Name, p.Error)
		}
	}
	if failed {
		os.Exit(1)
	}
	if o.out != "" {
		if err := writeBenchDoc(o.out, table); err != nil {
			log.Fatal(err)
		}
	}
}

func version(argv ...string) string {
	out, _ := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(line)
}

func peerVersion(p string) string {
	switch p {
	case "haproxy":
		return version("haproxy", "-v")
	case "nginx":
		return version("nginx", "-v")
	case "sniproxy":
		return version("sniproxy", "-V")
	case "caddy":
		return version("caddy", "version")
	}
	return ""
}

func freeAddr() (string, error) {
	l, err := listen("127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func mustFree() string {
	a, err := freeAddr()
	if err != nil {
		log.Fatal(err)
	}
	return a
}

func runBench(o benchOpts, rep *Report) error {
	up := struct{ tls, http, https string }{mustFree(), mustFree(), mustFree()}
	upDir := filepath.Join(o.dir, "upstream")
	os.MkdirAll(upDir, 0o755)
	srv, out, err := startPiped("loadgen serve", o.self, "serve", "-addr", up.tls, "-http-addr", up.http,
		"-https-addr", up.https, "-cert-dir", upDir)
	if err != nil {
		return err
	}
	if line, _ := out.ReadString('\n'); !strings.HasPrefix(line, "ready") {
		return errors.New("loadgen serve did not start")
	}
	go io.Copy(io.Discard, out)
	defer srv.stop()

	var direct, directTerm *PathResult
	for _, s := range o.specs() {
		if s.proxy != "" && s.proxy != "relay" && !slices.Contains(o.peers, s.proxy) {
			continue
		}
		if o.only != "" && !strings.Contains(s.name, o.only) && !strings.HasPrefix(s.name, "direct") {
			continue
		}
		if s.sockmap && os.Geteuid() != 0 {
			rep.Skipped[s.name] = "needs root (loads BPF programs)"
			continue
		}
		fmt.Fprintf(os.Stderr, "bench: %s ...\n", s.name)
		r := &PathResult{Name: s.name, Kind: s.kind, Proxy: s.proxy, OK: true}
		err := o.runPath(s, r, up.tls, up.http, up.https, upDir)
		if err != nil {
			r.OK, r.Error = false, err.Error()
			fmt.Fprintf(os.Stderr, "bench: %s: FAILED: %v\n", s.name, err)
		}
		switch s.name {
		case "direct":
			direct = r
		case "direct (Go HTTPS server)":
			directTerm = r
		}
		rep.Paths = append(rep.Paths, r)
	}
	ratio := func(v, d float64) float64 {
		if d == 0 {
			return 0
		}
		return v / d
	}
	for _, r := range rep.Paths {
		if r.Kind == "passthrough" && direct != nil && r != direct {
			r.RatioUp, r.RatioDown = ratio(r.UpGbps, direct.UpGbps), ratio(r.DownGbps, direct.DownGbps)
			r.RatioConns = ratio(r.Conns.PerSec, direct.Conns.PerSec)
		}
		if r.Kind == "terminate" && directTerm != nil && r != directTerm {
			r.RatioH1, r.RatioH2 = ratio(r.H1.PerSec, directTerm.H1.PerSec), ratio(r.H2.PerSec, directTerm.H2.PerSec)
		}
	}
	return nil
}

// runPath starts the path's proxy (if any), measures it and stops it.
func (o benchOpts) runPath(s pathSpec, r *PathResult, upTLS, upHTTP, upHTTPS, upDir string) error {
	addr, sni := upTLS, "bench.test"
	if s.kind == "terminate" {
		addr, sni = upHTTPS, "term.test"
	}
	var p *proc
	if s.tmpl != "" {
		dir := filepath.Join(o.dir, strings.NewReplacer(" ", "-", "(", "", ")", "", "+", "").Replace(s.name))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		os.Chmod(dir, 0o777) // sniproxy writes its pid file here as nobody
		addr = mustFree()
		host, port, _ := net.SplitHostPort(addr)
		d := tmplData{Listen: addr, ListenHost: host, ListenPort: port, Metrics: mustFree(), Upstream: upTLS,
			HTTPUpstream: upHTTP, Dir: dir, Cert: filepath.Join(upDir, "cert.pem"), Key: filepath.Join(upDir, "key.pem"),
			CertKey: filepath.Join(upDir, "cert+key.pem"), Workers: o.workers, Splice: s.splice}
		cfg, err := render(filepath.Join(o.configs, s.tmpl), filepath.Join(dir, s.tmpl), d)
		if err != nil {
			return err
		}
		if s.sockmap {
			unload, err := loadSockmap(dir)
			if err != nil {
				return fmt.Errorf("load the sockmap splice: %w", err)
			}
			defer unload()
		}
		var env []string
		if s.env != nil {
			env = s.env(dir)
		}
		if p, err = start(s.name, filepath.Join(dir, "log"), env, s.argv(cfg, dir)...); err != nil {
			return err
		}
		defer p.stop()
		if err := waitReady(p, addr, sni, s.kind); err != nil {
			return err
		}
		time.Sleep(time.Second) // settle before the idle RSS reading
		r.IdleRSSKB, r.IdleAnonKB = p.rssKB(), p.status("RssAnon:")
		if s.proxy == "relay" {
			r.GoIdle = goRuntime(d.Metrics)
		}
		err = o.holdIdle(p, addr, sni, s.kind == "terminate", func() {
			r.KBPerIdleConnAtOpen = float64(p.rssKB()-r.IdleRSSKB) / float64(o.idle)
		}, func() {
			r.LoadedRSSKB, r.LoadedAnonKB = p.rssKB(), p.status("RssAnon:")
			if s.proxy == "relay" {
				r.GoLoaded = goRuntime(d.Metrics)
			}
		})
		if err != nil {
			return err
		}
		r.KBPerIdleConn = float64(r.LoadedRSSKB-r.IdleRSSKB) / float64(o.idle)
		time.Sleep(200 * time.Millisecond) // let the proxy see the closes
	}
	cpu := func() float64 {
		if p == nil {
			return 0
		}
		return p.cpuSeconds()
	}
	if s.kind == "passthrough" {
		var ups, downs []float64
		c0 := cpu()
		for i := 0; i < o.runs; i++ {
			for _, dir := range []string{"up", "down"} {
				b, err := bulk(addr, sni, o.size, dir)
				if err != nil {
					return fmt.Errorf("bulk %s: %w", dir, err)
				}
				if !b.OK {
					return fmt.Errorf("bulk %s: bytes arrived changed or short", dir)
				}
				if dir == "up" {
					ups = append(ups, b.Gbps)
				} else {
					downs = append(downs, b.Gbps)
				}
			}
		}
		if p != nil {
			r.CPUSecPerGiB = (cpu() - c0) / (float64(2*o.runs) * float64(o.size) / (1 << 30))
		}
		r.UpGbps, r.DownGbps = median(ups), median(downs)
		var err error
		if r.RTT, err = rtt(addr, sni, o.rttN); err != nil {
			return fmt.Errorf("rtt: %w", err)
		}
		if r.Conns = conns(addr, sni, o.conc, o.dur); !r.Conns.OK {
			return fmt.Errorf("conns: %d errors (%s)", r.Conns.Errors, r.Conns.FirstErr)
		}
		return nil
	}
	for _, proto := range []string{"h1", "h2"} {
		c0 := cpu()
		g := getLoad(addr, sni, proto, o.conc, o.dur)
		if !g.OK {
			return fmt.Errorf("GET %s: %d errors (%s)", proto, g.Errors, g.FirstErr)
		}
		var us float64
		if p != nil {
			us = (cpu() - c0) * 1e6 / float64(g.Count)
		}
		if proto == "h1" {
			r.H1, r.CPUUsPerReqH1 = g, us
		} else {
			r.H2, r.CPUUsPerReqH2 = g, us
		}
	}
	return nil
}

func render(src, dst string, d tmplData) (string, error) {
	t, err := template.ParseFiles(src)
	if err != nil {
		return "", fmt.Errorf("parse template: %w", err)
	}
	var b bytes.Buffer
	if err := t.Execute(&b, d); err != nil {
		return "", fmt.Errorf("render %s: %w", src, err)
	}
	if err := os.WriteFile(dst, b.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("write config: %w", err)
	}
	return dst, nil
}

// waitReady waits until a request through the proxy works end to end.
func waitReady(p *proc, addr, sni, kind string) error {
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if p.exited() {
			return fmt.Errorf("%s exited at start:\n%s", p.name, p.tail())
		}
		var c net.Conn
		if c, err = dial(addr, sni); err == nil {
			c.Close()
			if kind == "terminate" {
				r := getLoad(addr, sni, "h1", 1, time.Millisecond)
				if r.OK {
					return nil
				}
				err = errors.New(r.FirstErr)
			} else if r := conns(addr, sni, 1, time.Millisecond); r.OK {
				return nil
			} else {
				err = errors.New(r.FirstErr)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready: %v\n%s", p.name, err, p.tail())
}

// holdIdle opens o.idle established TLS connections through the proxy in
// a helper process and calls sample while they are held.
func (o benchOpts) holdIdle(p *proc, addr, sni string, httpMode bool, atOpen, settled func()) error {
	args := []string{o.self, "idle", "-addr", addr, "-sni", sni, "-n", strconv.Itoa(o.idle)}
	if httpMode {
		args = append(args, "-http")
	}
	h, out, err := startPiped("idle holder", args...)
	if err != nil {
		return err
	}
	defer h.stop()
	ready := make(chan string, 1)
	go func() { line, _ := out.ReadString('\n'); ready <- line }()
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "ready") {
			return fmt.Errorf("idle connections through %s failed (see above)", p.name)
		}
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("idle connections through %s: timeout", p.name)
	}
	time.Sleep(500 * time.Millisecond)
	atOpen()
	if !o.quick {
		time.Sleep(5 * time.Second)
	}
	settled()
	return nil
}

// goRuntime reads a few Go runtime gauges from the relay's /metrics.
func goRuntime(metricsAddr string) map[string]float64 {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	m := map[string]float64{}
	for _, l := range strings.Split(string(b), "\n") {
		for _, name := range []string{"go_memstats_stack_inuse_bytes", "go_memstats_heap_inuse_bytes",
			"go_memstats_heap_idle_bytes", "go_memstats_heap_released_bytes", "go_memstats_sys_bytes", "go_threads"} {
			if v, ok := strings.CutPrefix(l, name+" "); ok {
				m[name], _ = strconv.ParseFloat(strings.TrimSpace(v), 64)
			}
		}
	}
	return m
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func machineFacts() map[string]string {
	m := map[string]string{"cpus": strconv.Itoa(runtime.NumCPU()), "go": runtime.Version()}
	if b, err := exec.Command("uname", "-r").Output(); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m["cpu"] = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		m["memory"] = strings.Join(strings.Fields(strings.TrimPrefix(line, "MemTotal:")), " ")
	}
	if b, err := os.ReadFile("/etc/debian_version"); err == nil {
		m["debian"] = strings.TrimSpace(string(b))
	}
	m["date"] = time.Now().UTC().Format("2006-01-02 15:04 UTC")
	return m
}
