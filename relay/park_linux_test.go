package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// A client that never reads again, after the upstream filled its buffers:
// the relay must still end the connection at idle_timeout, as it does
// without parking.
func TestParkedNeverReadingClientIdles(t *testing.T) {
	hello := clientHello(t, "never.test")
	writeFailed := make(chan error, 1)
	up := rawUpstream(t, func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, len(hello)))
		_, err := io.Copy(c, pattern(3, 256<<20)) // blocks: the client never reads
		writeFailed <- err
	})
	cfg := baseConfig(config.Route{Match: "never.test", Passthrough: config.Upstreams{up}})
	cfg.Limits.IdleTimeout = config.Duration(3 * time.Second)
	r := startRelay(t, cfg)
	c := dialRelay(t, r)
	c.Write(hello)
	select {
	case err := <-writeFailed:
		if err == nil {
			t.Fatal("upstream wrote everything to a client that never reads?")
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("connection still open 15s after it went idle (idle_timeout 3s); parked=%d", parked(r.Server))
	}
}

// The client pauses (neither reading nor sending) for longer than
// parkAfter while the upstream streams to it, then uploads before it reads
// again; the upstream reads and writes at once. A relay that forwards each
// direction independently completes this.
func TestParkWriteThenRead(t *testing.T) {
	const size = 32 << 20
	hello := clientHello(t, "wtr.test")
	upGot := make(chan int64, 1)
	up := rawUpstream(t, func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, len(hello)))
		go func() { _, n := hashOf(c); upGot <- n }()
		io.Copy(c, pattern(4, size))
		c.CloseWrite()
		time.Sleep(30 * time.Second)
	})
	cfg := baseConfig(config.Route{Match: "wtr.test", Passthrough: config.Upstreams{up}})
	r := startRelay(t, cfg)
	c := dialRelay(t, r)
	c.Write(hello)
	time.Sleep(2500 * time.Millisecond) // busy: neither reads nor sends
	t.Logf("parked while the client paused: %d", parked(r.Server))
	wrote := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, pattern(5, size))
		c.CloseWrite()
		wrote <- err
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("client's upload stuck (relay stopped reading the client); parked=%d", parked(r.Server))
	}
	_, n := hashOf(c)
	if n != size {
		t.Fatalf("client read %d, want %d", n, size)
	}
	if n := <-upGot; n != size {
		t.Fatalf("upstream read %d, want %d", n, size)
	}
}

// parkHand runs one relayed pair the way Server.passthrough does: copy
// goroutines that park, then the engine.
func parkHand(t *testing.T, e *engine, a, b *net.TCPConn, idle time.Duration) <-chan result {
	ch := make(chan result, 1)
	go func() {
		up, down, err := spliceCopier{parkAfter: parkAfter}.pipe(a, b, idle, nil, nil)
		if errors.Is(err, errParked) {
			err = e.splice(a, b, idle, nil, nil, func(u, d int64, err error) {
				a.Close()
				b.Close()
				ch <- result{up + u, down + d, err}
			})
			if err == nil {
				return
			}
			t.Errorf("engine refused: %v", err)
		}
		a.Close()
		b.Close()
		ch <- result{up, down, err}
	}()
	return ch
}

// Many pairs go quiet, then both sides start bulk transfers at staggered
// moments around the parking (before, during, after the hand-over); every
// byte must arrive in order, the half-closes pass, and done reports the
// counts.
func TestParkResumeAtParkingMoment(t *testing.T) {
	const pairs = 24
	const size = 2 << 20
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, pairs)
	type out struct {
		i   int
		err string
	}
	res := make(chan out, pairs)
	for i := range pairs {
		done := parkHand(t, e, a[i], b[i], time.Minute)
		go func() {
			// ticks are 1 s; parking happens at the 1st or 2nd tick
			time.Sleep(900*time.Millisecond + time.Duration(i)*60*time.Millisecond)
			sentUp, sentDown := make(chan [32]byte, 1), make(chan [32]byte, 1)
			go func() { s, _ := send(cli[i], size+i); sentUp <- s }()
			go func() { s, _ := send(up[i], size/2+i); sentDown <- s }()
			gu := make(chan [32]byte, 1)
			go func() { s, _, _ := receive(up[i], i%2 == 0); gu <- s }()
			gd, _, err := receive(cli[i], i%2 == 1)
			if err != nil {
				res <- out{i, err.Error()}
				return
			}
			if <-gu != <-sentUp || gd != <-sentDown {
				res <- out{i, "bytes differ"}
				return
			}
			select {
			case r := <-done:
				if r.err != nil || r.up != int64(size+i) || r.down != int64(size/2+i) {
					res <- out{i, "bad done"}
					return
				}
			case <-time.After(10 * time.Second):
				res <- out{i, "no done"}
				return
			}
			res <- out{i, ""}
		}()
	}
	for range pairs {
		select {
		case o := <-res:
			if o.err != "" {
				t.Errorf("pair %d: %s", o.i, o.err)
			}
		case <-time.After(40 * time.Second):
			t.Fatal("stuck")
		}
	}
}

// A peer resets its connection around the parking moment: the pair ends,
// the other side is closed, and done is called once.
func TestParkReset(t *testing.T) {
	const pairs = 16
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, pairs)
	var dones []<-chan result
	for i := range pairs {
		dones = append(dones, parkHand(t, e, a[i], b[i], time.Minute))
		go func() {
			time.Sleep(900*time.Millisecond + time.Duration(i)*80*time.Millisecond)
			up[i].SetLinger(0)
			up[i].Close()
		}()
	}
	for i, d := range dones {
		select {
		case <-d:
		case <-time.After(10 * time.Second):
			t.Fatalf("pair %d: not ended after reset", i)
		}
		cli[i].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := cli[i].Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("pair %d: client not closed: %v", i, err)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.pairs) != 0 || len(e.socks) != 0 {
		t.Fatalf("engine holds %d pairs, %d socks", len(e.pairs), len(e.socks))
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	return len(ents)
}

// Close the engine while pairs move bulk bytes with stalled readers (pipes
// held), some pairs ending on their own meanwhile: every done is called
// once, no goroutine or descriptor (pipe, epoll) is left.
func TestEngineCloseMidTransfer(t *testing.T) {
	const pairs = 16
	before := openFDs(t)
	e, err := newEngine(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cli, a, b, up := enginePairs(t, pairs)
	var calls atomic.Int32
	dones := make([]chan result, pairs)
	for i := range pairs {
		dones[i] = make(chan result, 2)
		if err := e.splice(a[i], b[i], time.Hour, nil, nil, func(u, d int64, err error) {
			calls.Add(1)
			a[i].Close()
			b[i].Close()
			dones[i] <- result{u, d, err}
		}); err != nil {
			t.Fatal(err)
		}
		go send(cli[i], 64<<20) // nobody reads up[i] for even i
		go send(up[i], 64<<20)
		if i%2 == 1 {
			go io.Copy(io.Discard, up[i])
			go io.Copy(io.Discard, cli[i])
		}
		if i%4 == 3 {
			go func() { time.Sleep(time.Duration(i) * 20 * time.Millisecond); up[i].SetLinger(0); up[i].Close() }()
		}
	}
	time.Sleep(400 * time.Millisecond)
	e.close()
	for i := range pairs {
		select {
		case <-dones[i]:
		default:
			t.Fatalf("pair %d: done not called by close", i)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n := calls.Load(); n != pairs {
		t.Fatalf("%d done calls, want %d", n, pairs)
	}
	for _, cs := range [][]*net.TCPConn{cli, up} {
		for _, c := range cs {
			c.Close()
		}
	}
	// Empty pipes stay in the process-wide pool for pipeIdle.
	waitFDs(t, before, pipeIdle+3*time.Second)
}

// waitFDs fails unless at most want descriptors are open within d.
func waitFDs(t *testing.T, want int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := openFDs(t)
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors open %v after, %d before", n, d, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// In the engine, a peer that never reads: the other direction keeps
// working, and the idle timeout ends the pair once both are quiet.
func TestEngineNeverReader(t *testing.T) {
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, 1)
	done := handOff(t, e, a[0], b[0], 2*time.Second, nil, nil)
	go io.Copy(up[0], pattern(1, 256<<20)) // the client never reads
	time.Sleep(300 * time.Millisecond)
	for range 5 { // the other way still works meanwhile
		cli[0].Write([]byte("ping"))
		up[0].SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.ReadFull(up[0], make([]byte, 4)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case r := <-done:
		if !errors.Is(r.err, ErrIdle) {
			t.Fatalf("ended with %v, want ErrIdle", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("never-reading pair not ended by the idle timeout")
	}
}

// Request/response of random sizes on many pairs at once (the loop's
// inline path and workers both): a lost wake-up hangs a pair.
func TestEnginePingPong(t *testing.T) {
	const pairs, rounds = 32, 300
	e := newTestEngine(t)
	cli, a, b, up := enginePairs(t, pairs)
	errc := make(chan error, pairs)
	for i := range pairs {
		done := handOff(t, e, a[i], b[i], time.Minute, nil, nil)
		go func() {
			// upstream: echo everything back
			go func() { io.Copy(up[i], up[i]); up[i].CloseWrite() }()
			buf := make([]byte, 300<<10)
			got := make([]byte, 300<<10)
			var total int64
			for r := range rounds {
				n := 1 + (r*7919+i*104729)%len(buf)
				if r%3 == 0 {
					n = 1 + r%100
				}
				for j := range buf[:n] {
					buf[j] = byte(r + j)
				}
				wr := make(chan error, 1)
				go func() { _, err := cli[i].Write(buf[:n]); wr <- err }()
				cli[i].SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(cli[i], got[:n]); err != nil {
					errc <- fmt.Errorf("pair %d round %d (%d bytes): %v", i, r, n, err)
					return
				}
				if err := <-wr; err != nil {
					errc <- err
					return
				}
				if !bytes.Equal(got[:n], buf[:n]) {
					errc <- fmt.Errorf("pair %d round %d: bytes differ", i, r)
					return
				}
				total += int64(n)
			}
			cli[i].CloseWrite()
			if _, err := cli[i].Read(got); err != io.EOF {
				errc <- fmt.Errorf("pair %d: want EOF, got %v", i, err)
				return
			}
			select {
			case r := <-done:
				if r.err != nil || r.up != total || r.down != total {
					errc <- fmt.Errorf("pair %d: done(%d,%d,%v) want %d", i, r.up, r.down, r.err, total)
					return
				}
			case <-time.After(10 * time.Second):
				errc <- fmt.Errorf("pair %d: no done", i)
				return
			}
			errc <- nil
		}()
	}
	for range pairs {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
}

// The client resets while one copy goroutine has stopped for parking and
// the other is blocked writing to it: pipe closed both sockets, so it must
// not report errParked (the caller would hand closed sockets to the
// engine).
func TestParkedPipeResetNotParked(t *testing.T) {
	cli, a, b, up := enginePairs(t, 1)
	go io.Copy(up[0], pattern(9, 256<<20)) // the client never reads
	res := make(chan error, 1)
	go func() {
		_, _, err := spliceCopier{parkAfter: parkAfter}.pipe(a[0], b[0], time.Minute, nil, nil)
		res <- err
	}()
	time.Sleep(2500 * time.Millisecond)
	cli[0].SetLinger(0)
	cli[0].Close()
	select {
	case err := <-res:
		if errors.Is(err, errParked) {
			t.Fatal("pipe reported errParked for a pair it closed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("pipe did not return after the client's reset")
	}
}
