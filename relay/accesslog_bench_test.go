package relay

import (
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// BenchmarkAccessLogFormat: the cost of one line, on the writer goroutine.
func BenchmarkAccessLogFormat(b *testing.B) {
	e := &accessEntry{Time: time.Now(), Client: netip.MustParseAddrPort("192.0.2.7:51234"), SNI: "nas.example.com",
		ALPN: []string{"h2", "http/1.1"}, Route: "nas.example.com", Action: "terminate", Upstream: "192.168.1.20:443",
		Up: 1234, Down: 567890, Duration: 1500 * time.Millisecond, Result: resultOK,
		Method: "GET", Host: "nas.example.com", Path: "/index.html", Status: 200, User: "alice", UserAgent: "Mozilla/5.0"}
	for _, format := range []string{"json", "combined"} {
		b.Run(format, func(b *testing.B) {
			a := &accessLog{format: format}
			buf := make([]byte, 0, 512)
			b.ReportAllocs()
			for range b.N {
				buf = a.appendEntry(buf[:0], e)
			}
		})
	}
}

// BenchmarkPassthroughShortConn: whole short passthrough connections
// (dial, ClientHello, one byte back, close), without and with the access
// log, to see what a line costs the connection path.
func BenchmarkPassthroughShortConn(b *testing.B) {
	up := rawUpstream(b, func(c *net.TCPConn) {
		io.CopyN(io.Discard, c, 5)
		c.Write([]byte{1})
	})
	hello := clientHello(b, "pt.test")
	for _, format := range []string{"off", "json"} {
		b.Run(format, func(b *testing.B) {
			cfg := baseConfig(config.Route{Match: "pt.test", Passthrough: config.Upstreams{up}})
			if format != "off" {
				cfg.Log.Access = &config.AccessLog{Path: filepath.Join(b.TempDir(), "access.log"), Format: format}
			}
			r := startRelay(b, cfg)
			addr := r.HTTPSAddr().String()
			b.SetParallelism(4)
			cpu0 := cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				one := make([]byte, 1)
				for pb.Next() {
					c, err := net.Dial("tcp", addr)
					if err != nil {
						b.Error(err)
						return
					}
					c.Write(hello)
					if _, err := io.ReadFull(c, one); err != nil {
						b.Error(err)
					}
					c.Close()
				}
			})
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
			r.stopWithin(b, 10*time.Second)
		})
	}
}
