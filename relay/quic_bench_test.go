package relay

import (
	"context"
	"crypto/tls"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/relay-gw/relay/internal/config"
)

// BenchmarkQUICPassthrough: one QUIC connection (quic-go both ends, one
// process) moving 16 MiB per stream to (up) or from (down) a quic-go
// upstream, directly and through the relay's QUIC passthrough, in the
// same run.
// cpu-ms/GiB is the whole process's CPU (client, relay, server): the
// relay's own cost is the difference between the two.
//
//	go test -run '^$' -bench QUICPassthrough -benchtime 32x -count 3 ./relay
func BenchmarkQUICPassthrough(b *testing.B) {
	const chunk = 16 << 20
	ca := newTestCA(b)
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{GetCertificate: ca.GetCertificate, NextProtos: []string{"bench"}}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				for {
					st, err := c.AcceptStream(context.Background())
					if err != nil {
						return
					}
					go func() {
						// A 1-byte request asks for a chunk; anything
						// else is an upload, answered with 1 byte.
						if n, _ := io.Copy(io.Discard, st); n == 1 {
							st.Write(make([]byte, chunk))
						} else {
							st.Write([]byte{1})
						}
						st.Close()
					}()
				}
			}()
		}
	}()
	r := startRelay(b, baseConfig(config.Route{Match: "bench.test", Passthrough: config.Upstreams{ln.Addr().String()}, QUIC: boolp(true)}))
	buf := make([]byte, chunk)
	for _, c := range []struct{ name, addr string }{
		{"up/direct", ln.Addr().String()}, {"up/relay", r.QUICAddr().String()},
		{"down/direct", ln.Addr().String()}, {"down/relay", r.QUICAddr().String()},
	} {
		down := strings.HasPrefix(c.name, "down")
		b.Run(c.name, func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			conn, err := quic.DialAddr(ctx, c.addr, &tls.Config{ServerName: "bench.test", RootCAs: ca.pool, NextProtos: []string{"bench"}}, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer conn.CloseWithError(0, "")
			b.SetBytes(chunk)
			cpu0 := cpuTime()
			b.ResetTimer()
			for range b.N {
				st, err := conn.OpenStreamSync(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if down {
					st.Write(buf[:1])
					st.Close()
					if n, err := io.ReadFull(st, buf); err != nil || n != chunk {
						b.Fatal(n, err)
					}
					continue
				}
				if _, err := st.Write(buf); err != nil {
					b.Fatal(err)
				}
				st.Close()
				if _, err := io.ReadFull(st, buf[:1]); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			gib := float64(b.N) * chunk / (1 << 30)
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Millisecond)/gib, "cpu-ms/GiB")
		})
	}
}
