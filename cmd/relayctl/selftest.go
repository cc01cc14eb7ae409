package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relay-gw/relay/acme"
	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/redirect"
)

func init() {
	register("selftest", "selftest [-c FILE] [--json] [--from NETNS] [--addr HOST]", cmdSelftest)
}

// stCheck is one verdict of a probe.
type stCheck struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
	Fix    string `json:"fix,omitempty"` // what to do when !OK
}

// stProbe is one connection the selftest made.
type stProbe struct {
	Route  string    `json:"route"` // the route's match, or "(no SNI)", "(unknown name)"
	Probe  string    `json:"probe"` // https, https-2-records, http
	SNI    string    `json:"sni,omitempty"`
	Checks []stCheck `json:"checks"`
	OK     bool      `json:"ok"`
}

type stReport struct {
	Target string    `json:"target"`
	From   string    `json:"from,omitempty"`
	Probes []stProbe `json:"probes"`
	OK     bool      `json:"ok"`
}

func (p *stProbe) add(name string, ok bool, detail, fix string) bool {
	c := stCheck{Name: name, OK: ok, Detail: detail}
	if !ok {
		c.Fix = fix
	}
	p.Checks = append(p.Checks, c)
	return ok
}

// selftest holds what the probes share.
type selftest struct {
	cfg    *config.Config
	target string // host the probes dial (the gateway as its clients see it)
	dial   func(addr string) (net.Conn, error)
	roots  *x509.CertPool
	httpsP string // steered port for TLS
	httpP  string
}

// cmdSelftest proves that what the config promises happens: for each
// route it makes real connections to the gateway's steered ports and
// checks, from the relay's counters and what comes back, that they were
// steered into the relay, took the route, reached the upstream with the
// right certificate. Exit status 1 when any check fails.
func cmdSelftest(e *env, args []string) error {
	fs, cfgPath := newConfigFlagSet(e, "selftest")
	asJSON := fs.Bool("json", false, "print JSON")
	from := fs.String("from", "", "network namespace (name in /run/netns or a path) to connect from, as a LAN host would (root)")
	addr := fs.String("addr", "", "address to connect to (default: 127.0.0.1, or with --from the namespace's default gateway)")
	if pos, err := parseInterspersed(fs, args); err != nil {
		return err
	} else if len(pos) != 0 {
		return errUsage
	}
	cfg, err := loadConfig(e, *cfgPath)
	if err != nil {
		return err
	}
	st := &selftest{cfg: cfg, httpsP: "443", httpP: "80"}
	if len(cfg.Steer.HTTPSPorts) > 0 {
		st.httpsP = strconv.Itoa(cfg.Steer.HTTPSPorts[0])
	}
	if len(cfg.Steer.HTTPPorts) > 0 {
		st.httpP = strconv.Itoa(cfg.Steer.HTTPPorts[0])
	}
	nsPath := *from
	if nsPath != "" && !strings.Contains(nsPath, "/") {
		nsPath = filepath.Join("/run/netns", nsPath)
	}
	st.dial = dialerIn(nsPath)
	st.target = *addr
	if st.target == "" {
		if nsPath == "" {
			st.target = "127.0.0.1"
		} else {
			gw, err := inNetns(nsPath, func() (string, error) {
				ip, err := redirect.DefaultGateway()
				if err != nil {
					return "", err
				}
				return ip.String(), nil
			})
			if err != nil {
				return fmt.Errorf("selftest --from %s: %w", *from, err)
			}
			st.target = gw
		}
	}
	if nsPath == "" && *addr == "" && cfg.Steer.BPF == "off" && !cfg.Steer.Local {
		fmt.Fprintln(e.stderr, "warning: with steer.bpf: off and steer.local: false nothing steers this host's own connections to 127.0.0.1:"+st.httpsP+"; run the selftest --from a client namespace (or set steer.local: true)")
	}
	st.roots = selftestRoots(cfg)
	rep := st.run()
	rep.From = *from
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		printSelftest(e.stdout, rep)
	}
	if !rep.OK {
		return exitError{1}
	}
	return nil
}

// inNetns runs f on a locked OS thread moved into the network namespace
// at path; the thread is discarded afterwards (never returned to Go's
// pool in a foreign namespace).
func inNetns[T any](path string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread dies with the goroutine
		var r result
		ns, err := os.Open(path)
		if err != nil {
			r.err = fmt.Errorf("open network namespace: %w", err)
			ch <- r
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			r.err = fmt.Errorf("enter network namespace %s (needs root): %w", path, err)
			ch <- r
			return
		}
		r.v, r.err = f()
		ch <- r
	}()
	r := <-ch
	return r.v, r.err
}

// dialerIn returns a TCP dialer whose sockets are created in the network
// namespace at path ("" = this process's). A socket keeps its namespace
// after creation, so only the dial runs on the moved thread.
func dialerIn(path string) func(addr string) (net.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(false)
	if path == "" {
		return func(addr string) (net.Conn, error) { return d.Dial("tcp", addr) }
	}
	return func(addr string) (net.Conn, error) {
		return inNetns(path, func() (net.Conn, error) { return d.Dial("tcp", addr) })
	}
}

// selftestRoots trusts the system roots, the internal CA and any
// certificate files the routes name.
func selftestRoots(cfg *config.Config) *x509.CertPool {
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if b, err := os.ReadFile(filepath.Join(cfg.StateDir, "ca", acme.RootCertFile)); err == nil {
		pool.AppendCertsFromPEM(b)
	}
	for _, r := range cfg.Routes {
		if r.Terminate != nil && r.Terminate.TLS.Mode == "files" {
			if b, err := os.ReadFile(r.Terminate.TLS.Cert); err == nil {
				for blk, rest := pem.Decode(b); blk != nil; blk, rest = pem.Decode(rest) {
					if c, err := x509.ParseCertificate(blk.Bytes); err == nil {
						pool.AddCert(c)
					}
				}
			}
		}
	}
	return pool
}

// probeName is the SNI that exercises a route's match.
func probeName(match string) string {
	if rest, ok := strings.CutPrefix(match, "*."); ok {
		return "selftest." + rest
	}
	return match
}

// counters is a snapshot of the relay's counters that show what it did
// with a connection.
type counters map[string]float64

var selftestFamilies = []string{"relay_connections_total", "relay_clienthello_errors_total", "relay_upstream_errors_total", "relay_tls_handshake_errors_total"}

func (st *selftest) snapshot() (counters, error) {
	fams, err := scrape(st.cfg.Listen.Metrics)
	if err != nil {
		return nil, err
	}
	c := counters{}
	for _, name := range selftestFamilies {
		for _, s := range fams[name] {
			var ls []string
			for _, l := range s.Labels {
				ls = append(ls, l.Name+"="+l.Value)
			}
			c[name+"{"+strings.Join(ls, ",")+"}"] = s.Value
		}
	}
	return c, nil
}

// delta returns the series that moved since before.
func (c counters) delta(before counters) map[string]float64 {
	out := map[string]float64{}
	for k, v := range c {
		if d := v - before[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

// observe waits (a little) until the relay counted something since
// before and returns what moved. Counters move when the relay decides,
// which is before our connection ends, but the scrape may race it.
func (st *selftest) observe(before counters, want string) map[string]float64 {
	var moved map[string]float64
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		after, err := st.snapshot()
		if err == nil {
			moved = after.delta(before)
			if _, ok := moved[want]; ok || time.Now().After(deadline) {
				return moved
			}
		} else if time.Now().After(deadline) {
			return nil
		}
	}
}

func connKey(route, action string) string {
	return "relay_connections_total{action=" + action + ",route=" + route + "}"
}

func describe(moved map[string]float64) string {
	if len(moved) == 0 {
		return "nothing"
	}
	var ks []string
	for k := range moved {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, " ")
}

func (st *selftest) run() *stReport {
	rep := &stReport{Target: st.target, OK: true}
	if _, err := st.snapshot(); err != nil {
		p := stProbe{Route: "(relay)", Probe: "metrics"}
		p.add("relay counters readable", false, fmt.Sprintf("listen.metrics %s: %v", st.cfg.Listen.Metrics, err),
			"start `relayctl serve` (the selftest reads its counters at listen.metrics; it must not be off)")
		rep.Probes, rep.OK = append(rep.Probes, p), false
		return rep
	}
	pqDone := false
	for i := range st.cfg.Routes {
		r := &st.cfg.Routes[i]
		if !r.IsName() {
			rep.Probes = append(rep.Probes, st.probeProtocol(r))
			continue
		}
		if len(r.ALPN) > 0 {
			continue // the TLS probes offer no ALPN
		}
		name := probeName(r.Match)
		rep.Probes = append(rep.Probes, st.probeTLS(r, name, r.Match, ""))
		if !pqDone && !r.Reject {
			pqDone = true
			rep.Probes = append(rep.Probes, st.probeTLS(r, name, r.Match, variantRecords), st.probeTLS(r, name, r.Match, variantSegment))
		}
		if st.cfg.Listen.HTTP != "off" && !r.Reject {
			rep.Probes = append(rep.Probes, st.probeHTTP(r, name))
		}
	}
	rep.Probes = append(rep.Probes, st.probeTLS(nil, "", "(no SNI)", ""))
	rep.Probes = append(rep.Probes, st.probeTLS(nil, "selftest-unknown.invalid", "(unknown name)", ""))
	for i := range rep.Probes {
		p := &rep.Probes[i]
		p.OK = true
		for _, c := range p.Checks {
			p.OK = p.OK && c.OK
		}
		rep.OK = rep.OK && p.OK
	}
	return rep
}

// Variants of the ClientHello's delivery.
const (
	variantRecords = "2-records"      // split across two TLS records (post-quantum sized)
	variantSegment = "1-byte-segment" // its first byte alone in the first TCP segment
)

// splitConn sends the first TLS record written (the ClientHello) as two
// records, as a client with a post-quantum key share may (routers that
// read one record lose the SNI), or with its first byte alone in a TCP
// segment (routers that read one segment lose it).
type splitConn struct {
	net.Conn
	variant string
	done    bool
	hello   int
}

func (c *splitConn) Write(b []byte) (int, error) {
	if c.done || len(b) < 5 || b[0] != 22 {
		return c.Conn.Write(b)
	}
	c.done = true
	if c.variant == variantSegment {
		c.hello = int(b[3])<<8 | int(b[4])
		if _, err := c.Conn.Write(b[:1]); err != nil { // Go sets TCP_NODELAY: a segment of its own
			return 0, err
		}
		time.Sleep(50 * time.Millisecond)
		if _, err := c.Conn.Write(b[1:]); err != nil {
			return 1, err
		}
		return len(b), nil
	}
	n := int(b[3])<<8 | int(b[4])
	if 5+n > len(b) || n < 2 {
		return c.Conn.Write(b)
	}
	c.hello = n
	body, k := b[5:5+n], n/2
	var out []byte
	for _, part := range [][]byte{body[:k], body[k:]} {
		out = append(out, b[0], b[1], b[2], byte(len(part)>>8), byte(len(part)))
		out = append(out, part...)
	}
	out = append(out, b[5+n:]...)
	if _, err := c.Conn.Write(out); err != nil {
		return 0, err
	}
	return len(b), nil
}

// expectedUnknown is the counter an unrouted name moves. The selftest
// dials the gateway itself, so with unknown_sni: original there is no
// other original destination: the relay refuses it (route unknown).
func (st *selftest) expectedUnknown() (route, action string) {
	switch u := st.cfg.UnknownSNI; u {
	case "reject", "original", "":
		return "unknown", "reject"
	default:
		for _, r := range st.cfg.Routes {
			if r.Match == u {
				return r.Match, r.Action()
			}
		}
		return u, "passthrough"
	}
}

func (st *selftest) probeTLS(r *config.Route, sni, label, variant string) stProbe {
	p := stProbe{Route: label, Probe: "https", SNI: sni}
	if variant != "" {
		p.Probe = "https-" + variant
	}
	wantRoute, wantAction := st.expectedUnknown()
	if r != nil {
		wantRoute, wantAction = r.Match, r.Action()
	}
	addr := net.JoinHostPort(st.target, st.httpsP)
	before, _ := st.snapshot()
	conn, err := st.dial(addr)
	if err != nil {
		p.add("steered into the relay", false, fmt.Sprintf("dial %s: %v", addr, err), notSteered)
		return p
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var raw net.Conn = conn
	split := &splitConn{Conn: conn, variant: variant}
	if variant != "" {
		raw = split
	}
	tcfg := &tls.Config{ServerName: sni, InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}}
	if variant == variantRecords {
		tcfg.CurvePreferences = []tls.CurveID{tls.X25519MLKEM768}
	}
	tc := tls.Client(raw, tcfg)
	herr := tc.Handshake()
	var httpErr error
	var status int
	if herr == nil && r != nil && r.Terminate != nil {
		status, httpErr = httpGet(tc, sni)
	}
	tc.Close()
	moved := st.observe(before, connKey(wantRoute, wantAction))
	steered := len(moved) > 0
	how := "relay counted " + describe(moved)
	switch variant {
	case variantRecords:
		how = fmt.Sprintf("ClientHello of %d bytes (X25519MLKEM768 key share) sent as 2 records; %s", split.hello, how)
	case variantSegment:
		how = fmt.Sprintf("ClientHello of %d bytes, its first byte alone in the first TCP segment; %s", split.hello, how)
	}
	if !p.add("steered into the relay", steered, how,
		fmt.Sprintf("the relay did not see a connection to %s: check `sudo relayctl rules show` (chains, jumps, sk_lookup) or run `sudo relayctl rules apply --watch`", addr)) {
		return p
	}
	_, chosen := moved[connKey(wantRoute, wantAction)]
	p.add("route chosen", chosen, fmt.Sprintf("want route %s (%s)", wantRoute, wantAction),
		"the relay chose another route: "+describe(moved)+"; check the routes' match in the config")
	if r == nil {
		return p
	}
	switch {
	case r.Reject:
		p.add("rejected", herr != nil, "handshake refused as configured", "a reject route completed a handshake")
	case r.Terminate != nil:
		if !p.add("handshake", herr == nil, "", fmt.Sprintf("TLS handshake with the relay failed: %v; see the relay's log (certificate for %s?)", herr, sni)) {
			return p
		}
		p.add("certificate valid for the name", st.verify(tc.ConnectionState(), sni), "",
			fmt.Sprintf("the relay's certificate does not verify for %s (trusting the system roots and the internal CA); see `relayctl certs list`", sni))
		p.add("upstream reached", httpErr == nil && status < 500, fmt.Sprintf("GET / answered %d via %s", status, r.Terminate.Upstream),
			fmt.Sprintf("the relay could not reach %s (status %d, %v): start the upstream or fix terminate.upstream", r.Terminate.Upstream, status, httpErr))
	default:
		up := ""
		if len(r.Passthrough) > 0 {
			up = r.Passthrough[0]
		}
		if !p.add("upstream reached", herr == nil, "TLS handshake through the relay to "+up,
			fmt.Sprintf("handshake through the relay failed (%v): is the upstream %s up? (relay_upstream_errors_total)", herr, up)) {
			return p
		}
		ok, detail := upstreamCert(tc.ConnectionState(), up, sni)
		p.add("upstream's own certificate", ok, detail, "the certificate is not the upstream's: the relay or something on the path answered instead ("+detail+")")
	}
	return p
}

// notSteered is the fix when the steered port refuses while the relay
// runs (its metrics answered): the steering is what is missing.
const notSteered = "the relay runs (its metrics answer) but this port is not steered to it: check `sudo relayctl rules show` (chains, jumps, sk_lookup) and run `sudo relayctl rules apply`, or `rules apply --watch` to keep it in place"

func httpGet(c net.Conn, host string) (int, error) {
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: "+host+"\r\nUser-Agent: relayctl-selftest\r\nConnection: close\r\n\r\n"); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

func (st *selftest) verify(cs tls.ConnectionState, name string) bool {
	if len(cs.PeerCertificates) == 0 {
		return false
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: name, Roots: st.roots, Intermediates: inter})
	return err == nil
}

// upstreamCert compares the certificate seen through the relay with the
// one the upstream presents when dialled directly from here.
func upstreamCert(cs tls.ConnectionState, up, sni string) (bool, string) {
	if len(cs.PeerCertificates) == 0 {
		return false, "no certificate"
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	td := &tls.Dialer{NetDialer: d, Config: &tls.Config{ServerName: sni, InsecureSkipVerify: true}}
	c, err := td.DialContext(ctx, "tcp", up)
	if err != nil {
		return false, fmt.Sprintf("dial the upstream %s directly from this host: %v", up, err)
	}
	defer c.Close()
	direct := c.(*tls.Conn).ConnectionState().PeerCertificates[0]
	got := cs.PeerCertificates[0]
	if sha256.Sum256(direct.Raw) != sha256.Sum256(got.Raw) {
		return false, fmt.Sprintf("got %q, the upstream %s presents %q", got.Subject.CommonName, up, direct.Subject.CommonName)
	}
	return true, fmt.Sprintf("same certificate as %s presents directly (%s)", up, got.Subject.CommonName)
}

func (st *selftest) probeHTTP(r *config.Route, name string) stProbe {
	p := stProbe{Route: r.Match, Probe: "http", SNI: name}
	addr := net.JoinHostPort(st.target, st.httpP)
	before, _ := st.snapshot()
	conn, err := st.dial(addr)
	if err != nil {
		p.add("steered into the relay", false, fmt.Sprintf("dial %s: %v", addr, err), notSteered)
		return p
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /selftest?x=1 HTTP/1.1\r\nHost: " + name + "\r\nUser-Agent: relayctl-selftest\r\nConnection: close\r\n\r\n"
	var resp *http.Response
	if _, err = io.WriteString(conn, req); err == nil {
		resp, err = http.ReadResponse(bufio.NewReader(conn), nil)
	}
	conn.Close()
	moved := st.observe(before, connKey(r.Match, "redirect"))
	if !p.add("steered into the relay", len(moved) > 0, "relay counted "+describe(moved),
		fmt.Sprintf("the relay did not see a connection to %s: check `sudo relayctl rules show` or run `sudo relayctl rules apply --watch`", addr)) {
		return p
	}
	if err != nil {
		p.add("308 to https", false, err.Error(), "the relay's http port did not answer; see its log")
		return p
	}
	resp.Body.Close()
	want := "https://" + name + "/selftest?x=1"
	p.add("308 to https", resp.StatusCode == http.StatusPermanentRedirect && resp.Header.Get("Location") == want,
		fmt.Sprintf("%d Location %s", resp.StatusCode, resp.Header.Get("Location")),
		fmt.Sprintf("want 308 to %s (a routed Host gets a redirect to https)", want))
	return p
}

// ovpnReset is an OpenVPN client's hard reset (P_CONTROL_HARD_RESET_CLIENT_V2,
// key 0, a session id, no acks, packet id 0), as sent over TCP.
var ovpnReset = []byte{0, 14, 7 << 3, 'r', 'e', 'l', 'a', 'y', 's', 't', '1', 0, 0, 0, 0, 0}

// probeProtocol checks a protocol or silence route: the relay must count
// the connection under it and, but for OpenVPN (whose server may drop
// unauthenticated resets: tls-auth), the upstream must answer.
func (st *selftest) probeProtocol(r *config.Route) stProbe {
	label := r.Label()
	p := stProbe{Route: label, Probe: "protocol"}
	addr := net.JoinHostPort(st.target, st.httpsP)
	before, _ := st.snapshot()
	conn, err := st.dial(addr)
	if err != nil {
		p.add("steered into the relay", false, fmt.Sprintf("dial %s: %v", addr, err), notSteered)
		return p
	}
	wait := 5 * time.Second
	if r.Silence > 0 {
		wait += r.Silence.D()
	}
	conn.SetDeadline(time.Now().Add(wait))
	var send []byte
	var want string // the upstream's answer starts with it
	switch r.Protocol {
	case "ssh":
		send, want = []byte("SSH-2.0-relayctl_selftest\r\n"), "SSH-"
	case "http":
		send, want = []byte("HEAD / HTTP/1.1\r\nHost: selftest.invalid\r\nUser-Agent: relayctl-selftest\r\nConnection: close\r\n\r\n"), "HTTP/"
	case "openvpn":
		send = ovpnReset
	}
	var got []byte
	if _, err = conn.Write(send); err == nil && r.Protocol != "openvpn" {
		buf := make([]byte, 64)
		n, rerr := io.ReadAtLeast(conn, buf, max(1, len(want)))
		got, err = buf[:n], rerr
	}
	conn.Close()
	moved := st.observe(before, connKey(label, "passthrough"))
	if !p.add("steered into the relay", len(moved) > 0, "relay counted "+describe(moved),
		fmt.Sprintf("the relay did not see a connection to %s: check `sudo relayctl rules show` or run `sudo relayctl rules apply --watch`", addr)) {
		return p
	}
	_, chosen := moved[connKey(label, "passthrough")]
	p.add("route chosen", chosen, "want route "+label+" (passthrough)", "the relay chose another route: "+describe(moved))
	if r.Protocol == "openvpn" {
		return p
	}
	up := ""
	if len(r.Passthrough) > 0 {
		up = r.Passthrough[0]
	}
	p.add("upstream answered", err == nil && strings.HasPrefix(string(got), want), fmt.Sprintf("%q from %s", got, up),
		fmt.Sprintf("no answer through the relay from %s (%v): is it up? (relay_upstream_errors_total)", up, err))
	return p
}

func printSelftest(w io.Writer, rep *stReport) {
	from := "this host"
	if rep.From != "" {
		from = "namespace " + rep.From
	}
	fmt.Fprintf(w, "selftest from %s to %s:\n", from, rep.Target)
	for _, p := range rep.Probes {
		verdict := "PASS"
		if !p.OK {
			verdict = "FAIL"
		}
		sni := p.SNI
		if sni == "" {
			sni = "-"
		}
		fmt.Fprintf(w, "%s  %s  %s (SNI/Host %s)\n", verdict, p.Route, p.Probe, sni)
		for _, c := range p.Checks {
			mark := "ok  "
			if !c.OK {
				mark = "FAIL"
			}
			line := "    " + mark + " " + c.Name
			if c.Detail != "" {
				line += ": " + c.Detail
			}
			fmt.Fprintln(w, line)
			if !c.OK && c.Fix != "" {
				fmt.Fprintln(w, "         fix: "+c.Fix)
			}
		}
	}
	if rep.OK {
		fmt.Fprintln(w, "selftest: all checks passed")
	} else {
		fmt.Fprintln(w, "selftest: FAILED (see fix: lines)")
	}
}
