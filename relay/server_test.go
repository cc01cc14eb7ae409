package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// pattern returns n pseudo-random bytes from seed (cheap to regenerate).
func pattern(seed uint64, n int) io.Reader {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return io.LimitReader(readerFunc(func(p []byte) (int, error) {
		for i := range p {
			p[i] = byte(r.Uint32())
		}
		return len(p), nil
	}), int64(n))
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

func hashOf(r io.Reader) ([32]byte, int64) {
	h := sha256.New()
	n, _ := io.Copy(h, r)
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out, n
}

func TestPassthroughIntegrity64MiB(t *testing.T) {
	const size = 64 << 20
	ca := newTestCA(t)
	type result struct {
		sum [32]byte
		n   int64
	}
	got := make(chan result, 1)
	up := tlsUpstream(t, ca, func(c *tls.Conn) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			sum, n := hashOf(c)
			got <- result{sum, n}
		}()
		io.Copy(c, pattern(2, size))
		c.CloseWrite()
		wg.Wait()
	})
	r := startRelay(t, baseConfig(config.Route{Match: "bulk.test", Passthrough: config.Upstreams{up}}))
	c, err := r.dialTLS(t, "bulk.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var down result
	done := make(chan struct{})
	go func() {
		down.sum, down.n = hashOf(c)
		close(done)
	}()
	if _, err := io.Copy(c, pattern(1, size)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	<-done
	upRes := <-got
	wantUp, _ := hashOf(pattern(1, size))
	wantDown, _ := hashOf(pattern(2, size))
	if upRes.n != size || upRes.sum != wantUp {
		t.Errorf("upstream received %d bytes, sha256 match %v; want %d intact", upRes.n, upRes.sum == wantUp, size)
	}
	if down.n != size || down.sum != wantDown {
		t.Errorf("client received %d bytes, sha256 match %v; want %d intact", down.n, down.sum == wantDown, size)
	}
	// tls CloseWrite sends close_notify, not a TCP FIN: the relay sees the
	// client's end only now. Counters land when the connection ends.
	c.Close()
	waitFor(t, func() bool {
		m := r.metricsText(t)
		return metricValue(m, `relay_bytes_total{direction="upstream",route="bulk.test"}`) > size &&
			metricValue(m, `relay_bytes_total{direction="downstream",route="bulk.test"}`) > size
	})
	m := r.metricsText(t)
	if v := metricValue(m, `relay_connections_total{action="passthrough",route="bulk.test"}`); v != 1 {
		t.Errorf("relay_connections_total passthrough = %v, want 1", v)
	}
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if cond() {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatal("condition not reached within 5s")
}

// rawUpstream is a plain TCP upstream: the relay does not care what follows
// the ClientHello, which lets tests drive half-close and PROXY headers.
func rawUpstream(t testing.TB, h func(c *net.TCPConn)) string {
	ln := listenLoopback(t)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); h(c.(*net.TCPConn)) }()
		}
	}()
	return ln.Addr().String()
}

func dialRelay(t testing.TB, r *testRelay) *net.TCPConn {
	t.Helper()
	c, err := dialer(5*time.Second).Dial("tcp", r.HTTPSAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func TestPassthroughHalfCloseAndSplitHello(t *testing.T) {
	hello := clientHello(t, "half.test")
	up := rawUpstream(t, func(c *net.TCPConn) {
		got := make([]byte, len(hello))
		io.ReadFull(c, got)
		if !bytes.Equal(got, hello) {
			c.Write([]byte("BAD HELLO"))
			return
		}
		rest, _ := io.ReadAll(c) // until the client's half-close arrives
		fmt.Fprintf(c, "got %d bytes after EOF", len(rest))
		c.CloseWrite()
	})
	r := startRelay(t, baseConfig(config.Route{Match: "half.test", Passthrough: config.Upstreams{up}}))
	c := dialRelay(t, r)
	c.SetNoDelay(true)
	// The hello in three writes with pauses: three TCP segments.
	third := len(hello) / 3
	for _, part := range [][]byte{hello[:third], hello[third : 2*third], hello[2*third:]} {
		c.Write(part)
		time.Sleep(30 * time.Millisecond)
	}
	c.Write([]byte("payload"))
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(reply) != "got 7 bytes after EOF" {
		t.Fatalf("reply %q, want the upstream to see our half-close after 7 bytes", reply)
	}
}

func TestPassthroughFailoverAndProxyV2(t *testing.T) {
	deadLn, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := deadLn.Addr().String() // closed: connection refused
	deadLn.Close()
	hdrs := make(chan []byte, 4)
	up := rawUpstream(t, func(c *net.TCPConn) {
		buf := make([]byte, 16)
		io.ReadFull(c, buf)
		n := int(buf[14])<<8 | int(buf[15])
		rest := make([]byte, n)
		io.ReadFull(c, rest)
		hdrs <- append(buf, rest...)
		io.Copy(io.Discard, c)
	})
	r := startRelay(t, baseConfig(config.Route{Match: "pp.test", Passthrough: config.Upstreams{dead, up}, ProxyProtocol: "v2"}))
	for i := 0; i < 2; i++ {
		c := dialRelay(t, r)
		c.Write(clientHello(t, "pp.test", "h2"))
		select {
		case h := <-hdrs:
			if !bytes.HasPrefix(h, proxyV2Sig) || h[12] != 0x21 || h[13] != 0x11 {
				t.Fatalf("not a PROXY v2 TCP4 header: %x", h)
			}
			if !bytes.Contains(h, append([]byte{pp2TypeAuthority, 0, 7}, "pp.test"...)) ||
				!bytes.Contains(h, append([]byte{pp2TypeALPN, 0, 2}, "h2"...)) {
				t.Errorf("PROXY v2 header lacks the SNI/ALPN TLVs: %x", h)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("upstream never got a connection: failover did not happen")
		}
		c.Close()
	}
	waitFor(t, func() bool {
		return metricValue(r.metricsText(t), `relay_upstream_errors_total{reason="refused",route="pp.test"}`) >= 1
	})
}

func TestUnknownSNIPolicies(t *testing.T) {
	ca := newTestCA(t)
	echoName := func(c *tls.Conn) { io.WriteString(c, "upstream:"+c.ConnectionState().ServerName) }
	upA := tlsUpstream(t, ca, echoName)
	routes := []config.Route{{Match: "a.test", Passthrough: config.Upstreams{upA}}, {Match: "gone.test", Reject: true}}

	t.Run("reject", func(t *testing.T) {
		cfg := baseConfig(routes...)
		cfg.UnknownSNI = "reject"
		r := startRelay(t, cfg)
		_, err := r.dialTLS(t, "nope.test", ca.pool)
		if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			t.Fatalf("dial unknown name: %v, want a TLS unrecognized_name alert", err)
		}
		_, err = r.dialTLS(t, "gone.test", ca.pool)
		if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			t.Fatalf("dial rejected route: %v, want unrecognized_name", err)
		}
		m := r.metricsText(t)
		if v := metricValue(m, `relay_connections_total{action="reject",route="unknown"}`); v != 1 {
			t.Errorf("reject unknown = %v, want 1", v)
		}
		if v := metricValue(m, `relay_connections_total{action="reject",route="gone.test"}`); v != 1 {
			t.Errorf("reject gone.test = %v, want 1", v)
		}
	})
	t.Run("route", func(t *testing.T) {
		cfg := baseConfig(routes...)
		cfg.UnknownSNI = "a.test"
		r := startRelay(t, cfg)
		c, err := tls.DialWithDialer(dialer(5*time.Second), "tcp", r.HTTPSAddr().String(),
			&tls.Config{ServerName: "other.test", InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		if string(b) != "upstream:other.test" {
			t.Fatalf("got %q", b)
		}
	})
	t.Run("original", func(t *testing.T) {
		// Transparent: the original destination (as REDIRECT would report
		// it) is another host, so the relay dials it.
		upOrig := tlsUpstream(t, ca, echoName)
		origAP := netip.MustParseAddrPort(upOrig)
		cfg := baseConfig(routes...)
		cfg.UnknownSNI = "original"
		r := startRelay(t, cfg, func(o *Options) {
			o.OriginalDst = func(*net.TCPConn) (netip.AddrPort, bool, error) { return origAP, true, nil }
			o.IsLocal = func(a netip.Addr) bool { return false }
		})
		c, err := r.dialTLS(t, "nowhere.test", ca.pool)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		if string(b) != "upstream:nowhere.test" {
			t.Fatalf("got %q", b)
		}
		if v := metricValue(r.metricsText(t), `relay_connections_total{action="passthrough",route="original"}`); v != 1 {
			t.Errorf("original passthrough = %v, want 1", v)
		}
	})
	t.Run("original to this host is never dialled", func(t *testing.T) {
		cfg := baseConfig(routes...)
		cfg.UnknownSNI = "original"
		r := startRelay(t, cfg, func(o *Options) {
			// REDIRECT of a connection to the relay's own address.
			o.OriginalDst = func(c *net.TCPConn) (netip.AddrPort, bool, error) {
				return c.LocalAddr().(*net.TCPAddr).AddrPort(), true, nil
			}
		})
		_, err := r.dialTLS(t, "nowhere.test", ca.pool)
		if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			t.Fatalf("got %v, want rejection (addressed to the gateway, no route)", err)
		}
	})
}

func TestTerminateHTTP(t *testing.T) {
	type seen struct {
		Host, XFF, XFP, XFH, Proto, Path string
	}
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(seen{
			Host: r.Host, XFF: strings.Join(r.Header.Values("X-Forwarded-For"), ","),
			XFP: r.Header.Get("X-Forwarded-Proto"), XFH: r.Header.Get("X-Forwarded-Host"),
			Proto: r.Proto, Path: r.URL.RequestURI(),
		})
	}))
	defer upstream.Close()
	cfg := baseConfig(config.Route{Match: "*.home.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}})
	r := startRelay(t, cfg)
	for _, h2 := range []bool{false, true} {
		t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
			tr := &http.Transport{
				TLSClientConfig:   &tls.Config{RootCAs: r.ca.pool},
				ForceAttemptHTTP2: h2,
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return dialer(5*time.Second).DialContext(ctx, "tcp", r.HTTPSAddr().String())
				},
			}
			if !h2 {
				tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
			}
			defer tr.CloseIdleConnections()
			req, _ := http.NewRequest("GET", "https://app.home.test/x?y=1", nil)
			req.Header.Set("X-Forwarded-For", "6.6.6.6") // spoofed: must be replaced
			resp, err := (&http.Client{Transport: tr}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var s seen
			json.NewDecoder(resp.Body).Decode(&s)
			wantProto := "HTTP/1.1"
			if h2 {
				wantProto = "HTTP/2.0"
			}
			if resp.Proto != wantProto {
				t.Errorf("client spoke %s, want %s", resp.Proto, wantProto)
			}
			want := seen{Host: "app.home.test", XFF: "127.0.0.1", XFP: "https", XFH: "app.home.test", Proto: "HTTP/1.1", Path: "/x?y=1"}
			if s != want {
				t.Errorf("upstream saw %+v\nwant %+v", s, want)
			}
		})
	}
	if v := metricValue(r.metricsText(t), `relay_connections_total{action="terminate",route="*.home.test"}`); v != 2 {
		t.Errorf("terminate connections = %v, want 2", v)
	}
}

func TestTerminateWebSocketAndTCP(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want upgrade", 400)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		io.Copy(c, brw) // echo
	}))
	defer upstream.Close()
	echo := rawUpstream(t, func(c *net.TCPConn) { io.Copy(c, c) })
	cfg := baseConfig(
		config.Route{Match: "ws.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}},
		config.Route{Match: "tcp.test", Terminate: &config.Terminate{Upstream: "tcp://" + echo, TLS: config.TLS{Mode: "internal"}}},
	)
	r := startRelay(t, cfg)

	c, err := r.dialTLS(t, "ws.test", r.ca.pool, "http/1.1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	io.WriteString(c, "ping")
	got := make([]byte, 4)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping" {
		t.Fatalf("websocket echo: %q %v", got, err)
	}

	tc, err := r.dialTLS(t, "tcp.test", r.ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, "raw bytes")
	tc.CloseWrite()
	b, _ := io.ReadAll(tc)
	if string(b) != "raw bytes" {
		t.Fatalf("tcp:// echo = %q", b)
	}
}

type fakeChallenges map[string]string

func (f fakeChallenges) HTTP01(host, token string) (string, bool) {
	v, ok := f[host+"/"+token]
	return v, ok
}

func TestHTTPPort(t *testing.T) {
	cfg := baseConfig(
		config.Route{Match: "nas.test", Passthrough: config.Upstreams{"127.0.0.1:1"}},
		config.Route{Match: "*.home.test", Terminate: &config.Terminate{Upstream: "http://127.0.0.1:1", TLS: config.TLS{Mode: "internal"}}},
	)
	r := startRelay(t, cfg, func(o *Options) { o.HTTPChallenges = fakeChallenges{"x.home.test/tok": "tok.keyauth"} })
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(host, path string) (*http.Response, string) {
		req, _ := http.NewRequest("GET", "http://"+r.HTTPAddr().String()+path, nil)
		req.Host = host
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	resp, _ := get("NAS.test:80", "/a/b?c=d")
	if resp.StatusCode != 308 || resp.Header.Get("Location") != "https://nas.test/a/b?c=d" {
		t.Errorf("routed name: %d %q, want 308 to https://nas.test/a/b?c=d", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, _ = get("x.home.test", "/")
	if resp.StatusCode != 308 || resp.Header.Get("Location") != "https://x.home.test/" {
		t.Errorf("wildcard: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, body := get("x.home.test", "/.well-known/acme-challenge/tok")
	if resp.StatusCode != 200 || body != "tok.keyauth" {
		t.Errorf("acme token: %d %q", resp.StatusCode, body)
	}
	resp, _ = get("elsewhere.test", "/")
	if resp.StatusCode != 404 {
		t.Errorf("unrouted: %d, want 404", resp.StatusCode)
	}
	m := r.metricsText(t)
	if v := metricValue(m, `relay_connections_total{action="redirect",route="nas.test"}`); v != 1 {
		t.Errorf("redirect counter = %v", v)
	}
}

func TestBadClientsDoNotBlockOthers(t *testing.T) {
	ca := newTestCA(t)
	up := tlsUpstream(t, ca, func(c *tls.Conn) { io.WriteString(c, "ok") })
	cfg := baseConfig(config.Route{Match: "good.test", Passthrough: config.Upstreams{up}})
	cfg.Limits.HelloTimeout = config.Duration(time.Minute) // silent clients stay for the whole test
	r := startRelay(t, cfg)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 300; i++ { // silent
		conns = append(conns, dialRelay(t, r))
	}
	for i := 0; i < 100; i++ { // garbage and half hellos
		c := dialRelay(t, r)
		if i%2 == 0 {
			c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		} else {
			c.Write(clientHello(t, "good.test")[:20])
		}
		conns = append(conns, c)
	}
	c, err := r.dialTLS(t, "good.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, _ := io.ReadAll(c)
	if string(b) != "ok" {
		t.Fatalf("normal client got %q with 400 bad clients connected", b)
	}
	waitFor(t, func() bool {
		return metricValue(r.metricsText(t), `relay_clienthello_errors_total{reason="not_tls"}`) == 50
	})
}

func TestReloadKeepsLiveConnections(t *testing.T) {
	ca := newTestCA(t)
	const size = 8 << 20
	slow := tlsUpstream(t, ca, func(c *tls.Conn) {
		io.WriteString(c, "v1:")
		r := pattern(3, size)
		buf := make([]byte, 256<<10)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				c.Write(buf[:n])
				time.Sleep(5 * time.Millisecond)
			}
			if err != nil {
				return
			}
		}
	})
	v2 := tlsUpstream(t, ca, func(c *tls.Conn) { io.WriteString(c, "v2:") })
	cfg := baseConfig(config.Route{Match: "app.test", Passthrough: config.Upstreams{slow}})
	r := startRelay(t, cfg)
	c, err := r.dialTLS(t, "app.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	prefix := make([]byte, 3)
	io.ReadFull(c, prefix)

	// A broken config is refused and counted; the live transfer goes on.
	bad := baseConfig(config.Route{Match: "app.test", Terminate: &config.Terminate{Upstream: "ftp://x", TLS: config.TLS{Mode: "internal"}}})
	if err := r.Reload(bad); err == nil {
		t.Error("reload with a ftp:// upstream succeeded")
	}
	if err := r.Reload(baseConfig(config.Route{Match: "app.test", Passthrough: config.Upstreams{v2}})); err != nil {
		t.Fatal(err)
	}
	c2, err := r.dialTLS(t, "app.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	b, _ := io.ReadAll(c2)
	if string(b) != "v2:" {
		t.Fatalf("new connection after reload got %q, want v2:", b)
	}
	sum, n := hashOf(c)
	want, _ := hashOf(pattern(3, size))
	if string(prefix) != "v1:" || n != size || sum != want {
		t.Fatalf("live transfer across reload: prefix %q, %d bytes, intact %v", prefix, n, sum == want)
	}
	m := r.metricsText(t)
	if metricValue(m, `relay_config_reloads_total{result="success"}`) != 1 || metricValue(m, `relay_config_reloads_total{result="failure"}`) != 1 {
		t.Errorf("reload counters wrong:\n%s", grep(m, "relay_config_reloads_total"))
	}
}

func TestDrainLetsTransfersFinish(t *testing.T) {
	ca := newTestCA(t)
	release := make(chan struct{})
	up := tlsUpstream(t, ca, func(c *tls.Conn) {
		<-release
		io.WriteString(c, "finished")
	})
	r := startRelay(t, baseConfig(config.Route{Match: "d.test", Passthrough: config.Upstreams{up}}))
	c, err := r.dialTLS(t, "d.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		return metricValue(r.metricsText(t), `relay_active_connections{action="passthrough",route="d.test"}`) == 1
	})
	r.cancel() // SIGTERM
	time.Sleep(100 * time.Millisecond)
	if _, err := net.DialTimeout("tcp", r.HTTPSAddr().String(), time.Second); err == nil {
		t.Error("relay still accepts while draining")
	}
	close(release)
	b, err := io.ReadAll(c)
	c.Close()
	if string(b) != "finished" {
		t.Fatalf("drained connection got %q (%v)", b, err)
	}
	if err := <-r.done; err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatal(err)
	}
	r.done <- nil // for the cleanup
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestHTTPPortTransitPassthrough(t *testing.T) {
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "origin saw "+r.Host)
	}))
	defer origin.Close()
	ap := netip.MustParseAddrPort(strings.TrimPrefix(origin.URL, "http://"))
	cfg := baseConfig(config.Route{Match: "nas.test", Passthrough: config.Upstreams{"127.0.0.1:1"}})
	cfg.UnknownSNI = "original"
	r := startRelay(t, cfg, func(o *Options) {
		o.OriginalDst = func(*net.TCPConn) (netip.AddrPort, bool, error) { return ap, true, nil }
		o.IsLocal = func(netip.Addr) bool { return false }
	})
	req, _ := http.NewRequest("GET", "http://"+r.HTTPAddr().String()+"/", nil)
	req.Host = "example.org"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "origin saw example.org" {
		t.Fatalf("transit http got %q", b)
	}
}

// twoRecords re-frames a one-record ClientHello as two handshake records,
// as some clients send large (post-quantum) hellos.
func twoRecords(rec []byte) []byte {
	body := rec[5:]
	half := len(body) / 2
	var out []byte
	for _, part := range [][]byte{body[:half], body[half:]} {
		out = append(out, rec[0], rec[1], rec[2], byte(len(part)>>8), byte(len(part)))
		out = append(out, part...)
	}
	return out
}

func TestHelloOverTwoRecordsReachesTLSUpstream(t *testing.T) {
	ca := newTestCA(t)
	up := tlsUpstream(t, ca, func(c *tls.Conn) { io.WriteString(c, "sni="+c.ConnectionState().ServerName) })
	r := startRelay(t, baseConfig(config.Route{Match: "two.test", Passthrough: config.Upstreams{up}}))
	raw := dialRelay(t, r)
	// A real TLS client whose first flight is rewritten into two records.
	tc := tls.Client(&reframeConn{TCPConn: raw}, &tls.Config{ServerName: "two.test", RootCAs: ca.pool})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(tc)
	if string(b) != "sni=two.test" {
		t.Fatalf("got %q", b)
	}
}

type reframeConn struct {
	*net.TCPConn
	done bool
}

func (c *reframeConn) Write(p []byte) (int, error) {
	if !c.done && len(p) > 5 && p[0] == 22 {
		c.done = true
		if _, err := c.TCPConn.Write(twoRecords(p)); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.TCPConn.Write(p)
}

// TestDrainTimeoutClosesPassthrough: a passthrough connection that does
// not finish within limits.drain_timeout is closed, and Serve returns.
func TestDrainTimeoutClosesPassthrough(t *testing.T) {
	ca := newTestCA(t)
	hold := make(chan struct{})
	defer close(hold)
	up := tlsUpstream(t, ca, func(c *tls.Conn) { <-hold })
	cfg := baseConfig(config.Route{Match: "d.test", Passthrough: config.Upstreams{up}})
	cfg.Limits.DrainTimeout = config.Duration(300 * time.Millisecond)
	r := startRelay(t, cfg)
	c, err := r.dialTLS(t, "d.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		return metricValue(r.metricsText(t), `relay_active_connections{action="passthrough",route="d.test"}`) == 1
	})
	r.stopWithin(t, 5*time.Second)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open after the drain timeout: %v", err)
	}
}

// TestDrainTimeoutClosesTerminate: a request through a terminate route
// that does not finish within limits.drain_timeout is cut, and Serve
// returns.
func TestDrainTimeoutClosesTerminate(t *testing.T) {
	hold := make(chan struct{})
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		<-hold
	}))
	defer upstream.Close()
	defer close(hold) // before upstream.Close, which waits for the handler
	cfg := baseConfig(config.Route{Match: "t.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}})
	cfg.Limits.DrainTimeout = config.Duration(300 * time.Millisecond)
	r := startRelay(t, cfg)
	c, err := r.dialTLS(t, "t.test", r.ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: t.test\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 100)); err != nil {
		t.Fatalf("response headers: %v", err)
	}
	r.stopWithin(t, 5*time.Second)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadAll(c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("connection still open after the drain timeout")
	}
}
