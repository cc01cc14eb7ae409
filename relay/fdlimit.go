package relay

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// Open files: a connection costs fdsPerConn descriptors (passthrough: the
// client and the upstream sockets; terminate: the client and, while a
// request is in flight, an upstream connection), plus a fixed reserve for
// listeners, the epoll set, the spare descriptor, logs, the ACME client,
// and the splice pipes and idle upstream pools, which are bounded.
const (
	fdsPerConn   = 2
	fdBaseExtra  = 64 // listeners, epoll, spare, logs, ACME, metrics scrapes
	fdShedLogGap = 10 * time.Second
)

// fdReserve is what the relay may hold besides its connections.
func fdReserve(cfg *config.Config) int {
	n := fdBaseExtra + pipeReserveFDs
	for i := range cfg.Routes {
		if cfg.Routes[i].Terminate != nil {
			n += upMaxIdle
		}
	}
	return n
}

// fitConnections returns the max_connections the open-file limit allows
// (cfg's when it fits) and, when it had to be lowered, the limit and the
// descriptors cfg would need.
func fitConnections(cfg *config.Config, nofile uint64) (effective int, needed uint64, clamped bool) {
	want := cfg.Limits.MaxConnections
	reserve := uint64(fdReserve(cfg))
	needed = uint64(want)*fdsPerConn + reserve
	if nofile == 0 || needed <= nofile {
		return want, needed, false
	}
	fit := 1
	if nofile > reserve+fdsPerConn {
		fit = int((nofile - reserve) / fdsPerConn)
	}
	return min(fit, want), needed, true
}

// fitLimits checks cfg's max_connections against RLIMIT_NOFILE, warns when
// it does not fit and returns the effective limit.
func (s *Server) fitLimits(cfg *config.Config) int {
	nofile := openFileLimit()
	eff, needed, clamped := fitConnections(cfg, nofile)
	if clamped {
		s.log.Warn("limits.max_connections does not fit the open-file limit: lowered so that the relay never runs out of descriptors; "+
			"raise the limit (LimitNOFILE= in relay.service, or ulimit -n) to at least open_files_needed, or lower limits.max_connections",
			"max_connections", cfg.Limits.MaxConnections, "open_files_limit", nofile,
			"open_files_needed", needed, "effective_max_connections", eff)
	}
	return eff
}

// fdShedder keeps one spare descriptor so that, when accept fails with
// EMFILE or ENFILE, it can still take the waiting connection off the
// queue and close it at once, instead of leaving it there (the listener
// would be readable again at once: a busy loop) or sleeping (a stall).
type fdShedder struct {
	mu      sync.Mutex
	spare   *os.File // nil while it is lent out or could not be reopened
	shed    atomic.Int64
	logged  time.Time
	pending int64 // shed since the last log line
	count   func()
	log     func(shed int64, err error)
}

func newFDShedder(count func(), log func(shed int64, err error)) *fdShedder {
	f := &fdShedder{count: count, log: log}
	f.spare, _ = os.Open(os.DevNull)
	return f
}

func (f *fdShedder) close() {
	f.mu.Lock()
	if f.spare != nil {
		f.spare.Close()
		f.spare = nil
	}
	f.mu.Unlock()
}

// fdPressureAt is when descriptors last ran out (unix nanos): for a moment
// after it no splice pipe is made and no upstream dialled for a new
// connection (it is shed), so that the descriptor the shedder frees for
// a moment is not taken instead of its spare.
var fdPressureAt atomic.Int64

const fdPressureFor = 250 * time.Millisecond

func underFDPressure() bool {
	at := fdPressureAt.Load()
	return at != 0 && time.Since(time.Unix(0, at)) < fdPressureFor
}

func isFDExhausted(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// handle sheds the connection that accept on ln could not take for want
// of a descriptor: free the spare, accept and close at once, take the
// spare back. Without a spare it waits a moment for descriptors to free.
func (f *fdShedder) handle(ln net.Listener, err error) {
	fdPressureAt.Store(time.Now().UnixNano())
	closeIdlePipes()
	f.mu.Lock()
	if f.spare == nil { // taken by someone else's open last time
		f.spare, _ = os.Open(os.DevNull)
	}
	shed := false
	if f.spare != nil {
		f.spare.Close()
		f.spare = nil
		shed = acceptAndClose(ln)
		f.spare, _ = os.Open(os.DevNull)
	}
	noSpare := f.spare == nil
	f.mu.Unlock()
	if shed {
		f.note(err)
	}
	if !shed || noSpare {
		// Nothing taken off the queue: the listener stays readable,
		// so wait briefly rather than spin (accept's old back-off
		// reached 1 s); the connections wait in the kernel's queue.
		time.Sleep(5 * time.Millisecond)
	}
}

// note counts a connection shed for want of descriptors (at accept, or
// when its upstream could not be dialled) and logs at most once per
// fdShedLogGap.
func (f *fdShedder) note(err error) {
	f.count()
	f.shed.Add(1)
	f.mu.Lock()
	f.pending++
	now := time.Now()
	var report int64 = -1
	if now.Sub(f.logged) >= fdShedLogGap {
		f.logged, report, f.pending = now, f.pending, 0
	}
	f.mu.Unlock()
	if report >= 0 {
		f.log(report, err)
	}
}

// shedListener is ln whose Accept sheds connections while the process is
// out of descriptors and never returns EMFILE or ENFILE.
type shedListener struct {
	net.Listener
	f *fdShedder
}

func (l *shedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil && isFDExhausted(err) {
			l.f.handle(l.Listener, err)
			continue
		}
		return c, err
	}
}
