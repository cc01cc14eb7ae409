package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

func TestParseProxyHeader(t *testing.T) {
	v2 := func(cmd, fam byte, body []byte) []byte {
		h := append([]byte(nil), proxyV2Sig...)
		h = append(h, cmd, fam)
		h = binary.BigEndian.AppendUint16(h, uint16(len(body)))
		return append(h, body...)
	}
	v4body := []byte{203, 0, 113, 9, 192, 0, 2, 1, 0x30, 0x39, 1, 0xbb}
	for _, tc := range []struct {
		name     string
		in       []byte
		src, dst string // "" = local
		n        int
		err      error
	}{
		{"v1 tcp4", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 12345 443\r\nTLS"), "203.0.113.9:12345", "192.0.2.1:443", 44, nil},
		{"v1 tcp6", []byte("PROXY TCP6 2001:db8::9 2001:db8::1 1 65535\r\n"), "[2001:db8::9]:1", "[2001:db8::1]:65535", 44, nil},
		{"v1 unknown", []byte("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n\x16"), "", "", 35, nil},
		{"v1 incomplete", []byte("PROXY TCP4 203.0.113.9 192.0"), "", "", 0, errProxyIncomplete},
		{"prefix", []byte("PROX"), "", "", 0, errProxyIncomplete},
		{"v1 LF only", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 1 2\n"), "", "", 0, errProxyMalformed},
		{"v1 family mismatch", []byte("PROXY TCP4 2001:db8::9 192.0.2.1 1 2\r\n"), "", "", 0, errProxyMalformed},
		{"v1 bad port", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 65536 2\r\n"), "", "", 0, errProxyMalformed},
		{"v1 leading zero", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 01 2\r\n"), "", "", 0, errProxyMalformed},
		{"v1 fields", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 1\r\n"), "", "", 0, errProxyMalformed},
		{"v1 too long", []byte("PROXY TCP4 " + strings.Repeat("1", 120)), "", "", 0, errProxyMalformed},
		{"v2 tcp4 + tlv", v2(0x21, 0x11, append(v4body, pp2TypeAuthority, 0, 1, 'x')), "203.0.113.9:12345", "192.0.2.1:443", 16 + 16, nil},
		{"v2 tcp6", v2(0x21, 0x21, append(append(netip.MustParseAddr("2001:db8::9").AsSlice(), netip.MustParseAddr("2001:db8::1").AsSlice()...), 0, 80, 1, 0xbb)),
			"[2001:db8::9]:80", "[2001:db8::1]:443", 16 + 36, nil},
		{"v2 local", v2(0x20, 0x00, nil), "", "", 16, nil},
		{"v2 unix", v2(0x21, 0x31, make([]byte, 216)), "", "", 16 + 216, nil},
		{"v2 short block", v2(0x21, 0x11, v4body[:8]), "", "", 0, errProxyMalformed},
		{"v2 version", v2(0x11, 0x11, v4body), "", "", 0, errProxyMalformed},
		{"v2 command", v2(0x22, 0x11, v4body), "", "", 0, errProxyMalformed},
		{"v2 huge", v2(0x21, 0x11, make([]byte, 4000)), "", "", 0, errProxyMalformed},
		{"v2 incomplete", v2(0x21, 0x11, v4body)[:20], "", "", 0, errProxyIncomplete},
		{"tls", []byte{0x16, 3, 1, 0, 10}, "", "", 0, errNoProxyHeader},
		{"http", []byte("GET / HTTP/1.1\r\n"), "", "", 0, errNoProxyHeader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info, n, err := parseProxyHeader(tc.in)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err %v, want %v", err, tc.err)
			}
			if err != nil {
				return
			}
			if n != tc.n {
				t.Errorf("length %d, want %d", n, tc.n)
			}
			if tc.src == "" {
				if !info.local {
					t.Errorf("%+v, want local", info)
				}
				return
			}
			if info.local || info.src != mustAP(tc.src) || info.dst != mustAP(tc.dst) {
				t.Errorf("%+v, want %s -> %s", info, tc.src, tc.dst)
			}
		})
	}
}

// Our own PROXY out headers parse back to what they said.
func TestProxyHeaderRoundTrip(t *testing.T) {
	for _, pair := range [][2]string{{"203.0.113.9:5555", "192.0.2.1:443"}, {"[2001:db8::9]:5555", "[2001:db8::1]:443"}} {
		src, dst := net.TCPAddrFromAddrPort(mustAP(pair[0])), mustAP(pair[1])
		for _, h := range [][]byte{proxyHeaderV1(src, dst), proxyHeaderV2(src, dst, &ClientHello{ServerName: "a.test", ALPN: []string{"h2"}})} {
			info, n, err := parseProxyHeader(h)
			if err != nil || n != len(h) || info.src != mustAP(pair[0]) || info.dst != dst {
				t.Errorf("%q: %+v %d %v", h, info, n, err)
			}
		}
	}
}

// readProxyHeader must leave every byte after the header on the socket:
// the ClientHello is read from there next.
func TestReadProxyHeaderNeverReadsPast(t *testing.T) {
	hello := clientHello(t, "a.test")
	v2 := proxyHeaderV2(net.TCPAddrFromAddrPort(mustAP("203.0.113.9:1")), mustAP("192.0.2.1:443"), nil)
	for _, tc := range []struct {
		name    string
		hdr     []byte
		segment int // write in segments of this size; 0 = one write
	}{
		{"v1", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 1 443\r\n"), 0},
		{"v1 unknown", []byte("PROXY UNKNOWN\r\n"), 0},
		{"v1 in 3-byte segments", []byte("PROXY TCP4 203.0.113.9 192.0.2.1 1 443\r\n"), 3},
		{"v2", v2, 0},
		{"v2 in 5-byte segments", v2, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln := listenLoopback(t)
			go func() {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					return
				}
				defer c.Close()
				c.(*net.TCPConn).SetNoDelay(true)
				all := append(append([]byte(nil), tc.hdr...), hello...)
				if tc.segment == 0 {
					c.Write(all)
				} else {
					for i := 0; i < len(tc.hdr); i += tc.segment {
						c.Write(tc.hdr[i:min(i+tc.segment, len(tc.hdr))])
						time.Sleep(5 * time.Millisecond)
					}
					c.Write(hello)
				}
				io.Copy(io.Discard, c)
			}()
			c, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			tc2 := c.(*net.TCPConn)
			info, err := readProxyHeader(tc2, time.Now().Add(10*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			if !info.local && info.src != mustAP("203.0.113.9:1") {
				t.Errorf("source %v", info.src)
			}
			got, err := ReadClientHello(tc2, 10*time.Second, 65536)
			if err != nil {
				t.Fatalf("hello after the header: %v", err)
			}
			if !bytes.Equal(got.Raw, hello) {
				t.Error("the hello after the header lost or gained bytes")
			}
		})
	}
}

func TestReadProxyHeaderTimesOut(t *testing.T) {
	ln := listenLoopback(t)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Write([]byte("PROXY TCP4 1.2.3.4")) // and never the rest
			time.Sleep(5 * time.Second)
			c.Close()
		}
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = readProxyHeader(c.(*net.TCPConn), time.Now().Add(200*time.Millisecond))
	if !errors.Is(err, ErrHelloTimeout) {
		t.Fatalf("err %v, want a timeout", err)
	}
}

func FuzzParseProxyHeader(f *testing.F) {
	f.Add([]byte("PROXY TCP4 203.0.113.9 192.0.2.1 12345 443\r\n"))
	f.Add([]byte("PROXY TCP6 2001:db8::9 2001:db8::1 1 65535\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add(proxyHeaderV2(net.TCPAddrFromAddrPort(mustAP("203.0.113.9:1")), mustAP("192.0.2.1:443"), &ClientHello{ServerName: "a.test", ALPN: []string{"h2"}}))
	f.Add(proxyHeaderV2(net.TCPAddrFromAddrPort(mustAP("[2001:db8::9]:1")), mustAP("[2001:db8::1]:443"), nil))
	f.Add(append(append([]byte(nil), proxyV2Sig...), 0x20, 0, 0, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, n, err := parseProxyHeader(b)
		if err != nil {
			if n != 0 || info != (proxyInfo{}) {
				t.Fatalf("error %v with results %+v %d", err, info, n)
			}
			if errors.Is(err, errProxyIncomplete) && len(b) > proxyV2Header+proxyV2MaxLen {
				t.Fatalf("incomplete after %d bytes: unbounded", len(b))
			}
			return
		}
		if n <= 0 || n > len(b) || n > proxyV2Header+proxyV2MaxLen {
			t.Fatalf("length %d of %d bytes", n, len(b))
		}
		// The header alone parses the same: nothing after it was used.
		info2, n2, err2 := parseProxyHeader(b[:n])
		if err2 != nil || n2 != n || info2 != info {
			t.Fatalf("header alone: %+v %d %v, with the rest: %+v %d", info2, n2, err2, info, n)
		}
		if !info.local && (!info.src.IsValid() || !info.dst.IsValid() || info.src.Addr().Is4In6()) {
			t.Fatalf("bad addresses %+v", info)
		}
	})
}

// proxyFrom opens a connection from src and writes hdr then a hello.
func proxyFrom(t testing.TB, r *testRelay, src string, hdr []byte, name string) *net.TCPConn {
	t.Helper()
	c, err := fromDialer(src).Dial("tcp", r.HTTPSAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write(append(append([]byte(nil), hdr...), clientHello(t, name)...))
	return c.(*net.TCPConn)
}

func TestProxyProtocolIn(t *testing.T) {
	got := make(chan proxyInfo, 8)
	up := rawUpstream(t, func(c *net.TCPConn) {
		buf := make([]byte, 16)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		rest := make([]byte, binary.BigEndian.Uint16(buf[14:]))
		io.ReadFull(c, rest)
		info, _, err := parseProxyHeader(append(buf, rest...))
		if err == nil {
			got <- info
		}
		io.Copy(io.Discard, c)
	})
	var xff = make(chan string, 4)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		xff <- r.Header.Get("X-Forwarded-For")
	}))
	defer web.Close()
	cfg := baseConfig(
		config.Route{Match: "a.test", Passthrough: config.Upstreams{up}, ProxyProtocol: "v2", Allow: []string{"203.0.113.0/24"}},
		config.Route{Match: "web.test", Terminate: &config.Terminate{Upstream: web.URL, TLS: config.TLS{Mode: "internal"}}},
	)
	cfg.Listen.ProxyProtocolFrom = []string{"127.0.0.2"}
	cfg.Limits.PerClient = &config.PerClient{Connections: 1}
	r := startRelay(t, cfg)
	v1 := func(src string) []byte { return []byte("PROXY TCP4 " + src + " 192.0.2.1 40000 443\r\n") }
	v2 := func(src string) []byte {
		return proxyHeaderV2(net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(src), 40000)), mustAP("192.0.2.1:443"), nil)
	}
	wantSrc := func(what, src string) {
		t.Helper()
		select {
		case info := <-got:
			if info.src.Addr() != netip.MustParseAddr(src) {
				t.Errorf("%s: upstream's PROXY header says %v, want %s", what, info.src, src)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the upstream never got the connection", what)
		}
	}

	// From the trusted proxy: its headers name the client, for PROXY out,
	// the allow list and per-client limits (one connection per client).
	proxyFrom(t, r, "127.0.0.2", v1("203.0.113.9"), "a.test")
	wantSrc("v1 in", "203.0.113.9")
	proxyFrom(t, r, "127.0.0.2", v2("203.0.113.10"), "a.test")
	wantSrc("v2 in", "203.0.113.10")
	expectClosed(t, proxyFrom(t, r, "127.0.0.2", v1("203.0.113.9"), "a.test"), "second connection of 203.0.113.9")
	if _, err := tls.Client(proxyFrom(t, r, "127.0.0.2", v1("198.51.100.1"), "a.test"), &tls.Config{ServerName: "a.test"}).Read(nil); err == nil || !strings.Contains(err.Error(), "access denied") {
		t.Errorf("client outside the allow list, through the proxy: %v, want access_denied", err)
	}
	expectClosed(t, proxyFrom(t, r, "127.0.0.2", nil, "a.test"), "trusted proxy without a header")

	// From anyone else a PROXY header is garbage.
	expectClosed(t, proxyFrom(t, r, "127.0.0.3", v1("203.0.113.11"), "a.test"), "PROXY header from an untrusted peer")
	if len(got) != 0 {
		t.Fatal("a refused connection reached the upstream")
	}

	// Terminate: X-Forwarded-For is the PROXY source.
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: r.ca.pool},
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := fromDialer("127.0.0.2").DialContext(ctx, "tcp", r.HTTPSAddr().String())
			if err == nil {
				_, err = c.Write(v2("2001:db8::77"))
			}
			return c, err
		},
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("https://web.test/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if v := <-xff; v != "2001:db8::77" {
		t.Errorf("X-Forwarded-For %q, want the PROXY source 2001:db8::77", v)
	}

	m := r.metricsText(t)
	for series, want := range map[string]float64{
		`relay_clienthello_errors_total{reason="proxy_header"}`:          1,
		`relay_clienthello_errors_total{reason="not_tls"}`:               1,
		`relay_access_denied_total{reason="not_allowed",route="a.test"}`: 1,
		`relay_limit_rejections_total{limit="per_client_connections"}`:   1,
		`relay_connections_total{action="passthrough",route="a.test"}`:   2,
	} {
		if v := metricValue(m, series); v != want {
			t.Errorf("%s = %v, want %v", series, v, want)
		}
	}
}

func TestProxyProtocolInHTTPPort(t *testing.T) {
	cfg := baseConfig(config.Route{Match: "nas.test", Passthrough: config.Upstreams{"127.0.0.1:1"}, Allow: []string{"203.0.113.0/24"}})
	cfg.Listen.ProxyProtocolFrom = []string{"127.0.0.2"}
	r := startRelay(t, cfg)
	status := func(src string, hdr string) (int, error) {
		c, err := fromDialer(src).Dial("tcp", r.HTTPAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		io.WriteString(c, hdr+"GET /x HTTP/1.1\r\nHost: nas.test\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if code, err := status("127.0.0.2", "PROXY TCP4 203.0.113.9 192.0.2.1 40000 80\r\n"); code != 308 {
		t.Errorf("allowed client through the proxy: %d %v, want 308", code, err)
	}
	if code, err := status("127.0.0.2", string(proxyHeaderV2(net.TCPAddrFromAddrPort(mustAP("198.51.100.1:4")), mustAP("192.0.2.1:80"), nil))); code != 403 {
		t.Errorf("other client through the proxy: %d %v, want 403", code, err)
	}
	if code, err := status("127.0.0.2", ""); err == nil {
		t.Errorf("trusted proxy without a header: %d, want the connection closed", code)
	}
	if code, err := status("127.0.0.3", "PROXY TCP4 203.0.113.9 192.0.2.1 40000 80\r\n"); code != 400 {
		t.Errorf("PROXY header from an untrusted peer: %d %v, want 400", code, err)
	}
	if v := metricValue(r.metricsText(t), `relay_clienthello_errors_total{reason="proxy_header"}`); v != 1 {
		t.Errorf("proxy_header errors = %v, want 1", v)
	}
}
