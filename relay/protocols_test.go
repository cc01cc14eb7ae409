package relay

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		in    string
		proto string
		more  bool
	}{
		{"\x16\x03\x01", protoTLS, false},
		{"SSH-2.0-OpenSSH_9.2p1\r\n", protoSSH, false},
		{"SSH-1.99-x", protoSSH, false},
		{"SSH-2", "", true},
		{"SSH-3.0-", "", false},
		{"GET / HTTP/1.1", protoHTTP, false},
		{"OPT", "", true},
		{"\x00\x2a\x38", protoOpenVPN, false},               // length 42, opcode 7 key 0
		{"\x00\x2a\x50", protoOpenVPN, false},               // opcode 10 (V3)
		{"\x00\x2a\x20", "", false},                         // opcode 4: not a client's reset
		{"\x00\x05\x38", "", false},                         // too short for a reset
		{"\x00", "", true},                                  // may be a length
		{"\xff\xfe", "", false},                             // not a plausible length, nor anything else
		{"hello world, a long line of nonsense", "", false}, // lowercase: nothing
		{"GARBAGEGARBAGEGARBAGE", "", false},                // no such method
		{strings.Repeat("\x00", maxSniff), "", false},       // bounded
		{"\x00\x0e\x38\x00\x00\x00\x00\x00\x00\x00\x00", protoOpenVPN, false},
	} {
		p, more := classify([]byte(tc.in))
		if p != tc.proto || more != tc.more {
			t.Errorf("classify(%q) = %q, %v; want %q, %v", tc.in, p, more, tc.proto, tc.more)
		}
	}
}

// TestProtocolRoutes: SSH, OpenVPN, silent clients and TLS share the https
// port; plain HTTP for a routed name gets a 308 (loopback stand-ins; the
// real programs are in TestProtocolRoutesRealPrograms).
func TestProtocolRoutes(t *testing.T) {
	ca := newTestCA(t)
	echo := func(greeting string) string { // answers with greeting + what it got first
		return rawUpstream(t, func(c *net.TCPConn) {
			if greeting != "" {
				io.WriteString(c, greeting)
			}
			buf := make([]byte, 64)
			n, _ := c.Read(buf)
			c.Write(buf[:n])
		})
	}
	sshUp, ovpnUp, smtpUp := echo("SSH-2.0-upstream\r\n"), echo(""), echo("220 smtp ready\r\n")
	tlsUp := tlsUpstream(t, ca, func(c *tls.Conn) { io.WriteString(c, "tls ok") })
	cfg := baseConfig(
		config.Route{Protocol: "ssh", Passthrough: config.Upstreams{sshUp}},
		config.Route{Protocol: "openvpn", Passthrough: config.Upstreams{ovpnUp}},
		config.Route{Silence: config.Duration(300 * time.Millisecond), Passthrough: config.Upstreams{smtpUp}},
		config.Route{Match: "web.test", Passthrough: config.Upstreams{tlsUp}},
	)
	r := startRelay(t, cfg)

	c := dialRelay(t, r)
	io.WriteString(c, "SSH-2.0-client\r\n")
	br := bufio.NewReader(c)
	if l, _ := br.ReadString('\n'); l != "SSH-2.0-upstream\r\n" {
		t.Errorf("ssh: upstream said %q", l)
	}
	if l, _ := br.ReadString('\n'); l != "SSH-2.0-client\r\n" {
		t.Errorf("ssh: upstream got %q", l)
	}
	c.Close()

	reset := "\x00\x0e\x38\x01\x02\x03\x04\x05\x06\x07\x08\x00\x00\x00\x00\x00"
	c = dialRelay(t, r)
	io.WriteString(c, reset[:2]) // the length alone first: detection waits
	time.Sleep(50 * time.Millisecond)
	io.WriteString(c, reset[2:])
	got := make([]byte, len(reset))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != reset {
		t.Errorf("openvpn: got %q, %v", got, err)
	}
	c.Close()

	c = dialRelay(t, r) // says nothing: handed to the silence route
	br = bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if l, _ := br.ReadString('\n'); l != "220 smtp ready\r\n" {
		t.Errorf("silence: got %q", l)
	}
	c.Close()

	tc, err := r.dialTLS(t, "web.test", ca.pool)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(tc); string(b) != "tls ok" {
		t.Errorf("tls: %q", b)
	}

	c = dialRelay(t, r)
	io.WriteString(c, "GET /a/b?c=d HTTP/1.1\r\nHost: web.test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 308 || resp.Header.Get("Location") != "https://web.test/a/b?c=d" {
		t.Errorf("plain http: %v %+v", err, resp)
	}
	c.Close()

	m := r.metricsText(t)
	for series, want := range map[string]float64{
		`relay_connections_total{action="passthrough",route="protocol:ssh"}`:     1,
		`relay_connections_total{action="passthrough",route="protocol:openvpn"}`: 1,
		`relay_connections_total{action="passthrough",route="silence:300ms"}`:    1,
		`relay_connections_total{action="passthrough",route="web.test"}`:         1,
		`relay_connections_total{action="redirect",route="web.test"}`:            1,
	} {
		if v := metricValue(m, series); v != want {
			t.Errorf("%s = %v, want %v", series, v, want)
		}
	}
}

// TestProtocolRouteHTTPAndProxyHeader: a {protocol: http} route takes
// plain HTTP on the TLS port (instead of the 308), and a protocol route
// sends a PROXY header like a TLS passthrough does.
func TestProtocolRouteHTTPAndProxyHeader(t *testing.T) {
	lines := make(chan string, 4)
	lineUp := rawUpstream(t, func(c *net.TCPConn) { // reports its first two lines
		br := bufio.NewReader(c)
		for range 2 {
			l, _ := br.ReadString('\n')
			lines <- l
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
	})
	cfg := baseConfig(
		config.Route{Protocol: "http", Passthrough: config.Upstreams{lineUp}},
		config.Route{Protocol: "ssh", Passthrough: config.Upstreams{lineUp}, ProxyProtocol: "v1"},
		config.Route{Match: "web.test", Reject: true},
	)
	r := startRelay(t, cfg)
	c := dialRelay(t, r)
	io.WriteString(c, "GET /x HTTP/1.1\r\nHost: web.test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("http route: %v %+v", err, resp)
	}
	c.Close()
	if l := <-lines; l != "GET /x HTTP/1.1\r\n" {
		t.Errorf("http upstream got %q first", l)
	}
	<-lines

	c = dialRelay(t, r)
	io.WriteString(c, "SSH-2.0-client\r\n")
	if l := <-lines; !strings.HasPrefix(l, "PROXY TCP4 127.0.0.1 127.0.0.1 ") {
		t.Errorf("ssh upstream's first line %q, want a PROXY v1 header", l)
	}
	if l := <-lines; l != "SSH-2.0-client\r\n" {
		t.Errorf("ssh upstream's second line %q", l)
	}
	c.Close()

	c = dialRelay(t, r) // neither TLS nor a known protocol
	io.WriteString(c, "\x01\x02garbage")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := c.Read(make([]byte, 1)); n != 0 {
		t.Error("garbage got an answer")
	}
	c.Close()
	waitFor(t, func() bool {
		m := r.metricsText(t)
		return metricValue(m, `relay_clienthello_errors_total{reason="not_tls"}`) == 1 &&
			metricValue(m, `relay_connections_total{action="passthrough",route="protocol:http"}`) == 1
	})
}
