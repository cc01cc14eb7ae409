package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relay-gw/relay/internal/metrics"
)

// ErrIdle ends a relayed connection on which neither side sent data for
// limits.idle_timeout. A Splicer returns an error matching it
// (errors.Is) for the same reason.
var ErrIdle = errors.New("idle timeout")

// passthrough relays client to an upstream of rt without decrypting:
// dial, optional PROXY header, replay the peeked ClientHello, then splice.
// It reports whether the connection was handed to the kernel (sockmap):
// then it lives on after this returns and is released when it ends.
func (s *Server) passthrough(client *net.TCPConn, hello *ClientHello, rt *route, dst netip.AddrPort) (detached bool) {
	s.m.connections.WithLabelValues(rt.label, "passthrough").Inc()
	active := s.m.active.WithLabelValues(rt.label, "passthrough")
	active.Inc()
	st := s.state.Load()
	lim := st.cfg.Limits

	upConn, addr, err := rt.dial(context.Background(), lim.DialTimeout.D(), dst, func(err error) {
		s.m.upstreamErrors.WithLabelValues(rt.label, dialErrorReason(err)).Inc()
	})
	if err != nil {
		active.Dec()
		s.log.Warn("upstream unreachable", "route", rt.label, "sni", hello.ServerName, "client", client.RemoteAddr(), "err", err)
		return false
	}
	// What the end of the connection needs, not the hello itself: a
	// connection in the kernel keeps only this.
	label, sni, clientAddr, helloLen := rt.label, hello.ServerName, client.RemoteAddr(), int64(len(hello.Raw))
	logWarn := func(msg string, err error) {
		s.log.Warn(msg, "route", label, "sni", sni, "client", clientAddr, "upstream", addr, "err", err)
	}

	var pre []byte
	switch rt.proxyProtocol {
	case "v1":
		pre = proxyHeaderV1(client.RemoteAddr(), dst)
	case "v2":
		pre = proxyHeaderV2(client.RemoteAddr(), dst, hello)
	}
	pre = append(pre, hello.Raw...)
	upBytes := s.m.bytes.WithLabelValues(rt.label, "upstream")
	downBytes := s.m.bytes.WithLabelValues(rt.label, "downstream")
	ended := func(up, down int64, err error, kernel bool) {
		upConn.Close()
		active.Dec()
		if errors.Is(err, ErrIdle) {
			s.m.limitRejections.WithLabelValues("idle_timeout").Inc()
		}
		s.log.Debug("passthrough done", "route", label, "sni", sni, "client", clientAddr, "upstream", addr,
			"up", up+helloLen, "down", down, "kernel", kernel, "err", err)
	}

	if s.splicer != nil && st.cfg.Splice == "sockmap" && s.detach(client) {
		err := s.splicer.Splice(s.hardCtx, client, upConn, pre, lim.IdleTimeout.D(), func(up, down int64, err error) {
			upBytes.Add(float64(up + helloLen))
			downBytes.Add(float64(down))
			ended(up, down, err, true)
			s.release(client)
		})
		if err == nil {
			return true
		}
		s.undetach(client)
		if !errors.Is(err, errors.ErrUnsupported) {
			s.m.upstreamErrors.WithLabelValues(rt.label, "write").Inc()
			logWarn("sockmap splice", err)
			ended(0, 0, err, true)
			return false
		}
		s.log.Debug("sockmap splice not possible; using splice(2)", "route", label, "client", clientAddr, "err", err)
	}
	upConn.SetWriteDeadline(time.Now().Add(lim.HelloTimeout.D()))
	if _, err := upConn.Write(pre); err != nil {
		s.m.upstreamErrors.WithLabelValues(rt.label, "write").Inc()
		logWarn("replay hello to upstream", err)
		ended(0, 0, err, false)
		return false
	}
	upConn.SetWriteDeadline(time.Time{})
	upBytes.Add(float64(helloLen))
	// The copy runs on fresh goroutines and this one ends: its stack grew
	// for the hello and the dial, and would otherwise stay with an idle
	// connection for its whole life.
	if s.detach(client) {
		go func() {
			// Past the drain timeout, detached connections are closed
			// through hardCtx.
			stop := context.AfterFunc(s.hardCtx, func() { client.Close(); upConn.Close() })
			up, down, err := spliceCopier{}.pipe(client, upConn, lim.IdleTimeout.D(), upBytes, downBytes)
			stop()
			ended(up, down, err, false)
			s.release(client)
		}()
		return true
	}
	up, down, err := spliceCopier{}.pipe(client, upConn, lim.IdleTimeout.D(), upBytes, downBytes)
	ended(up, down, err, false)
	return false
}

// passthroughHTTP relays a transparently redirected plain-HTTP connection
// to its original destination.
func (s *Server) passthroughHTTP(client *net.TCPConn, dst netip.AddrPort) {
	st := s.state.Load()
	s.m.connections.WithLabelValues(labelOriginal, "http").Inc()
	active := s.m.active.WithLabelValues(labelOriginal, "http")
	active.Inc()
	defer active.Dec()
	lim := st.cfg.Limits
	up, addr, err := s.dialOriginal(context.Background(), lim.DialTimeout.D(), dst)
	if err != nil {
		s.m.upstreamErrors.WithLabelValues(labelOriginal, dialErrorReason(err)).Inc()
		s.log.Info("original destination unreachable", "client", client.RemoteAddr(), "dst", addr, "err", err)
		return
	}
	defer up.Close()
	spliceCopier{}.pipe(client, up, lim.IdleTimeout.D(),
		s.m.bytes.WithLabelValues(labelOriginal, "upstream"), s.m.bytes.WithLabelValues(labelOriginal, "downstream"))
}

// spliceCopier relays with io.Copy between two *net.TCPConn, which the
// runtime turns into splice(2), so payload never enters user space.
type spliceCopier struct{}

// pipe copies both ways, propagating half-close, until both directions
// ended or one failed; counters (may be nil) advance at least once per
// tick during long transfers. The idle check asks the kernel when each
// socket last received data, so no per-read bookkeeping is needed and the
// copy stays in splice(2).
func (spliceCopier) pipe(client, upstream *net.TCPConn, idle time.Duration, upC, downC *metrics.Counter) (up, down int64, err error) {
	tick := min(idle, time.Minute)
	var (
		wg     sync.WaitGroup
		once   sync.Once
		first  error
		closed atomic.Bool
	)
	fail := func(e error) {
		once.Do(func() { first = e })
		if closed.CompareAndSwap(false, true) {
			client.Close()
			upstream.Close()
		}
	}
	isIdle := func() bool {
		return idleFor(client) >= idle && idleFor(upstream) >= idle
	}
	dir := func(dst, src *net.TCPConn, total *int64, c *metrics.Counter) {
		defer wg.Done()
		for {
			src.SetReadDeadline(time.Now().Add(tick))
			n, err := io.Copy(dst, src)
			*total += n
			if c != nil && n > 0 {
				c.Add(float64(n))
			}
			switch {
			case err == nil: // EOF from src: pass the half-close on
				dst.CloseWrite()
				return
			case errors.Is(err, os.ErrDeadlineExceeded):
				if isIdle() {
					fail(ErrIdle)
					return
				}
			default:
				if !closed.Load() {
					fail(err)
				}
				return
			}
		}
	}
	wg.Add(2)
	go dir(upstream, client, &up, upC)
	dir(client, upstream, &down, downC)
	wg.Wait()
	if first != nil && isBenignClose(first) {
		first = nil
	}
	return up, down, first
}

func isBenignClose(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, net.ErrClosed)
}

func dialErrorReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, errNoHealthy):
		return "no_healthy"
	case errors.Is(err, errSelfDial):
		return "self_dial"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	default:
		return "dial"
	}
}
