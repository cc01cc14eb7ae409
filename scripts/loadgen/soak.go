package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// `loadgen soak`: at once, N held passthrough connections (handshake and a
// 16-byte echo each), M held terminate connections (h1 and h2, one GET
// each), slowloris clients (5 bytes of a TLS record header, then silence
// or one byte a second), a paced transfer whose sha256 must match, and a
// normal client making requests (a new passthrough connection each),
// through the relay and, when installed, HAProxy, in the same run.

// SoakResult is one proxy's run.
type SoakResult struct {
	Proxy         string  `json:"proxy"`
	Held          int     `json:"held_passthrough"`
	HeldFailed    int     `json:"held_passthrough_failed"`
	Term          int     `json:"held_terminate"`
	TermFailed    int     `json:"held_terminate_failed"`
	Slowloris     int     `json:"slowloris_opened"`
	OpenSeconds   float64 `json:"seconds_to_open"`
	IdleRSSKB     int64   `json:"idle_rss_kb"`
	RSSAtOpenKB   int64   `json:"rss_1s_after_last_open_kb"`
	RSSSettledKB  int64   `json:"rss_settled_kb"`
	RSSClosedKB   int64   `json:"rss_after_close_kb"`
	IdleFDs       int     `json:"idle_open_files"`
	HeldFDs       int     `json:"open_files_held"`
	ClosedFDs     int     `json:"open_files_after_close"`
	HeapAtOpenMB  float64 `json:"go_heap_inuse_1s_after_last_open_mb,omitempty"`
	HeapSettledMB float64 `json:"go_heap_inuse_settled_mb,omitempty"`
	HeapClosedMB  float64 `json:"go_heap_inuse_after_close_mb,omitempty"`
	Requests      int     `json:"normal_requests"`
	ReqErrors     int     `json:"normal_request_errors"`
	P50ms         float64 `json:"normal_p50_ms"`
	P99ms         float64 `json:"normal_p99_ms"`
	TransferOK    bool    `json:"transfer_intact"`
	TransferErr   string  `json:"transfer_error,omitempty"`
	Error         string  `json:"error,omitempty"`
}

type soakOpts struct {
	benchOpts
	n, m, slow int
	transfer   int64
	rate       int64 // transfer bytes per second
	settle     time.Duration
	afterClose time.Duration
	nofile     uint64
}

func soakMain(args []string) {
	fs := flag.NewFlagSet("soak", flag.ExitOnError)
	o := soakOpts{}
	fs.StringVar(&o.relay, "relay", "bin/relayctl", "relayctl binary")
	fs.StringVar(&o.configs, "configs", "scripts/bench", "directory with the proxies' config templates")
	fs.StringVar(&o.json, "json", "soak-results.json", "write JSON results here")
	peers := fs.String("peers", "auto", "auto (haproxy if installed) or none")
	fs.IntVar(&o.n, "n", 8000, "held passthrough connections")
	fs.IntVar(&o.m, "m", 500, "held terminate connections (half h1, half h2)")
	fs.IntVar(&o.slow, "slowloris", 1000, "slowloris connections (half silent, half dribbling)")
	fs.Int64Var(&o.transfer, "transfer", 256<<20, "bytes of the paced transfer")
	fs.Int64Var(&o.rate, "rate", 32<<20, "pace of the transfer, bytes/s")
	fs.DurationVar(&o.settle, "settle", 5*time.Second, "hold this long after the last connection opened")
	fs.DurationVar(&o.afterClose, "after-close", 30*time.Second, "sample memory this long after every connection closed")
	fs.Parse(args)
	var rl syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	o.nofile = rl.Cur
	o.workers = runtime.NumCPU()
	o.self, _ = os.Executable()
	var err error
	if o.dir, err = os.MkdirTemp("", "relay-soak-"); err != nil {
		log.Fatal(err)
	}
	os.Chmod(o.dir, 0o755)
	defer os.RemoveAll(o.dir)
	defer stopAll()
	proxies := []string{"relay"}
	if _, err := exec.LookPath("haproxy"); err == nil && *peers == "auto" {
		proxies = append(proxies, "haproxy")
	}
	var results []*SoakResult
	failed := false
	for _, p := range proxies {
		fmt.Fprintf(os.Stderr, "soak: %s: %d passthrough + %d terminate held, %d slowloris, %d MiB transfer (open-file limit %d) ...\n",
			p, o.n, o.m, o.slow, o.transfer>>20, o.nofile)
		r := &SoakResult{Proxy: p}
		if err := o.run(p, r); err != nil {
			r.Error = err.Error()
		}
		if r.Error != "" || r.HeldFailed > 0 || r.TermFailed > 0 || !r.TransferOK {
			failed = true
		}
		results = append(results, r)
	}
	fmt.Print(soakMarkdown(results, o))
	if o.json != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		os.WriteFile(o.json, append(b, '\n'), 0o644)
	}
	if failed {
		log.Print("soak: a proxy failed a connection, the transfer or the run (see the table)")
		os.Exit(1)
	}
}

func (o soakOpts) run(proxy string, r *SoakResult) error {
	up := struct{ tls, http, https string }{mustFree(), mustFree(), mustFree()}
	upDir := filepath.Join(o.dir, "upstream-"+proxy)
	os.MkdirAll(upDir, 0o755)
	srv, out, err := startPiped("loadgen serve", o.self, "serve", "-addr", up.tls, "-http-addr", up.http, "-https-addr", up.https, "-cert-dir", upDir)
	if err != nil {
		return err
	}
	defer srv.stop()
	if line, _ := out.ReadString('\n'); !strings.HasPrefix(line, "ready") {
		return errors.New("loadgen serve did not start")
	}
	go io.Copy(io.Discard, out)

	dir := filepath.Join(o.dir, proxy)
	os.MkdirAll(dir, 0o777)
	addr := mustFree()
	d := tmplData{Listen: addr, Listen2: addr, Metrics: mustFree(), Upstream: up.tls, HTTPUpstream: up.http, Dir: dir,
		Cert: filepath.Join(upDir, "cert.pem"), Key: filepath.Join(upDir, "key.pem"), CertKey: filepath.Join(upDir, "cert+key.pem"),
		Workers: o.workers, NOFILE: o.nofile, MaxConn: (o.nofile - 100) / 2}
	tmpl, argv := "relay-soak.yaml", func(cfg string) []string { return []string{o.relay, "serve", "-c", cfg} }
	if proxy == "haproxy" {
		d.Listen2 = mustFree()
		tmpl, argv = "haproxy-soak.cfg", func(cfg string) []string { return []string{"haproxy", "-db", "-f", cfg} }
	}
	cfg, err := render(filepath.Join(o.configs, tmpl), filepath.Join(dir, tmpl), d)
	if err != nil {
		return err
	}
	p, err := start(proxy, filepath.Join(dir, "log"), []string{"GOMAXPROCS=" + fmt.Sprint(o.workers)}, argv(cfg)...)
	if err != nil {
		return err
	}
	defer p.stop()
	if err := waitReady(p, addr, "bench.test", "passthrough"); err != nil {
		return err
	}
	if err := waitReady(p, d.Listen2, "term.test", "terminate"); err != nil {
		return err
	}
	time.Sleep(time.Second)
	pid := p.cmd.Process.Pid
	heap := func() float64 {
		if proxy != "relay" {
			return 0
		}
		return goRuntime(d.Metrics)["go_memstats_heap_inuse_bytes"] / (1 << 20)
	}
	r.IdleRSSKB, r.IdleFDs = p.rssKB(), openFiles(pid)

	stop := make(chan struct{})
	var bg sync.WaitGroup
	// The normal client: a new passthrough connection and a ping each.
	var lat []time.Duration
	var reqErr atomic.Int64
	bg.Add(1)
	go func() {
		defer bg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			t0 := time.Now()
			if err := ping(addr); err != nil {
				reqErr.Add(1)
				continue
			}
			lat = append(lat, time.Since(t0))
		}
	}()
	// The paced transfer.
	bg.Add(1)
	go func() {
		defer bg.Done()
		if err := pacedDownload(addr, o.transfer, o.rate); err != nil {
			r.TransferErr = err.Error()
			return
		}
		r.TransferOK = true
	}()
	// Slowloris.
	var slow []net.Conn
	for i := range o.slow {
		c, err := dialer().Dial("tcp", addr)
		if err != nil {
			break
		}
		c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00})
		slow = append(slow, c)
		if i%2 == 1 {
			bg.Add(1)
			go func() {
				defer bg.Done()
				for {
					select {
					case <-stop:
						return
					case <-time.After(time.Second):
					}
					if _, err := c.Write([]byte{0x01}); err != nil {
						return
					}
				}
			}()
		}
	}
	r.Slowloris = len(slow)

	t0 := time.Now()
	held := holdMany(o.n, 64, func() (io.Closer, error) { return heldEcho(addr) })
	var nth atomic.Int64
	term := holdMany(o.m, 16, func() (io.Closer, error) { return heldGet(d.Listen2, nth.Add(1)%2 == 0) })
	r.OpenSeconds = time.Since(t0).Seconds()
	r.Held, r.HeldFailed, r.Term, r.TermFailed = len(held.ok), held.failed, len(term.ok), term.failed
	time.Sleep(time.Second)
	r.RSSAtOpenKB, r.HeldFDs, r.HeapAtOpenMB = p.rssKB(), openFiles(pid), heap()
	time.Sleep(o.settle)
	r.RSSSettledKB, r.HeapSettledMB = p.rssKB(), heap()
	close(stop)
	for _, c := range slow {
		c.Close()
	}
	bg.Wait()
	for _, c := range append(held.ok, term.ok...) {
		c.Close()
	}
	r.Requests, r.ReqErrors = len(lat), int(reqErr.Load())
	p50, p99 := percentiles(lat)
	r.P50ms, r.P99ms = p50/1000, p99/1000
	time.Sleep(o.afterClose)
	r.RSSClosedKB, r.ClosedFDs, r.HeapClosedMB = p.rssKB(), openFiles(pid), heap()
	if p.exited() {
		return fmt.Errorf("%s exited:\n%s", proxy, p.tail())
	}
	if held.failed > 0 || term.failed > 0 {
		return fmt.Errorf("first failures: %s / %s", held.first, term.first)
	}
	return nil
}

type heldSet struct {
	ok     []io.Closer
	failed int
	first  string
}

// holdMany opens n connections with conc workers.
func holdMany(n, conc int, open func() (io.Closer, error)) heldSet {
	var (
		mu   sync.Mutex
		s    heldSet
		next atomic.Int64
		wg   sync.WaitGroup
	)
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				c, err := open()
				mu.Lock()
				if err != nil {
					if s.failed++; s.first == "" {
						s.first = err.Error()
					}
				} else {
					s.ok = append(s.ok, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return s
}

func heldEcho(addr string) (io.Closer, error) {
	c, err := dial(addr, "bench.test")
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	msg := []byte("E0123456789abcdef")
	got := make([]byte, 16)
	if _, err = c.Write(msg); err == nil {
		_, err = io.ReadFull(c, got)
	}
	if err != nil || string(got) != string(msg[1:]) {
		c.Close()
		return nil, fmt.Errorf("echo: %q, %v", got, err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

func heldGet(addr string, h2 bool) (io.Closer, error) {
	if h2 {
		cl := client(addr, "term.test", "h2", 1)
		resp, err := cl.Get("https://term.test/small")
		if err != nil {
			return nil, err
		}
		if err := checkSmall(resp); err != nil {
			return nil, err
		}
		resp.Body.Close()
		return closerFunc(cl.CloseIdleConnections), nil
	}
	c, err := dial(addr, "term.test")
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := getOn(c, "term.test"); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

func ping(addr string) error {
	c, err := dial(addr, "bench.test")
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("P")); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "pong" {
		return fmt.Errorf("ping: %q, %v", b, err)
	}
	return nil
}

// pacedDownload reads size bytes at rate and checks their sha256.
func pacedDownload(addr string, size, rate int64) error {
	want, _ := writeN(io.Discard, size)
	c, err := dial(addr, "bench.test")
	if err != nil {
		return err
	}
	defer c.Close()
	req := append([]byte("D"), binary.BigEndian.AppendUint64(nil, uint64(size))...)
	if _, err := c.Write(req); err != nil {
		return err
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	start := time.Now()
	var got int64
	for got < size {
		n, err := c.Read(buf)
		h.Write(buf[:n])
		got += int64(n)
		if err != nil {
			break
		}
		if ahead := time.Duration(float64(got)/float64(rate)*float64(time.Second)) - time.Since(start); ahead > 0 {
			time.Sleep(ahead)
		}
	}
	if got != size || [32]byte(h.Sum(nil)) != want {
		return fmt.Errorf("transfer: %d of %d bytes, sha256 match %v", got, size, [32]byte(h.Sum(nil)) == want)
	}
	return nil
}

func openFiles(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

func soakMarkdown(rs []*SoakResult, o soakOpts) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nSoak: %d passthrough + %d terminate connections held, %d slowloris, %d MiB paced transfer (%d MiB/s), open-file limit %d for every process.\n\n",
		o.n, o.m, o.slow, o.transfer>>20, o.rate>>20, o.nofile)
	row := func(name string, f func(r *SoakResult) string) {
		b.WriteString("| " + name + " |")
		for _, r := range rs {
			b.WriteString(" " + f(r) + " |")
		}
		b.WriteString("\n")
	}
	b.WriteString("| |")
	for _, r := range rs {
		b.WriteString(" " + r.Proxy + " |")
	}
	b.WriteString("\n| --- |" + strings.Repeat(" --- |", len(rs)) + "\n")
	row("held passthrough / failed", func(r *SoakResult) string { return fmt.Sprintf("%d / %d", r.Held, r.HeldFailed) })
	row("held terminate / failed", func(r *SoakResult) string { return fmt.Sprintf("%d / %d", r.Term, r.TermFailed) })
	row("slowloris opened", func(r *SoakResult) string { return fmt.Sprint(r.Slowloris) })
	row("time to open", func(r *SoakResult) string { return fmt.Sprintf("%.1f s", r.OpenSeconds) })
	row("open files: idle / held / after close", func(r *SoakResult) string {
		return fmt.Sprintf("%d / %d / %d", r.IdleFDs, r.HeldFDs, r.ClosedFDs)
	})
	row("RSS: idle / 1 s after last open / settled / after close", func(r *SoakResult) string {
		return fmt.Sprintf("%.1f / %.1f / %.1f / %.1f MB", mb(r.IdleRSSKB), mb(r.RSSAtOpenKB), mb(r.RSSSettledKB), mb(r.RSSClosedKB))
	})
	row("KB per held connection (1 s after last open / settled)", func(r *SoakResult) string {
		n := float64(r.Held + r.Term)
		if n == 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f / %.1f", float64(r.RSSAtOpenKB-r.IdleRSSKB)/n, float64(r.RSSSettledKB-r.IdleRSSKB)/n)
	})
	row("Go heap in use: 1 s after last open / settled / after close", func(r *SoakResult) string {
		if r.Proxy != "relay" {
			return "-"
		}
		return fmt.Sprintf("%.1f / %.1f / %.1f MB", r.HeapAtOpenMB, r.HeapSettledMB, r.HeapClosedMB)
	})
	row("normal requests p50 / p99 (errors)", func(r *SoakResult) string {
		return fmt.Sprintf("%.1f / %.1f ms (%d of %d)", r.P50ms, r.P99ms, r.ReqErrors, r.Requests+r.ReqErrors)
	})
	row("transfer intact", func(r *SoakResult) string {
		if r.TransferOK {
			return "yes"
		}
		return "NO " + r.TransferErr
	})
	for _, r := range rs {
		if r.Error != "" {
			fmt.Fprintf(&b, "\n%s: %s\n", r.Proxy, oneLine(r.Error))
		}
	}
	return b.String()
}

func mb(kb int64) float64 { return float64(kb) / 1000 }
