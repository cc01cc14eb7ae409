package relay

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

func TestClientKeyGroupsIPv6By64(t *testing.T) {
	k := func(s string) clientKey { return keyOf(netip.MustParseAddr(s)) }
	if k("2001:db8:1:2::1") != k("2001:db8:1:2:ffff::9") {
		t.Error("two addresses of one /64 have different keys")
	}
	if k("2001:db8:1:2::1") == k("2001:db8:1:3::1") {
		t.Error("two /64s share a key")
	}
	if k("10.0.0.1") != k("::ffff:10.0.0.1") || k("10.0.0.1") == k("10.0.0.2") {
		t.Error("IPv4 keys: mapped and plain differ, or two hosts share one")
	}
	if k("::ffff:0:0") == k("::") {
		t.Error("a v4-mapped key equals a v6 /64 key")
	}
}

func TestClientTableLimits(t *testing.T) {
	tb := newClientTable(16)
	now := time.Unix(1000, 0)
	a := keyOf(netip.MustParseAddr("192.0.2.1"))
	conns := &config.PerClient{Connections: 2}
	for i, want := range []bool{true, true, false} {
		if ok, limit := tb.admit(a, conns, now); ok != want || (!ok && limit != limitPerClientConns) {
			t.Fatalf("connection %d: %v %q", i, ok, limit)
		}
	}
	tb.done(a)
	if ok, _ := tb.admit(a, conns, now); !ok {
		t.Fatal("a slot freed by done was not reusable")
	}

	b := keyOf(netip.MustParseAddr("192.0.2.2"))
	rate := &config.PerClient{Rate: 2, Burst: 3}
	for i := 0; i < 3; i++ {
		if ok, _ := tb.admit(b, rate, now); !ok {
			t.Fatalf("burst connection %d refused", i)
		}
	}
	if ok, limit := tb.admit(b, rate, now); ok || limit != limitPerClientRate {
		t.Fatalf("past the burst: %v %q, want per_client_rate", ok, limit)
	}
	now = now.Add(500 * time.Millisecond) // one token at 2/s
	if ok, _ := tb.admit(b, rate, now); !ok {
		t.Fatal("a refilled token was not usable")
	}
	if ok, _ := tb.admit(b, rate, now); ok {
		t.Fatal("two connections on one token")
	}
	now = now.Add(time.Hour)
	for i := 0; i < 3; i++ { // the bucket holds at most burst
		tb.admit(b, rate, now)
	}
	if ok, _ := tb.admit(b, rate, now); ok {
		t.Fatal("the bucket filled past its burst")
	}
}

func TestClientTableIsBoundedLRU(t *testing.T) {
	tb := newClientTable(4)
	lim := &config.PerClient{Connections: 1}
	now := time.Unix(1000, 0)
	key := func(i int) clientKey { return keyOf(netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", i))) }
	for i := 0; i < 4; i++ {
		tb.admit(key(i), lim, now)
	}
	tb.admit(key(0), lim, now) // refused, but 0 is now the most recent
	for i := 4; i < 100; i++ {
		tb.admit(key(i), lim, now)
		if len(tb.ents) > 4 || len(tb.idx) > 4 {
			t.Fatalf("table grew to %d entries, bound 4", len(tb.idx))
		}
	}
	if _, ok := tb.idx[key(99)]; !ok {
		t.Error("the newest client is not in the table")
	}
	if _, ok := tb.idx[key(1)]; ok {
		t.Error("the least recently seen client was not forgotten")
	}
	// Walk the list both ways: it must hold exactly the indexed entries.
	n := 0
	for i := tb.head; i >= 0; i = tb.ents[i].next {
		n++
	}
	m := 0
	for i := tb.tail; i >= 0; i = tb.ents[i].prev {
		m++
	}
	if n != 4 || m != 4 {
		t.Errorf("LRU list lengths %d/%d, want 4", n, m)
	}
}

// holdUpstream accepts connections, reports each ClientHello's arrival and
// holds the connection open until the client goes.
func holdUpstream(t testing.TB, arrived chan<- struct{}) string {
	return rawUpstream(t, func(c *net.TCPConn) {
		b := make([]byte, 5)
		if _, err := io.ReadFull(c, b); err == nil {
			arrived <- struct{}{}
		}
		io.Copy(io.Discard, c)
	})
}

// helloFrom opens a connection from src and sends a ClientHello for name.
func helloFrom(t testing.TB, r *testRelay, src, name string) *net.TCPConn {
	t.Helper()
	c, err := fromDialer(src).Dial("tcp", r.HTTPSAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write(clientHello(t, name))
	return c.(*net.TCPConn)
}

// expectClosed fails unless the relay closes c (EOF or reset, not a
// timeout).
func expectClosed(t testing.TB, c *net.TCPConn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); err == nil || (ok && ne.Timeout()) {
		t.Fatalf("%s: read %v, want the connection closed", what, err)
	}
}

func expectArrival(t testing.TB, arrived <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: the upstream never saw the connection", what)
	}
}

func TestPerClientConnections(t *testing.T) {
	arrived := make(chan struct{}, 8)
	cfg := baseConfig(config.Route{Match: "a.test", Passthrough: config.Upstreams{holdUpstream(t, arrived)}})
	cfg.Limits.PerClient = &config.PerClient{Connections: 2}
	r := startRelay(t, cfg)
	first := helloFrom(t, r, "127.0.0.2", "a.test")
	expectArrival(t, arrived, "first of 127.0.0.2")
	helloFrom(t, r, "127.0.0.2", "a.test")
	expectArrival(t, arrived, "second of 127.0.0.2")
	expectClosed(t, helloFrom(t, r, "127.0.0.2", "a.test"), "third of 127.0.0.2")
	helloFrom(t, r, "127.0.0.3", "a.test")
	expectArrival(t, arrived, "another client")
	if len(arrived) != 0 {
		t.Fatal("the refused connection reached the upstream")
	}
	first.Close()
	// Its slot comes back once the relay has seen the close.
	waitFor(t, func() bool {
		c := helloFrom(t, r, "127.0.0.2", "a.test")
		select {
		case <-arrived:
			return true
		case <-time.After(2 * time.Second):
			c.Close()
			return false
		}
	})
	if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="per_client_connections"}`); v < 1 {
		t.Errorf("per_client_connections rejections = %v, want >= 1", v)
	}
}

func TestPerClientRate(t *testing.T) {
	arrived := make(chan struct{}, 8)
	cfg := baseConfig(config.Route{Match: "a.test", Passthrough: config.Upstreams{holdUpstream(t, arrived)}})
	// 0.001/s: no token comes back during the test, however slow the host.
	cfg.Limits.PerClient = &config.PerClient{Rate: 0.001, Burst: 2}
	r := startRelay(t, cfg)
	for i := 0; i < 2; i++ {
		helloFrom(t, r, "127.0.0.4", "a.test").Close()
		expectArrival(t, arrived, "burst connection")
	}
	expectClosed(t, helloFrom(t, r, "127.0.0.4", "a.test"), "past the burst")
	helloFrom(t, r, "127.0.0.5", "a.test")
	expectArrival(t, arrived, "another client")
	if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="per_client_rate"}`); v != 1 {
		t.Errorf("per_client_rate rejections = %v, want 1", v)
	}
}

// BenchmarkClientTableFlood admits connections from ever new sources (a
// spoofed-source flood) and reports the table's memory once full.
func BenchmarkClientTableFlood(b *testing.B) {
	lim := &config.PerClient{Connections: 8, Rate: 10, Burst: 20}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	tb := newClientTable(clientTableSize)
	now := time.Unix(1000, 0)
	var a [4]byte
	for i := 0; i < clientTableSize; i++ {
		binary.BigEndian.PutUint32(a[:], uint32(i))
		tb.admit(keyOf(netip.AddrFrom4(a)), lim, now)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint32(a[:], uint32(clientTableSize+i))
		tb.admit(keyOf(netip.AddrFrom4(a)), lim, now)
	}
	if len(tb.idx) > clientTableSize {
		b.Fatalf("table grew to %d", len(tb.idx))
	}
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/clientTableSize, "B/entry")
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "MiB/table")
	runtime.KeepAlive(tb)
}
