package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	rtmetrics "runtime/metrics"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

var idleProfile = flag.String("idleprofile", "", "BenchmarkTerminateIdleMemory: write a heap profile (inuse) to this file while the idle connections are held; run with -memprofilerate 1")

// TestMain lets the test binary double as the client of
// BenchmarkTerminateIdleMemory, so that the client's own TLS state is not
// counted in the relay's heap.
func TestMain(m *testing.M) {
	if up := os.Getenv("RELAY_FDLIMIT_CHILD"); up != "" {
		if err := fdLimitChild(up); err != nil {
			fmt.Fprintln(os.Stderr, "fd limit child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if addr := os.Getenv("RELAY_IDLE_HOLDER"); addr != "" {
		if err := holdIdle(addr, os.Getenv("RELAY_IDLE_SNI"), os.Getenv("RELAY_IDLE_PROTO"), os.Getenv("RELAY_IDLE_N")); err != nil {
			fmt.Fprintln(os.Stderr, "idle holder:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// holdIdle opens n TLS connections to addr, does one GET on each, prints
// "ready" and holds them until stdin closes. proto h1 offers no ALPN, as
// the bench's loadgen idle -http; h2 speaks HTTP/2, as browsers do.
func holdIdle(addr, sni, proto, count string) error {
	n, err := strconv.Atoi(count)
	if err != nil {
		return fmt.Errorf("RELAY_IDLE_N: %w", err)
	}
	conns := make([]io.Closer, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range n {
		var c io.Closer
		if proto == "h2" {
			c, err = idleH2(addr, sni)
		} else {
			c, err = idleH1(addr, sni)
		}
		if err != nil {
			return fmt.Errorf("conn %d: %w", i, err)
		}
		conns = append(conns, c)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	return nil
}

func idleH1(addr, sni string) (io.Closer, error) {
	c, err := dialer(5*time.Second).Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(tc, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", sni)
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		tc.Close()
		return nil, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		tc.Close()
		return nil, fmt.Errorf("status %d, body: %v", resp.StatusCode, err)
	}
	tc.SetDeadline(time.Time{})
	return tc, nil
}

// idleH2 leaves one HTTP/2 connection idle in a Transport of its own.
func idleH2(addr, sni string) (io.Closer, error) {
	var p http.Protocols
	p.SetHTTP2(true)
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{ServerName: sni, InsecureSkipVerify: true},
		Protocols:       &p,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer(5*time.Second).DialContext(ctx, "tcp", addr)
		},
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + sni + "/")
	if err != nil {
		return nil, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
		tr.CloseIdleConnections()
		return nil, fmt.Errorf("%s status %d, body: %v", resp.Proto, resp.StatusCode, err)
	}
	return closerFunc(tr.CloseIdleConnections), nil
}

type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

// BenchmarkTerminateIdleMemory reports what the relay keeps per idle
// established TLS connection of a terminate route after one GET (h1 is
// the bench's "KB per idle conn"): live heap, heap spans in use, stacks
// and goroutines. The connections are held by a child process. To see
// what the heap holds:
//
//	go test -run XXX -bench TerminateIdleMemory/h1 -benchtime 1x -memprofilerate 1 ./relay -idleprofile=/tmp/idle.pprof
//	go tool pprof -sample_index inuse_space -top /tmp/idle.pprof
func BenchmarkTerminateIdleMemory(b *testing.B) {
	const n = 1000
	body := make([]byte, 128)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer upstream.Close()
	cfg := baseConfig(config.Route{Match: "term.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}})
	r := startRelay(b, cfg)
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	for _, proto := range []string{"h1", "h2"} {
		b.Run(proto, func(b *testing.B) {
			for range b.N {
				before := readMem()
				holder := exec.Command(self)
				holder.Env = append(os.Environ(), "RELAY_IDLE_HOLDER="+r.HTTPSAddr().String(), "RELAY_IDLE_SNI=term.test",
					"RELAY_IDLE_PROTO="+proto, "RELAY_IDLE_N="+strconv.Itoa(n))
				holder.Stderr = os.Stderr
				stdin, _ := holder.StdinPipe()
				stdout, _ := holder.StdoutPipe()
				if err := holder.Start(); err != nil {
					b.Fatal(err)
				}
				line, _ := bufio.NewReader(stdout).ReadString('\n')
				if !strings.HasPrefix(line, "ready") {
					holder.Wait()
					b.Fatalf("idle holder: %q", line)
				}
				// The last responses are out; let their handlers return.
				time.Sleep(200 * time.Millisecond)
				held := readMem()
				if *idleProfile != "" {
					writeHeapProfile(b, *idleProfile)
				}
				stdin.Close()
				holder.Wait()
				waitFor(b, func() bool { return r.active.Load() == 0 })

				per := func(v1, v0 uint64) float64 { return (float64(v1) - float64(v0)) / n }
				b.ReportMetric(per(held.live, before.live), "heap-B/conn")
				b.ReportMetric(per(held.inuse, before.inuse), "heap-inuse-B/conn")
				b.ReportMetric(per(held.stacks, before.stacks), "stack-B/conn")
				b.ReportMetric(per(held.goroutines, before.goroutines), "goroutines/conn")
			}
		})
	}
}

type memSample struct{ live, inuse, stacks, goroutines uint64 }

// readMem collects garbage, then reads the heap and stack gauges.
func readMem() memSample {
	runtime.GC()
	runtime.GC()
	s := []rtmetrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/stacks:bytes"},
		{Name: "/sched/goroutines:goroutines"},
	}
	rtmetrics.Read(s)
	return memSample{
		live:       s[0].Value.Uint64(),
		inuse:      s[0].Value.Uint64() + s[1].Value.Uint64(),
		stacks:     s[2].Value.Uint64(),
		goroutines: s[3].Value.Uint64(),
	}
}

func writeHeapProfile(b *testing.B, path string) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}
