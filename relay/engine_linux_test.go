package relay

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// enginePairs connects n client→relay and relay→upstream socket pairs on
// loopback: cli[i] talks to up[i] once the relay's two sockets (a[i], b[i])
// are handed to the engine.
func enginePairs(t testing.TB, n int) (cli, a, b, up []*net.TCPConn) {
	t.Helper()
	lr, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lr.Close()
	lu, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lu.Close()
	for range n {
		c, err := net.Dial("tcp", lr.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		ra, err := lr.Accept()
		if err != nil {
			t.Fatal(err)
		}
		rb, err := net.Dial("tcp", lu.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		u, err := lu.Accept()
		if err != nil {
			t.Fatal(err)
		}
		cli, a, b, up = append(cli, c.(*net.TCPConn)), append(a, ra.(*net.TCPConn)), append(b, rb.(*net.TCPConn)), append(up, u.(*net.TCPConn))
	}
	t.Cleanup(func() {
		for _, cs := range [][]*net.TCPConn{cli, a, b, up} {
			for _, c := range cs {
				c.Close()
			}
		}
	})
	return cli, a, b, up
}

type result struct {
	up, down int64
	err      error
}

// handOff splices a and b and returns where done reports; done closes
// both, as the relay's does.
func handOff(t *testing.T, e *engine, a, b *net.TCPConn, idle time.Duration, upC, downC adder) <-chan result {
	t.Helper()
	ch := make(chan result, 1)
	err := e.splice(a, b, idle, upC, downC, func(up, down int64, err error) {
		a.Close()
		b.Close()
		ch <- result{up, down, err}
	})
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

type counter struct{ n atomic.Int64 }

func (c *counter) Add(f float64) { c.n.Add(int64(f)) }

func newTestEngine(t *testing.T) *engine {
	t.Helper()
	e, err := newEngine(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.close)
	return e
}

// send writes size random bytes then half-closes; it returns their hash.
func send(c *net.TCPConn, size int) ([32]byte, error) {
	h := sha256.New()
	buf := make([]byte, 256<<10)
	for sent := 0; sent < size; {
		n := min(len(buf), size-sent)
		rand.Read(buf[:n])
		h.Write(buf[:n])
		if _, err := c.Write(buf[:n]); err != nil {
			return [32]byte{}, err
		}
		sent += n
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, c.CloseWrite()
}

// receive reads to EOF, pausing now and then so that the sender outruns it.
func receive(c *net.TCPConn, slow bool) ([32]byte, int64, error) {
	h := sha256.New()
	buf := make([]byte, 64<<10)
	var total int64
	for i := 0; ; i++ {
		n, err := c.Read(buf)
		h.Write(buf[:n])
		total += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			return [32]byte{}, total, err
		}
		if slow && i%64 == 0 {
			time.Sleep(2 * time.Millisecond)
		}
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, total, nil
}

// TestEngineIntegrity moves bytes both ways at once through the engine,
// with slow readers (the pipe fills and waits for room), and checks every
// byte, the half-closes, the counts and the counters.
func TestEngineIntegrity(t *testing.T) {
	const pairs, size = 8, 8 << 20
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, pairs)
	var upC, downC counter
	var wg sync.WaitGroup
	for i := range pairs {
		done := handOff(t, e, a[i], b[i], time.Minute, &upC, &downC)
		wg.Add(1)
		go func() {
			defer wg.Done()
			type got struct {
				sum [32]byte
				n   int64
				err error
			}
			sentUp, sentDown := make(chan [32]byte, 1), make(chan [32]byte, 1)
			go func() { s, err := send(cli[i], size); checkErr(t, err); sentUp <- s }()
			go func() { s, err := send(up[i], size/2+i); checkErr(t, err); sentDown <- s }()
			rUp, rDown := make(chan got, 1), make(chan got, 1)
			go func() { s, n, err := receive(up[i], i%2 == 0); rUp <- got{s, n, err} }()
			go func() { s, n, err := receive(cli[i], i%2 == 1); rDown <- got{s, n, err} }()
			gu, gd := <-rUp, <-rDown
			if gu.err != nil || gd.err != nil {
				t.Errorf("pair %d: read: %v / %v", i, gu.err, gd.err)
				return
			}
			if gu.sum != <-sentUp || gd.sum != <-sentDown {
				t.Errorf("pair %d: bytes differ (got %d up, %d down)", i, gu.n, gd.n)
			}
			select {
			case r := <-done:
				if r.err != nil || r.up != size || r.down != int64(size/2+i) {
					t.Errorf("pair %d: done(%d, %d, %v), want (%d, %d, nil)", i, r.up, r.down, r.err, size, size/2+i)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("pair %d: done not called after both half-closes", i)
			}
		}()
	}
	wg.Wait()
	if want := int64(pairs * size); upC.n.Load() != want {
		t.Errorf("upstream counter %d, want %d", upC.n.Load(), want)
	}
	if len(e.pairs) != 0 || len(e.socks) != 0 {
		t.Errorf("engine still holds %d pairs, %d sockets", len(e.pairs), len(e.socks))
	}
}

func checkErr(t *testing.T, err error) {
	if err != nil {
		t.Error(err)
	}
}

// TestEngineHalfClose: one side's FIN reaches the other while the other
// direction stays open and keeps working.
func TestEngineHalfClose(t *testing.T) {
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, 1)
	done := handOff(t, e, a[0], b[0], time.Minute, nil, nil)
	cli[0].Write([]byte("request"))
	cli[0].CloseWrite()
	got, err := io.ReadAll(up[0])
	if err != nil || string(got) != "request" {
		t.Fatalf("upstream read %q, %v", got, err)
	}
	up[0].Write([]byte("answer after the client's FIN"))
	up[0].CloseWrite()
	got, err = io.ReadAll(cli[0])
	if err != nil || string(got) != "answer after the client's FIN" {
		t.Fatalf("client read %q, %v", got, err)
	}
	r := <-done
	if r.err != nil || r.up != 7 || r.down != 29 {
		t.Fatalf("done(%d, %d, %v)", r.up, r.down, r.err)
	}
}

// TestEngineReset: a reset on one side ends the pair and closes the other.
func TestEngineReset(t *testing.T) {
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, 1)
	done := handOff(t, e, a[0], b[0], time.Minute, nil, nil)
	cli[0].Write([]byte("x"))
	io.ReadFull(up[0], make([]byte, 1))
	up[0].SetLinger(0)
	up[0].Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("done not called after the upstream's reset")
	}
	cli[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := cli[0].Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client read after reset: %v, want EOF or reset", err)
	}
}

// TestEngineIdleAndCancel: a pair with no traffic ends after idle, with
// ErrIdle; canceling the context ends another at once.
func TestEngineIdleAndCancel(t *testing.T) {
	e := newTestEngine(t)
	_, a, b, _ := enginePairs(t, 3)
	idle := handOff(t, e, a[0], b[0], 300*time.Millisecond, nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	e2, err := newEngine(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer e2.close()
	canceled := handOff(t, e2, a[1], b[1], time.Hour, nil, nil)
	cancel()
	select {
	case <-canceled:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end the pair")
	}
	if err := e2.splice(a[2], b[2], time.Hour, nil, nil, func(int64, int64, error) {}); err == nil {
		t.Fatal("an engine whose context ended accepted a pair")
	}
	select {
	case r := <-idle:
		if !errors.Is(r.err, ErrIdle) {
			t.Fatalf("idle pair ended with %v, want ErrIdle", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("idle pair not ended")
	}
}

// TestEngineCloseEndsPairs: close ends every pair, stops its goroutines
// and leaves nothing behind.
func TestEngineCloseEndsPairs(t *testing.T) {
	before := runtime.NumGoroutine()
	e, err := newEngine(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cli, a, b, up := enginePairs(t, 4)
	var dones []<-chan result
	for i := range a {
		dones = append(dones, handOff(t, e, a[i], b[i], time.Hour, nil, nil))
		cli[i].Write(bytes.Repeat([]byte("y"), 100))
		io.ReadFull(up[i], make([]byte, 100))
	}
	e.close()
	for i, d := range dones {
		select {
		case <-d:
		default:
			t.Fatalf("pair %d: done not called by close", i)
		}
	}
	if err := e.splice(a[0], b[0], time.Hour, nil, nil, func(int64, int64, error) {}); err == nil {
		t.Fatal("splice after close accepted a pair")
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Fatalf("%d goroutines after close, %d before", n, before)
	}
}

// parked reports how many pairs the relay's splice engine watches.
func parked(s *Server) int {
	e := s.engine()
	if e == nil {
		return 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.pairs)
}

// TestPassthroughParksQuietConnection: a passthrough connection whose two
// sides are quiet for parkAfter is handed from its goroutines to the
// splice engine; afterwards it relays bulk bytes both ways intact, passes
// the half-closes on and counts every byte; a parked connection is closed
// at the drain timeout.
func TestPassthroughParksQuietConnection(t *testing.T) {
	hello := clientHello(t, "park.test")
	up := rawUpstream(t, func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c) // echo, then pass the half-close back
		c.CloseWrite()
	})
	cfg := baseConfig(config.Route{Match: "park.test", Passthrough: config.Upstreams{up}})
	cfg.Limits.DrainTimeout = config.Duration(300 * time.Millisecond)
	r := startRelay(t, cfg)

	c := dialRelay(t, r)
	c.Write(hello)
	c.Write([]byte("ping"))
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for parked(r.Server) != 1 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := parked(r.Server); n != 1 {
		t.Fatalf("%d connections parked after %v of quiet, want 1", n, parkAfter)
	}
	buf := make([]byte, 1<<20)
	if stacks := string(buf[:runtime.Stack(buf, true)]); strings.Contains(stacks, "spliceCopier") {
		t.Errorf("a copy goroutine outlived the parking:\n%s", stacks)
	}

	const size = 16 << 20
	got := make(chan [32]byte, 1)
	go func() { sum, _ := hashOf(c); got <- sum }()
	if _, err := io.Copy(c, pattern(7, size)); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	want, _ := hashOf(pattern(7, size))
	select {
	case sum := <-got:
		if sum != want {
			t.Fatal("echoed bytes differ after parking")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("echo not complete after parking")
	}
	waitFor(t, func() bool {
		m := r.metricsText(t)
		return metricValue(m, `relay_bytes_total{direction="downstream",route="park.test"}`) == size+4 &&
			metricValue(m, `relay_bytes_total{direction="upstream",route="park.test"}`) == float64(size+4+len(hello)) &&
			metricValue(m, `relay_active_connections{action="passthrough",route="park.test"}`) == 0 &&
			parked(r.Server) == 0
	})

	// A second connection, parked when the relay stops: closed at the
	// drain timeout.
	c2 := dialRelay(t, r)
	c2.Write(hello)
	deadline = time.Now().Add(5 * time.Second) // the echo above may have taken long (-race)
	for parked(r.Server) != 1 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if parked(r.Server) != 1 {
		t.Fatal("second connection not parked")
	}
	r.stopWithin(t, 5*time.Second)
	c2.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c2.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("parked connection still open after the drain timeout: %v", err)
	}
}

// BenchmarkEngineIdleMemory reports the Go heap the engine keeps per
// parked pair (its bookkeeping, beyond the two sockets' net.TCPConn):
// `go test -run XXX -bench EngineIdleMemory ./relay`.
func BenchmarkEngineIdleMemory(b *testing.B) {
	const n = 500
	for range b.N {
		e, err := newEngine(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		_, a, bb, _ := enginePairs(b, n)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for i := range n {
			if err := e.splice(a[i], bb[i], time.Hour, nil, nil, func(int64, int64, error) {}); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/pair")
		b.ReportMetric(float64(after.StackInuse)-float64(before.StackInuse), "stack-B")
		e.close()
	}
}
