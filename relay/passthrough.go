package relay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrIdle ends a relayed connection on which neither side sent data for
// limits.idle_timeout. A Splicer returns an error matching it
// (errors.Is) for the same reason.
var ErrIdle = errors.New("idle timeout")

// passthrough relays client to an upstream of rt without decrypting:
// dial, optional PROXY header, replay the peeked ClientHello, then splice.
// It reports whether the connection was handed to the kernel (sockmap):
// then it lives on after this returns and is released when it ends.
func (s *Server) passthrough(client *net.TCPConn, hello *ClientHello, rt *route, dst netip.AddrPort, ent *accessEntry) (detached bool) {
	s.m.connections.WithLabelValues(rt.label, "passthrough").Inc()
	active := s.m.active.WithLabelValues(rt.label, "passthrough")
	active.Inc()
	st := s.state.Load()
	lim := st.cfg.Limits

	if underFDPressure() { // out of descriptors a moment ago: shed
		active.Dec()
		s.fds.note(syscall.EMFILE)
		return false
	}
	upConn, addr, err := rt.dial(context.Background(), lim.DialTimeout.D(), dst, func(err error) {
		s.upstreamError(rt.label, dialErrorReason(err))
	})
	if err != nil {
		active.Dec()
		if isFDExhausted(err) { // shed: counted and logged once per interval
			s.fds.note(err)
			return false
		}
		s.log.Warn("upstream unreachable", "route", rt.label, "sni", hello.ServerName, "client", s.peer(client), "err", err)
		if ent != nil {
			ent.Upstream = addr
		}
		s.logEntry(ent, resultUpstreamError, dialErrorReason(err))
		return false
	}
	if ent != nil {
		ent.Upstream = addr
	}
	// What the end of the connection needs, not the hello itself: a
	// connection in the kernel keeps only this.
	label, sni, clientAddr, helloLen := rt.label, hello.ServerName, s.peer(client), int64(len(hello.Raw))
	logWarn := func(msg string, err error) {
		s.log.Warn(msg, "route", label, "sni", sni, "client", clientAddr, "upstream", addr, "err", err)
	}

	var pre []byte
	switch rt.proxyProtocol {
	case "v1":
		pre = proxyHeaderV1(clientAddr, dst)
	case "v2":
		pre = proxyHeaderV2(clientAddr, dst, hello)
	}
	pre = append(pre, hello.Raw...)
	upBytes := s.m.bytes.WithLabelValues(rt.label, "upstream")
	downBytes := s.m.bytes.WithLabelValues(rt.label, "downstream")
	// logEnd holds neither socket: a connection in the kernel keeps it
	// (and what it captures) for its whole life.
	logEnd := func(up, down int64, err error, kernel bool) {
		active.Dec()
		if errors.Is(err, ErrIdle) {
			s.m.limitRejections.WithLabelValues("idle_timeout").Inc()
		}
		s.log.Debug("passthrough done", "route", label, "sni", sni, "client", clientAddr, "upstream", addr,
			"up", up+helloLen, "down", down, "kernel", kernel, "err", err)
		if ent != nil {
			ent.Up, ent.Down = up+helloLen, down
			res, reason := endResult(err)
			if ent.Result != "" { // set before the copy (a failed replay)
				res, reason = ent.Result, ent.Reason
			}
			s.logEntry(ent, res, reason)
		}
	}
	ended := func(up, down int64, err error, kernel bool) {
		upConn.Close()
		logEnd(up, down, err, kernel)
	}

	// Protocol routes stay on splice(2): a server that speaks first may
	// send before the pair could be armed.
	if s.splicer != nil && st.cfg.Splice == "sockmap" && !rt.plain && s.handOff(client) {
		err := s.splicer.Splice(s.hardCtx, client, upConn, pre, lim.IdleTimeout.D(), func(up, down int64, err error) {
			upBytes.Add(float64(up + helloLen))
			downBytes.Add(float64(down))
			logEnd(up, down, err, true)
			s.releaseHandedOff(client)
		})
		if err == nil {
			return true
		}
		s.undetach(client)
		if !errors.Is(err, errors.ErrUnsupported) {
			s.upstreamError(rt.label, "write")
			logWarn("sockmap splice", err)
			if ent != nil {
				ent.Result, ent.Reason = resultUpstreamError, "write"
			}
			ended(0, 0, err, true)
			return false
		}
		s.log.Debug("sockmap splice not possible; using splice(2)", "route", label, "client", clientAddr, "err", err)
	}
	upConn.SetWriteDeadline(time.Now().Add(lim.HelloTimeout.D()))
	if _, err := upConn.Write(pre); err != nil {
		s.upstreamError(rt.label, "write")
		logWarn("replay hello to upstream", err)
		if ent != nil {
			ent.Result, ent.Reason = resultUpstreamError, "write"
		}
		ended(0, 0, err, false)
		return false
	}
	upConn.SetWriteDeadline(time.Time{})
	upBytes.Add(float64(helloLen))
	// The splice engine takes the pair at once: no goroutine waits for
	// either side, so a connection costs the same while a burst still
	// arrives as once it has settled (with copy goroutines until the
	// first quiet second, ~10 KB more each at the burst's peak).
	if passthroughDirect && s.detach(client) {
		if eng := s.engine(); eng != nil {
			err := eng.splice(client, upConn, lim.IdleTimeout.D(), upBytes, downBytes, func(u, d int64, err error) {
				ended(u, d, err, false)
				s.release(client)
			})
			if err == nil {
				return true
			}
			s.log.Debug("splice engine refused the connection; copying with goroutines", "client", clientAddr, "err", err)
		}
		s.undetach(client)
	}
	// Otherwise the copy runs on fresh goroutines and this one ends: its
	// stack grew for the hello and the dial, and would otherwise stay
	// with an idle connection for its whole life. Once both sides are
	// quiet, the goroutines end too and the splice engine watches the
	// pair.
	if s.detach(client) {
		go func() {
			eng := s.engine()
			cp := spliceCopier{}
			if eng != nil {
				cp.parkAfter = parkAfter
			}
			// Past the drain timeout, detached connections are closed
			// through hardCtx; cut says that happened.
			copyPair := func(cp spliceCopier) (up, down int64, err error, cut bool) {
				stop := context.AfterFunc(s.hardCtx, func() { client.Close(); upConn.Close() })
				up, down, err = cp.pipe(client, upConn, lim.IdleTimeout.D(), upBytes, downBytes)
				return up, down, err, !stop()
			}
			up, down, err, cut := copyPair(cp)
			if !cut && errors.Is(err, errParked) {
				err = eng.splice(client, upConn, lim.IdleTimeout.D(), upBytes, downBytes, func(u, d int64, err error) {
					ended(up+u, down+d, err, false)
					s.release(client)
				})
				if err == nil {
					return
				}
				s.log.Debug("splice engine refused the connection; copying with goroutines", "client", clientAddr, "err", err)
				u, d, perr, _ := copyPair(spliceCopier{})
				up, down, err = up+u, down+d, perr
			}
			if errors.Is(err, errParked) { // closed by the drain timeout meanwhile
				err = nil
			}
			ended(up, down, err, false)
			s.release(client)
		}()
		return true
	}
	up, down, err := spliceCopier{}.pipe(client, upConn, lim.IdleTimeout.D(), upBytes, downBytes)
	ended(up, down, err, false)
	return false
}

// passthroughDirect hands passthrough pairs to the splice engine at once
// instead of after parkAfter of quiet.
const passthroughDirect = true

// parkAfter is how long both sides of a passthrough connection must be
// quiet before its copy goroutines hand it to the splice engine: while
// bytes flow, a goroutine per direction answers fastest; an idle
// connection then costs no goroutine stacks (~6 KB instead of ~15 KB).
const parkAfter = time.Second

// Parking states of a pipe: one direction asks, the other stops at its
// next read and confirms; the asker waits parkWait for that.
const (
	parkNone int32 = iota
	parkAsked
	parkStopped
)

const parkWait = 100 * time.Millisecond

// errParked ends a pipe whose connection was handed over (not closed).
var errParked = errors.New("parked")

// passthroughHTTP relays a transparently redirected plain-HTTP connection
// to its original destination.
func (s *Server) passthroughHTTP(client *net.TCPConn, dst netip.AddrPort) {
	st := s.state.Load()
	s.m.connections.WithLabelValues(labelOriginal, "http").Inc()
	active := s.m.active.WithLabelValues(labelOriginal, "http")
	active.Inc()
	defer active.Dec()
	lim := st.cfg.Limits
	ent := s.connEntry(client, time.Now(), nil, nil)
	if ent != nil {
		ent.Route, ent.Action = labelOriginal, "http"
	}
	up, addr, err := s.dialOriginal(context.Background(), lim.DialTimeout.D(), dst)
	if ent != nil {
		ent.Upstream = addr
	}
	if err != nil {
		s.upstreamError(labelOriginal, dialErrorReason(err))
		s.log.Info("original destination unreachable", "client", client.RemoteAddr(), "dst", addr, "err", err)
		s.logEntry(ent, resultUpstreamError, dialErrorReason(err))
		return
	}
	defer up.Close()
	n, m, err := spliceCopier{}.pipe(client, up, lim.IdleTimeout.D(),
		s.m.bytes.WithLabelValues(labelOriginal, "upstream"), s.m.bytes.WithLabelValues(labelOriginal, "downstream"))
	if ent != nil {
		ent.Up, ent.Down = n, m
		res, reason := endResult(err)
		s.logEntry(ent, res, reason)
	}
}

// adder is a byte counter (the relay's per-route metrics).
type adder interface{ Add(float64) }

// spliceCopier relays with splice(2) between two *net.TCPConn (copyConn),
// so payload never enters user space.
type spliceCopier struct {
	// parkAfter > 0: once neither socket received anything for it, pipe
	// stops both directions without closing and returns errParked.
	parkAfter time.Duration
}

// pipe copies both ways, propagating half-close, until both directions
// ended or one failed; counters (may be nil) advance at least once per
// tick during long transfers. The idle check asks the kernel when each
// socket last received data, so no per-read bookkeeping is needed and the
// copy stays in splice(2).
func (cp spliceCopier) pipe(client, upstream *net.TCPConn, idle time.Duration, upC, downC adder) (up, down int64, err error) {
	tick := min(idle, time.Minute)
	if cp.parkAfter > 0 {
		tick = min(tick, cp.parkAfter)
	}
	var (
		wg      sync.WaitGroup
		once    sync.Once
		first   error
		closed  atomic.Bool
		park    atomic.Int32          // parkNone, parkAsked, parkStopped
		stopped = make(chan struct{}) // closed when the asked direction stopped
		ended   atomic.Int32
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
	// stopIfAsked confirms a parking request from the other direction.
	stopIfAsked := func(src *net.TCPConn) bool {
		if !park.CompareAndSwap(parkAsked, parkStopped) {
			return false
		}
		close(stopped)
		src.SetReadDeadline(time.Time{})
		return true
	}
	dir := func(dst, src *net.TCPConn, total *int64, c adder) {
		defer wg.Done()
		for {
			src.SetReadDeadline(time.Now().Add(tick))
			if stopIfAsked(src) { // after the deadline: see the request below
				return
			}
			n, err := copyConn(dst, src)
			*total += n
			if c != nil && n > 0 {
				c.Add(float64(n))
			}
			switch {
			case err == nil: // EOF from src: pass the half-close on
				ended.Add(1)
				dst.CloseWrite()
				return
			case errors.Is(err, os.ErrDeadlineExceeded):
				if stopIfAsked(src) {
					return
				}
				if isIdle() {
					fail(ErrIdle)
					return
				}
				// A half-closed pair stays here: the engine takes
				// pairs with both directions open.
				if cp.parkAfter > 0 && ended.Load() == 0 && !closed.Load() &&
					idleFor(client) >= cp.parkAfter && idleFor(upstream) >= cp.parkAfter &&
					park.CompareAndSwap(parkNone, parkAsked) {
					// The read deadline stops the other direction at
					// its next read, never inside a transfer. It may
					// be blocked writing to a peer that does not read:
					// then this one must go on reading (that peer may
					// wait for it) and checking idleness.
					dst.SetReadDeadline(time.Now())
					t := time.NewTimer(parkWait)
					select {
					case <-stopped:
					case <-t.C:
					}
					t.Stop()
					if park.CompareAndSwap(parkAsked, parkNone) {
						continue // not stopped: its deadline passes as a tick
					}
					src.SetReadDeadline(time.Time{})
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
	if first == nil && !closed.Load() && park.Load() == parkStopped {
		if ended.Load() != 0 {
			// One side ended while the other stopped: nothing to hand
			// over cleanly; go on here.
			u, d, err := spliceCopier{}.pipe(client, upstream, idle, upC, downC)
			return up + u, down + d, err
		}
		return up, down, errParked
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
