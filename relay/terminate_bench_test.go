package relay

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"syscall"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// BenchmarkTerminateGET: small HTTPS GETs over keep-alive connections
// through a terminate route (the relay ends TLS and proxies to a plain
// HTTP upstream). Profile with -cpuprofile to see where a request goes.
func BenchmarkTerminateGET(b *testing.B) {
	body := make([]byte, 128)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer upstream.Close()
	cfg := baseConfig(config.Route{Match: "term.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}})
	r := startRelay(b, cfg)
	for _, proto := range []string{"h1", "h2"} {
		b.Run(proto, func(b *testing.B) {
			tr := &http.Transport{
				TLSClientConfig:     &tls.Config{RootCAs: r.ca.pool, ServerName: "term.test"},
				MaxIdleConnsPerHost: 64,
				ForceAttemptHTTP2:   proto == "h2",
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, "tcp", r.HTTPSAddr().String())
				},
			}
			if proto == "h1" {
				tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
			}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr}
			b.ReportAllocs()
			b.SetParallelism(16)
			cpu0 := cpuTime()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := c.Get("https://term.test/")
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
			// CPU time (client, relay and upstream together) varies less
			// than ns/op on a shared machine.
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
		})
	}
}

// cpuTime returns the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
