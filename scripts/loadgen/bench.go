package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Report is what `loadgen bench` measures, per path.
type Report struct {
	Machine map[string]string `json:"machine"`
	Command string            `json:"command"`
	Paths   []*PathResult     `json:"paths"`
}

// PathResult is one path (direct, relay passthrough, ...).
type PathResult struct {
	Name          string   `json:"name"`
	UpGbps        float64  `json:"up_gbit_s"`   // median
	DownGbps      float64  `json:"down_gbit_s"` // median
	RatioUp       float64  `json:"ratio_up"`    // to direct
	RatioDown     float64  `json:"ratio_down"`
	CPUSecPerGiB  float64  `json:"proxy_cpu_s_per_gib,omitempty"`
	RTT           Latency  `json:"rtt_64b"`
	Conns         ConnRate `json:"conns"`
	IdleRSSKB     int64    `json:"idle_rss_kb,omitempty"`
	LoadedRSSKB   int64    `json:"rss_with_idle_conns_kb,omitempty"`
	KBPerIdleConn float64  `json:"kb_per_idle_conn,omitempty"`
	AllOK         bool     `json:"all_ok"`
}

type benchOpts struct {
	relay   string // relayctl binary
	out     string // docs/BENCHMARKS.md
	json    string
	size    int64
	runs    int
	idle    int
	connDur time.Duration
	rttN    int
	self    string // this binary
}

func benchMain(args []string) {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	o := benchOpts{}
	fs.StringVar(&o.relay, "relay", "bin/relayctl", "relayctl binary")
	fs.StringVar(&o.out, "out", "", "write the markdown report here (e.g. docs/BENCHMARKS.md)")
	fs.StringVar(&o.json, "json", "bench-results.json", "write JSON results here")
	quick := fs.Bool("quick", false, "tiny sizes: a functional check of every path, not a measurement")
	fs.Parse(args)
	o.size, o.runs, o.idle, o.connDur, o.rttN = 1<<30, 3, 1000, 3*time.Second, 5000
	if *quick {
		o.size, o.runs, o.idle, o.connDur, o.rttN = 8<<20, 1, 50, 300*time.Millisecond, 200
	}
	o.self, _ = os.Executable()
	rep, err := runBench(o)
	if err != nil {
		log.Fatal(err)
	}
	rep.Command = "make bench" + map[bool]string{true: " QUICK=1", false: ""}[*quick]
	table := rep.markdown()
	fmt.Print(table)
	if o.json != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		os.WriteFile(o.json, b, 0o644)
	}
	if o.out != "" {
		if err := writeBenchDoc(o.out, table); err != nil {
			log.Fatal(err)
		}
	}
	for _, p := range rep.Paths {
		if !p.AllOK {
			log.Fatalf("path %s moved wrong bytes or failed: the figures are not valid", p.Name)
		}
	}
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// proc is a process the bench started; stop kills it.
type proc struct{ cmd *exec.Cmd }

func start(name string, args ...string) (*proc, *bufio.Reader, error) {
	cmd := exec.Command(name, args...)
	cmd.Stderr = os.Stderr
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	return &proc{cmd}, bufio.NewReader(out), nil
}

func (p *proc) stop() {
	p.cmd.Process.Kill()
	p.cmd.Wait()
}

func (p *proc) rssKB() int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// cpuSeconds is user+system CPU time of the process so far.
func (p *proc) cpuSeconds() float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func (o benchOpts) measure(name, addr string, proxy *proc) *PathResult {
	r := &PathResult{Name: name, AllOK: true}
	var up, down []float64
	var cpu float64
	for i := 0; i < o.runs; i++ {
		var c0 float64
		if proxy != nil {
			c0 = proxy.cpuSeconds()
		}
		u := bulk(addr, "bench.test", o.size, "up")
		d := bulk(addr, "bench.test", o.size, "down")
		if proxy != nil {
			cpu += proxy.cpuSeconds() - c0
		}
		up, down = append(up, u.Gbps), append(down, d.Gbps)
		r.AllOK = r.AllOK && u.OK && d.OK
	}
	r.UpGbps, r.DownGbps = median(up), median(down)
	if proxy != nil {
		r.CPUSecPerGiB = cpu / (float64(2*o.runs) * float64(o.size) / (1 << 30))
	}
	r.RTT = rtt(addr, "bench.test", o.rttN)
	r.Conns = conns(addr, "bench.test", 32, o.connDur)
	r.AllOK = r.AllOK && r.RTT.OK && r.Conns.OK
	if proxy != nil {
		r.IdleRSSKB = proxy.rssKB()
		p, out, err := start(o.self, "idle", "-addr", addr, "-sni", "bench.test", "-n", strconv.Itoa(o.idle))
		if err == nil {
			line, _ := out.ReadString('\n')
			if strings.HasPrefix(line, "ready") {
				time.Sleep(500 * time.Millisecond)
				r.LoadedRSSKB = proxy.rssKB()
				r.KBPerIdleConn = float64(r.LoadedRSSKB-r.IdleRSSKB) / float64(o.idle)
			} else {
				r.AllOK = false
			}
			p.stop()
		}
	}
	return r
}

func runBench(o benchOpts) (*Report, error) {
	rep := &Report{Machine: machineFacts()}
	upAddr := freeAddr()
	srv, out, err := start(o.self, "serve", "-addr", upAddr, "-sni", "bench.test")
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	if line, _ := out.ReadString('\n'); !strings.HasPrefix(line, "ready") {
		return nil, fmt.Errorf("loadgen serve did not start")
	}
	go io.Copy(io.Discard, out)

	direct := o.measure("direct", upAddr, nil)
	rep.Paths = append(rep.Paths, direct)

	dir, _ := os.MkdirTemp("", "relay-bench")
	defer os.RemoveAll(dir)
	relayAddr, metrics := freeAddr(), freeAddr()
	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir: %s
listen: {https: %q, http: "off", metrics: %q}
unknown_sni: reject
log: {level: warn}
routes:
  - match: bench.test
    passthrough: %s
`, dir, relayAddr, metrics, upAddr)), 0o644)
	relay, _, err := start(o.relay, "serve", "-c", cfg)
	if err != nil {
		return nil, err
	}
	defer relay.stop()
	for i := 0; i < 100; i++ {
		if resp, err := http.Get("http://" + metrics + "/metrics"); err == nil {
			resp.Body.Close()
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second) // settle before the idle RSS reading
	idleRSS := relay.rssKB()
	p := o.measure("relay passthrough (splice)", relayAddr, relay)
	// Per-connection memory against the idle reading: growth left by the
	// bulk runs counts against the connections (a conservative figure).
	p.IdleRSSKB = idleRSS
	p.KBPerIdleConn = float64(p.LoadedRSSKB-idleRSS) / float64(o.idle)
	rep.Paths = append(rep.Paths, p)
	for _, r := range rep.Paths[1:] {
		r.RatioUp, r.RatioDown = r.UpGbps/direct.UpGbps, r.DownGbps/direct.DownGbps
	}
	return rep, nil
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
	m["date"] = time.Now().UTC().Format("2006-01-02")
	return m
}

func (r *Report) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: %s CPUs (%s), Linux %s, %s, %s. Command: `%s`.\n\n",
		r.Machine["cpus"], r.Machine["cpu"], r.Machine["kernel"], r.Machine["go"], r.Machine["date"], r.Command)
	fmt.Fprintln(&b, "| path | bulk up Gbit/s (× direct) | bulk down Gbit/s (× direct) | proxy CPU s/GiB | 64 B RTT p50 / p99 µs | new TLS conns/s (p50 / p99 ms) | idle RSS | RSS + idle conns | KB per idle conn |")
	fmt.Fprintln(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, p := range r.Paths {
		ratio := func(v, x float64) string {
			if x == 0 {
				return fmt.Sprintf("%.2f", v)
			}
			return fmt.Sprintf("%.2f (%.2f×)", v, x)
		}
		cpu, rss, loaded, per := "—", "—", "—", "—"
		if p.CPUSecPerGiB > 0 {
			cpu = fmt.Sprintf("%.2f", p.CPUSecPerGiB)
		}
		if p.IdleRSSKB > 0 {
			rss = fmt.Sprintf("%.1f MB", float64(p.IdleRSSKB)/1024)
			loaded = fmt.Sprintf("%.1f MB", float64(p.LoadedRSSKB)/1024)
			per = fmt.Sprintf("%.1f", p.KBPerIdleConn)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %.0f / %.0f | %.0f (%.2f / %.2f) | %s | %s | %s |\n",
			p.Name, ratio(p.UpGbps, p.RatioUp), ratio(p.DownGbps, p.RatioDown), cpu, p.RTT.P50, p.RTT.P99,
			p.Conns.PerSec, p.Conns.P50/1000, p.Conns.P99/1000, rss, loaded, per)
	}
	return b.String()
}

// writeBenchDoc replaces the generated section of the markdown file,
// keeping the hand-written notes around it.
func writeBenchDoc(path, table string) error {
	const begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
	old, _ := os.ReadFile(path)
	s := string(old)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		s = "# Benchmarks\n\n" + begin + "\n" + end + "\n"
		i, j = strings.Index(s, begin), strings.Index(s, end)
	}
	s = s[:i+len(begin)] + "\n" + table + s[j:]
	return os.WriteFile(path, []byte(s), 0o644)
}
