//go:build !linux

package relay

import (
	"context"
	"errors"
	"net"
	"time"
)

// engine is Linux-only (epoll, splice(2)); elsewhere each passthrough
// connection is relayed by its own goroutines.
type engine struct{}

func newEngine(context.Context) (*engine, error) { return nil, errors.ErrUnsupported }

func (e *engine) close() {}

type engineWatch struct {
	fd       int
	deadline time.Time
	wr       watcher
}

type watcher interface {
	parked() bool
	ready(timedOut bool)
}

func (e *engine) watch(*engineWatch) error { return errors.ErrUnsupported }
func (e *engine) unwatch(*engineWatch)     {}

func (e *engine) splice(*net.TCPConn, *net.TCPConn, time.Duration, adder, adder, func(up, down int64, err error)) error {
	return errors.ErrUnsupported
}
