package relay

import (
	"context"
	"net"
	"time"
)

// StopAccepting closes the server's listeners and leaves everything else
// running: for a hand-over, where another process holds descriptors of the
// same listening sockets. Closing a descriptor here does not close the
// socket, so connections waiting in its kernel accept queue stay there for
// the new process; none is refused or reset. Serve keeps running (its
// accept loops end) until its context ends, then drains as usual.
func (s *Server) StopAccepting() { s.closeListeners() }

// WaitHellos waits, after StopAccepting, until no accepted connection is
// still reading its ClientHello (Serve's drain closes those at once, which
// is right for a shutdown but would reset connections a hand-over already
// took), or until ctx ends. limits.hello_timeout bounds the wait.
func (s *Server) WaitHellos(ctx context.Context) {
	// First let the accept loops admit what they took from the queue
	// just before StopAccepting: those are not counted yet.
	select {
	case <-ctx.Done():
		return
	case <-time.After(100 * time.Millisecond):
	}
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		n := 0
		s.mu.Lock()
		for _, st := range s.tracked {
			if st == connHello {
				n++
			}
		}
		s.mu.Unlock()
		if n == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// OpenConnections is the number of client connections the server holds.
func (s *Server) OpenConnections() int64 { return s.active.Load() }

// MetricsListener returns the metrics listener (nil when off), e.g. to
// hand it to the process that takes over.
func (s *Server) MetricsListener() net.Listener { return s.metricLn }
