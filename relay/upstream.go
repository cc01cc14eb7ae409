package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

var (
	errNoHealthy = errors.New("no healthy upstream")
	errSelfDial  = errors.New("original destination is an address of this host (dialing it would loop into the relay)")
)

// Passive health: after failThreshold consecutive dial failures an upstream
// is skipped for downFor, like a circuit breaker; it is retried when that
// expires or when every upstream of the route is down.
const (
	failThreshold = 3
	downFor       = 10 * time.Second
)

type upstream struct {
	addr      string
	fails     atomic.Int32
	downUntil atomic.Int64 // unix nanos
	lastErr   atomic.Pointer[errEvent]
}

// errEvent is a failure shown on the status page: what and when.
type errEvent struct {
	what string
	at   time.Time
}

func (u *upstream) healthy(now time.Time) bool { return now.UnixNano() >= u.downUntil.Load() }

func (u *upstream) result(err error) {
	if err == nil {
		u.fails.Store(0)
		u.downUntil.Store(0)
		return
	}
	u.lastErr.Store(&errEvent{what: err.Error(), at: time.Now()})
	if u.fails.Add(1) >= failThreshold {
		u.downUntil.Store(time.Now().Add(downFor).UnixNano())
	}
}

// healthRegistry keeps upstream state across reloads, keyed by address.
type healthRegistry struct{ m sync.Map }

func (h *healthRegistry) get(addr string) *upstream {
	v, _ := h.m.LoadOrStore(addr, &upstream{addr: addr})
	return v.(*upstream)
}

// pool is a route's upstreams: round-robin, failing over to the next on a
// dial error.
type pool struct {
	ups  []*upstream
	next atomic.Uint32
}

func dialer(timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout, KeepAliveConfig: keepAlive}
	d.SetMultipathTCP(false)
	return d
}

// dial tries the upstreams in turn; onErr (may be nil) sees every failed
// attempt, also those a later upstream recovered from.
func (p *pool) dial(ctx context.Context, timeout time.Duration, onErr func(error)) (*net.TCPConn, string, error) {
	n := len(p.ups)
	if n == 0 {
		return nil, "", errNoHealthy
	}
	start := int(p.next.Add(1)-1) % n
	now := time.Now()
	var errs []error
	// First pass skips upstreams marked down; if all are down, try them anyway.
	for pass := 0; pass < 2; pass++ {
		for i := 0; i < n; i++ {
			u := p.ups[(start+i)%n]
			if (pass == 0) != u.healthy(now) {
				continue
			}
			c, err := dialer(timeout).DialContext(ctx, "tcp", u.addr)
			if isFDExhausted(err) {
				// This process is out of descriptors: not the
				// upstream's fault, and no other would do better.
				return nil, u.addr, err
			}
			u.result(err)
			if err == nil {
				return c.(*net.TCPConn), u.addr, nil
			}
			if onErr != nil {
				onErr(err)
			}
			errs = append(errs, err)
		}
	}
	if len(errs) == 1 {
		return nil, "", errs[0]
	}
	return nil, "", fmt.Errorf("%w: %w", errNoHealthy, errors.Join(errs...))
}

// dialOriginal dials the destination the client asked for, refusing
// addresses of this host.
func (s *Server) dialOriginal(ctx context.Context, timeout time.Duration, dst netip.AddrPort) (*net.TCPConn, string, error) {
	if !dst.IsValid() || s.isLocal(dst.Addr()) {
		return nil, dst.String(), errSelfDial
	}
	c, err := dialer(timeout).DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, dst.String(), err
	}
	return c.(*net.TCPConn), dst.String(), nil
}

// localAddrs answers "is this an address of this host", refreshing the
// interface list at most every few seconds.
type localAddrs struct {
	mu      sync.Mutex
	at      time.Time
	addrs   map[netip.Addr]bool
	refresh time.Duration
}

func newLocalAddrs() *localAddrs { return &localAddrs{refresh: 5 * time.Second} }

func (l *localAddrs) contains(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsLoopback() || a.IsUnspecified() {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if time.Since(l.at) > l.refresh {
		m := map[netip.Addr]bool{}
		if ifas, err := net.InterfaceAddrs(); err == nil {
			for _, ifa := range ifas {
				if p, err := netip.ParsePrefix(ifa.String()); err == nil {
					m[p.Addr().Unmap()] = true
				}
			}
		}
		l.addrs, l.at = m, time.Now()
	}
	return l.addrs[a]
}
