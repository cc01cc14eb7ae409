package relay

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/relay-gw/relay/internal/config"
)

// quicEchoServer is a quic-go server with a certificate for its name from
// ca: on each stream it reads everything, then writes n random bytes and
// the SHA-256 of what it read.
func quicEchoServer(t testing.TB, ca *testCA, n int) string {
	t.Helper()
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{GetCertificate: ca.GetCertificate, NextProtos: []string{"test"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				st, err := c.AcceptStream(context.Background())
				if err != nil {
					return
				}
				h := sha256.New()
				if _, err := io.Copy(h, st); err != nil {
					return
				}
				out := make([]byte, n)
				rand.Read(out)
				sum := sha256.Sum256(out)
				st.Write(h.Sum(nil))
				st.Write(sum[:])
				st.Write(out)
				st.Close()
				<-c.Context().Done()
			}()
		}
	}()
	return ln.Addr().String()
}

func boolp(b bool) *bool { return &b }

func TestQUICPassthrough(t *testing.T) {
	const size = 16 << 20
	upCA := newTestCA(t)
	up := quicEchoServer(t, upCA, size)
	cfg := baseConfig(config.Route{Match: "q.test", Passthrough: config.Upstreams{up}, QUIC: boolp(true)},
		config.Route{Match: "noquic.test", Passthrough: config.Upstreams{up}, QUIC: boolp(false)})
	r := startRelay(t, cfg)
	if r.QUICAddr() == nil {
		t.Fatal("no QUIC socket")
	}
	if got, want := r.QUICAddr().(*net.UDPAddr).Port, r.HTTPSAddr().(*net.TCPAddr).Port; got != want {
		t.Fatalf("QUIC on port %d, TCP on %d", got, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The upstream's own certificate, verified by the client through the relay.
	c, err := quic.DialAddr(ctx, r.QUICAddr().String(), &tls.Config{ServerName: "q.test", RootCAs: upCA.pool, NextProtos: []string{"test"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseWithError(0, "")
	st, err := c.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sent := make([]byte, size)
	rand.Read(sent)
	go func() {
		st.Write(sent)
		st.Close()
	}()
	var sums [64]byte
	if _, err := io.ReadFull(st, sums[:]); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(sent)
	if string(sums[:32]) != string(want[:]) {
		t.Fatal("upstream received corrupted data")
	}
	h := sha256.New()
	n, err := io.Copy(h, st)
	if err != nil || n != size {
		t.Fatalf("downstream: %d bytes, %v", n, err)
	}
	if string(h.Sum(nil)) != string(sums[32:]) {
		t.Fatal("client received corrupted data")
	}
	c.CloseWithError(0, "")

	// quic: false and unknown names are not relayed over QUIC: the
	// client times out (and would fall back to TCP).
	for _, name := range []string{"noquic.test", "other.test"} {
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		_, err := quic.DialAddr(ctx, r.QUICAddr().String(), &tls.Config{ServerName: name, RootCAs: upCA.pool, NextProtos: []string{"test"}}, nil)
		cancel()
		if err == nil {
			t.Fatalf("%s: QUIC connection through the relay", name)
		}
	}
	m := r.metricsText(t)
	for series, want := range map[string]float64{
		`relay_quic_connections_total{action="passthrough",route="q.test"}`: 1,
		`relay_quic_connections_total{action="reject",route="noquic.test"}`: 1,
		`relay_quic_connections_total{action="reject",route="unknown"}`:     1,
		`relay_quic_active_flows{action="passthrough",route="q.test"}`:      1,
	} {
		if v := metricValue(m, series); v != want {
			t.Errorf("%s = %v, want %v", series, v, want)
		}
	}
	for _, dir := range []string{"upstream", "downstream"} {
		if v := metricValue(m, `relay_quic_bytes_total{direction="`+dir+`",route="q.test"}`); v < size {
			t.Errorf("%s bytes %v < %d", dir, v, size)
		}
	}
}

func TestQUICListenerGarbage(t *testing.T) {
	r := startRelay(t, baseConfig())
	c, err := net.Dial("udp", r.QUICAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("not quic"))
	c.Write(append([]byte{0xc0, 0, 0, 0, 1, 8}, make([]byte, 1200)...)) // an Initial that does not decrypt
	deadline := time.Now().Add(5 * time.Second)
	for {
		m := r.metricsText(t)
		if metricValue(m, `relay_quic_initial_errors_total{reason="not_initial"}`) == 1 &&
			metricValue(m, `relay_quic_initial_errors_total{reason="decrypt"}`) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("garbage not counted:\n%s", m)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.quic.mu.Lock()
	flows, peeking := len(r.quic.flows), r.quic.peeking
	r.quic.mu.Unlock()
	if flows != 0 || peeking != 0 {
		t.Fatalf("garbage left %d flows (%d peeking)", flows, peeking)
	}
}

// TestQUICHandOverBind: a relay started while another holds the UDP port
// (a hand-over: the TCP listener is shared, the UDP socket is not) binds
// it once the old one stops accepting.
func TestQUICHandOverBind(t *testing.T) {
	old := startRelay(t, baseConfig())
	tl, err := old.HTTPSListener().(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.FileListener(tl)
	tl.Close()
	if err != nil {
		t.Fatal(err)
	}
	cfg := baseConfig()
	cfg.Listen.HTTP, cfg.Listen.Metrics = "off", "off"
	nu := startRelay(t, cfg, func(o *Options) { o.HTTPSListener = ln })
	if nu.QUICAddr() != nil {
		t.Fatal("bound a UDP port the old relay holds")
	}
	want := old.QUICAddr().String()
	old.StopAccepting()
	deadline := time.Now().Add(5 * time.Second)
	for nu.QUICAddr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("the new relay did not bind the UDP port after the old one stopped accepting")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := nu.QUICAddr().String(); got != want {
		t.Fatalf("bound %s, want %s", got, want)
	}
}

// TestQUICPeekBudget: flows being peeked buffer at most quicPeekBudget
// bytes in all; past it new datagrams are refused and counted.
func TestQUICPeekBudget(t *testing.T) {
	cfg := baseConfig()
	cfg.Limits.MaxHandshakes, cfg.Limits.MaxConnections = 100000, 100000
	cfg.Limits.HelloTimeout = config.Duration(time.Hour) // no peek times out while the test fills them (slow under -race)
	r := startRelay(t, cfg)
	msg := helloMessage(t, "budget.test")
	pkt := sealInitial(quicV1, []byte{1, 2, 3, 4, 5, 6, 7, 8}, 0, 1, cryptoFrame(0, msg[:len(msg)/2]))
	now := time.Now()
	n := quicPeekBudget/len(pkt) + 100
	for i := range n {
		r.quic.datagram(pkt, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 1, byte(i >> 8), byte(i)}), 1000), now)
	}
	r.quic.mu.Lock()
	queued, flows := r.quic.queued, len(r.quic.flows)
	r.quic.mu.Unlock()
	if queued > quicPeekBudget || queued < quicPeekBudget-len(pkt) {
		t.Fatalf("%d bytes queued by %d flows, budget %d", queued, flows, quicPeekBudget)
	}
	if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="quic_peek_bytes"}`); v < 100 {
		t.Fatalf("quic_peek_bytes rejections: %v", v)
	}
	// Dropped flows give their bytes back.
	r.quic.mu.Lock()
	for k, f := range r.quic.flows {
		r.quic.dropLocked(k, f)
	}
	queued = r.quic.queued
	r.quic.mu.Unlock()
	if queued != 0 {
		t.Fatalf("%d bytes still counted after every flow was dropped", queued)
	}
}
