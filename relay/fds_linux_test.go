package relay

import (
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// fdCount is this process's open descriptors by kind.
type fdCount struct{ sockets, pipes, other int }

func countFDs(t testing.TB) fdCount {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	var n fdCount
	for _, e := range ents {
		l, err := os.Readlink("/proc/self/fd/" + e.Name())
		switch {
		case err != nil: // the ReadDir's own, closed meanwhile
		case strings.HasPrefix(l, "socket:"):
			n.sockets++
		case strings.HasPrefix(l, "pipe:"):
			n.pipes++
		default:
			n.other++
		}
	}
	return n
}

// waitFDsBack fails unless, within d, no more sockets and pipes are open
// than in base.
func waitFDsBack(t *testing.T, base fdCount, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := countFDs(t)
		if n.sockets <= base.sockets && n.pipes <= base.pipes {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after the connections closed: %d sockets, %d pipe ends open; %d and %d before", d, n.sockets, n.pipes, base.sockets, base.pipes)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Idle passthrough connections hold their two sockets in the relay and no
// pipe, while the copy goroutines wait and once parked in the engine; after
// they close, the process is back at its baseline within 5 s.
func TestPassthroughIdleFDs(t *testing.T) {
	const n = 100
	ca := newTestCA(t)
	up := tlsUpstream(t, ca, func(c *tls.Conn) {
		buf := make([]byte, 16)
		if _, err := io.ReadFull(c, buf); err == nil {
			c.Write(buf)
			io.Copy(io.Discard, c)
		}
	})
	r := startRelay(t, baseConfig(config.Route{Match: "fds.test", Passthrough: config.Upstreams{up}}))
	base := countFDs(t)
	var conns []*tls.Conn
	for i := range n {
		c, err := r.dialTLS(t, "fds.test", ca.pool)
		if err != nil {
			t.Fatalf("conn %d: %v", i, err)
		}
		msg := []byte("0123456789abcdef")
		c.Write(msg)
		got := make([]byte, 16)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != string(msg) {
			t.Fatalf("conn %d echo: %q, %v", i, got, err)
		}
		conns = append(conns, c)
	}
	// Each connection is four sockets in this process: the client, the
	// relay's two and the upstream's.
	check := func(when string) {
		t.Helper()
		c := countFDs(t)
		sock, pipe := c.sockets-base.sockets, c.pipes-base.pipes
		t.Logf("%s: %d connections: %+d sockets, %+d pipe ends", when, n, sock, pipe)
		if sock > 4*n+4 {
			t.Errorf("%s: %d sockets for %d connections, want <= %d", when, sock, n, 4*n+4)
		}
		// Empty pipes go back to the pool, which keeps at most
		// maxIdlePipes for pipeIdle.
		if pipe > 2*maxIdlePipes {
			t.Errorf("%s: %d pipe ends held by %d idle connections, want <= %d", when, pipe, n, 2*maxIdlePipes)
		}
	}
	check("copying")
	waitFor(t, func() bool { return parked(r.Server) == n })
	time.Sleep(pipeIdle + 500*time.Millisecond)
	check("parked")
	if c := countFDs(t); c.pipes > base.pipes {
		t.Errorf("parked and idle for %v: %+d pipe ends", pipeIdle, c.pipes-base.pipes)
	}
	for _, c := range conns {
		c.Close()
	}
	waitFDsBack(t, base, 5*time.Second)
}

// Idle terminate connections (h1 and h2, one request each) hold one socket
// each in the relay, plus the upstream pool's, which is bounded.
func TestTerminateIdleFDs(t *testing.T) {
	const n = 60
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	t.Cleanup(upstream.Close)
	r := startRelay(t, baseConfig(config.Route{Match: "tfds.test", Terminate: &config.Terminate{Upstream: upstream.URL, TLS: config.TLS{Mode: "internal"}}}))
	base := countFDs(t)
	var held []io.Closer
	for i := range n {
		var (
			c   io.Closer
			err error
		)
		if i%2 == 0 {
			c, err = idleH1(r.HTTPSAddr().String(), "tfds.test")
		} else {
			c, err = idleH2(r.HTTPSAddr().String(), "tfds.test")
		}
		if err != nil {
			t.Fatalf("conn %d: %v", i, err)
		}
		held = append(held, c)
	}
	c := countFDs(t)
	sock, pipe := c.sockets-base.sockets, c.pipes-base.pipes
	t.Logf("%d idle terminate connections: %+d sockets, %+d pipe ends", n, sock, pipe)
	// Two sockets per connection in this process (client and relay), and
	// the upstream pool's pairs: at most one per connection here.
	if sock > 4*n+4 || pipe > 0 {
		t.Errorf("%d idle terminate connections hold %+d sockets, %+d pipe ends; want <= %d and 0", n, sock, pipe, 4*n+4)
	}
	for _, c := range held {
		c.Close()
	}
	// Pooled upstream connections are kept (bounded, upMaxIdle per
	// route) for upIdleTimeout by design; close them as a reload does.
	for _, f := range r.state.Load().closeIdle {
		f()
	}
	waitFDsBack(t, base, 5*time.Second)
}

// With the pipe pool exhausted, directions copy through buffers: the same
// bytes arrive, in the copy goroutines and in the engine.
func TestCopyWithoutPipes(t *testing.T) {
	pipes.setLimit(0)
	t.Cleanup(func() { pipes.setLimit(maxPipes) })
	t.Run("engine", TestEngineIntegrity)
	t.Run("halfclose", TestEngineHalfClose)
	t.Run("passthrough", TestPassthroughIntegrity64MiB)
	if n := pipes.openPipes(); n != 0 {
		t.Errorf("%d pipes open with a limit of 0", n)
	}
}
