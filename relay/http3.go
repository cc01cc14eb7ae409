package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// h3Server serves HTTP/3 for terminate routes with quic-go's http3
// server. It does not own a socket: the QUIC listener hands it the
// datagrams of flows it routed to a terminate route (through h3Conn, a
// net.PacketConn), and its answers go out of the listening socket. The
// requests take the path of the TCP terminate routes' net/http server:
// the same certificates, auth and upstream handler (X-Forwarded-*).
type h3Server struct {
	s     *Server
	conn  *h3Conn
	once  sync.Once
	srv   *http3.Server
	mu    sync.Mutex
	ended bool
}

func (s *Server) newH3Server(pc *net.UDPConn) *h3Server {
	return &h3Server{s: s, conn: newH3Conn(pc)}
}

// start runs the http3 server on first use.
func (h *h3Server) start() {
	h.once.Do(func() {
		s := h.s
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.ended {
			return
		}
		routeOf := func(name string) (*route, error) {
			rt := s.state.Load().resolve(name, []string{"h3"}, false)
			if rt.action != "terminate" || !rt.h3 || rt.term == nil || rt.term.handler == nil {
				return nil, fmt.Errorf("no HTTP/3 route for %q", name)
			}
			return rt, nil
		}
		h.srv = &http3.Server{
			TLSConfig: &tls.Config{
				MinVersion: tls.VersionTLS13,
				GetConfigForClient: func(ch *tls.ClientHelloInfo) (*tls.Config, error) {
					rt, err := routeOf(ch.ServerName)
					if err != nil {
						return nil, err
					}
					return rt.term.tlsConf, nil
				},
			},
			// 0-RTT requests could be replayed to the upstream, which
			// cannot tell them from others.
			QUICConfig: &quic.Config{Allow0RTT: false, MaxIdleTimeout: 30 * time.Second},
			Handler:    http.HandlerFunc(s.serveTerminated),
			ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
				if rt, err := routeOf(c.ConnectionState().TLS.ServerName); err == nil {
					return context.WithValue(ctx, routeCtxKey{}, rt)
				}
				return ctx
			},
			IdleTimeout: s.state.Load().cfg.Limits.IdleTimeout.D(),
			Logger:      slog.New(discardHandler{}),
		}
		go func() {
			if err := h.srv.Serve(h.conn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Warn("http3 server stopped", "err", err)
			}
		}()
	})
}

type discardHandler struct{ slog.Handler }

func (discardHandler) Enabled(context.Context, slog.Level) bool { return false }

// deliver passes a client datagram to the http3 server; dropped when its
// queue is full (QUIC retransmits).
func (h *h3Server) deliver(d []byte, client netip.AddrPort) {
	h.start()
	h.conn.push(d, client)
}

func (h *h3Server) forget(netip.AddrPort) {} // quic-go ends its connections on its own idle timeout

func (h *h3Server) close() {
	h.mu.Lock()
	h.ended = true
	srv := h.srv
	h.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
	h.conn.Close()
}

// h3Conn is the net.PacketConn quic-go reads the terminate flows' datagrams
// from and answers through the listening socket.
type h3Conn struct {
	pc       *net.UDPConn
	in       chan h3Datagram
	done     chan struct{}
	once     sync.Once
	deadline atomic.Int64 // unix nanos; 0 = none
	wake     chan struct{}
}

type h3Datagram struct {
	b    []byte
	from *net.UDPAddr
}

func newH3Conn(pc *net.UDPConn) *h3Conn {
	return &h3Conn{pc: pc, in: make(chan h3Datagram, 1024), done: make(chan struct{}), wake: make(chan struct{}, 1)}
}

func (c *h3Conn) push(d []byte, from netip.AddrPort) {
	select {
	case c.in <- h3Datagram{append([]byte(nil), d...), net.UDPAddrFromAddrPort(from)}:
	default:
	}
}

func (c *h3Conn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		var timer <-chan time.Time
		if dl := c.deadline.Load(); dl != 0 {
			wait := time.Until(time.Unix(0, dl))
			if wait <= 0 {
				return 0, nil, os.ErrDeadlineExceeded
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			timer = t.C
		}
		select {
		case d := <-c.in:
			return copy(p, d.b), d.from, nil
		case <-c.done:
			return 0, nil, net.ErrClosed
		case <-timer:
			return 0, nil, os.ErrDeadlineExceeded
		case <-c.wake: // the deadline changed
		}
	}
}

func (c *h3Conn) WriteTo(p []byte, addr net.Addr) (int, error) {
	select {
	case <-c.done:
		return 0, net.ErrClosed
	default:
	}
	return c.pc.WriteTo(p, addr)
}

func (c *h3Conn) Close() error {
	c.once.Do(func() { close(c.done) })
	return nil
}

func (c *h3Conn) LocalAddr() net.Addr { return c.pc.LocalAddr() }

func (c *h3Conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

func (c *h3Conn) SetReadDeadline(t time.Time) error {
	var v int64
	if !t.IsZero() {
		v = t.UnixNano()
	}
	c.deadline.Store(v)
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

func (c *h3Conn) SetWriteDeadline(time.Time) error { return nil }

// SetReadBuffer and SetWriteBuffer are no-ops: the listening socket's
// buffers are set where it is bound (quic-go would warn without them).
func (c *h3Conn) SetReadBuffer(int) error  { return nil }
func (c *h3Conn) SetWriteBuffer(int) error { return nil }

// altSvc is the Alt-Svc value a terminate route with h3 sends on its TCP
// answers: HTTP/3 on the UDP port the client reached over TCP (443 when
// steered, else the https listener's port).
func altSvc(port uint16) []string {
	return []string{`h3=":` + strconv.Itoa(int(port)) + `"; ma=86400`}
}
