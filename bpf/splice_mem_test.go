//go:build linux

package bpf

import (
	"context"
	"net"
	"runtime"
	"testing"
	"time"
)

// BenchmarkSpliceIdleMemory reports the Go heap each idle spliced pair
// keeps in the relay (go test -run XXX -bench SpliceIdleMemory ./bpf).
// The sockets' test ends live in the same process, so the figure counts
// the relay's two sockets and the pair's bookkeeping only approximately:
// the test ends' net.TCPConn are subtracted by measuring them alone.
func BenchmarkSpliceIdleMemory(b *testing.B) {
	s := newTestSplicer(b)
	const n = 500
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	relayLn, _ := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	upLn, _ := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	defer relayLn.Close()
	defer upLn.Close()
	d := net.Dialer{}
	d.SetMultipathTCP(false)
	var keep []net.Conn
	conns := func(spliced bool) {
		for i := 0; i < n; i++ {
			c, _ := d.Dial("tcp", relayLn.Addr().String())
			rc, _ := relayLn.Accept()
			ru, _ := d.Dial("tcp", upLn.Addr().String())
			u, _ := upLn.Accept()
			keep = append(keep, c, u)
			if spliced {
				if err := s.Splice(context.Background(), rc.(*net.TCPConn), ru.(*net.TCPConn), []byte("x"), time.Hour, func(int64, int64, error) {}); err != nil {
					b.Fatal(err)
				}
			} else {
				keep = append(keep, rc, ru)
			}
		}
	}
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc + m.StackInuse
	}
	for i := 0; i < b.N; i++ {
		h0 := heap()
		conns(false)
		h1 := heap()
		conns(true)
		h2 := heap()
		plain := float64(h1-h0) / n / 4 // per net.TCPConn
		pair := float64(h2-h1)/n - 2*plain
		b.ReportMetric(plain, "B/TCPConn")
		b.ReportMetric(pair+2*plain, "B/pair-in-relay")
		b.ReportMetric(pair, "B/pair-bookkeeping")
		for _, c := range keep {
			c.Close()
		}
		keep = keep[:0]
	}
}
