package relay

import (
	"bufio"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/internal/metrics"
)

// Results of an access log entry.
const (
	resultOK            = "ok"
	resultRefused       = "refused"        // reject route or unknown name
	resultUpstreamError = "upstream_error" // reason says which
	resultAccessDenied  = "access_denied"  // reason: deny, not_allowed, client_cert, basic_auth, forward_auth
	resultError         = "error"          // the client failed: bad hello, TLS handshake, ...
)

// accessEntry is one access log line: a connection, or a request of a
// terminate route (Method set).
type accessEntry struct {
	Time      time.Time
	Client    netip.AddrPort // after PROXY protocol in
	SNI       string
	ALPN      []string // offered by the client
	Route     string
	Action    string
	Upstream  string
	Up, Down  int64 // bytes client → upstream, upstream → client
	Duration  time.Duration
	Result    string
	Reason    string
	Method    string
	Host      string
	Path      string
	Status    int
	User      string
	Referer   string
	UserAgent string
}

// accessLogQueue is how many lines may wait for the writer; past it lines
// are dropped (counted) so that a slow disk never slows a connection.
const accessLogQueue = 4096

// accessLog writes entries on its own goroutine, off the data path.
type accessLog struct {
	path, format string
	ch           chan *accessEntry
	reopen       chan chan error
	quit         chan struct{}
	done         chan struct{}
	dropped      *atomic.Uint64
	log          func(msg string, args ...any)

	f *os.File // owned by the writer goroutine
}

func newAccessLog(c *config.AccessLog, dropped *atomic.Uint64, logf func(string, ...any)) (*accessLog, error) {
	a := &accessLog{
		path: c.Path, format: c.Format,
		ch:      make(chan *accessEntry, accessLogQueue),
		reopen:  make(chan chan error),
		quit:    make(chan struct{}),
		done:    make(chan struct{}),
		dropped: dropped,
		log:     logf,
	}
	if a.format == "" {
		a.format = "json"
	}
	if err := a.open(); err != nil {
		return nil, err
	}
	go a.run()
	return a, nil
}

// open (re)opens the file, creating it 0640 (whatever the umask).
func (a *accessLog) open() error {
	if a.path == "stdout" {
		a.f = os.Stdout
		return nil
	}
	_, statErr := os.Stat(a.path)
	f, err := os.OpenFile(a.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("open access log: %w (check log.access.path and that its directory is writable by the relay user)", err)
	}
	if errors.Is(statErr, os.ErrNotExist) {
		f.Chmod(0o640)
	}
	if a.f != nil && a.f != os.Stdout {
		a.f.Close()
	}
	a.f = f
	return nil
}

func (a *accessLog) add(e *accessEntry) {
	select {
	case a.ch <- e:
	default:
		a.dropped.Add(1)
	}
}

// Reopen closes and reopens the file (logrotate's SIGUSR1).
func (a *accessLog) Reopen() error {
	errc := make(chan error, 1)
	select {
	case a.reopen <- errc:
		return <-errc
	case <-a.done:
		return errors.New("access log closed")
	}
}

// close writes what is queued and closes the file.
func (a *accessLog) close() {
	close(a.quit)
	<-a.done
}

func (a *accessLog) run() {
	defer close(a.done)
	bw := bufio.NewWriterSize(a.f, 32<<10)
	buf := make([]byte, 0, 512)
	write := func(e *accessEntry) {
		buf = a.appendEntry(buf[:0], e)
		bw.Write(buf)
	}
	flush := func() {
		if err := bw.Flush(); err != nil {
			a.log("access log write", "path", a.path, "err", err)
			bw.Reset(a.f) // drop the failed lines, keep going
		}
	}
	// Lines are flushed at most accessLogFlush after they were queued, or
	// when the buffer fills: one write(2) per burst, not per connection.
	flushT := time.NewTimer(time.Hour)
	flushT.Stop()
	armed := false
	for {
		select {
		case e := <-a.ch:
			write(e)
			if !armed {
				flushT.Reset(accessLogFlush)
				armed = true
			}
		case <-flushT.C:
			armed = false
			flush()
		case errc := <-a.reopen:
			flush()
			err := a.open()
			bw.Reset(a.f)
			errc <- err
		case <-a.quit:
			flushT.Stop()
			for more := true; more; {
				select {
				case e := <-a.ch:
					write(e)
				default:
					more = false
				}
			}
			flush()
			if a.f != os.Stdout {
				a.f.Close()
			}
			return
		}
	}
}

// accessLogFlush bounds how long a line waits in the writer's buffer.
const accessLogFlush = 100 * time.Millisecond

// jsonEntry is the JSON form; field names are what filters match on.
type jsonEntry struct {
	Time       string  `json:"time"`
	Client     string  `json:"client"`
	ClientPort uint16  `json:"client_port"`
	SNI        string  `json:"sni"`
	ALPN       string  `json:"alpn"`
	Route      string  `json:"route"`
	Action     string  `json:"action"`
	Upstream   string  `json:"upstream"`
	BytesUp    int64   `json:"bytes_upstream"`
	BytesDown  int64   `json:"bytes_downstream"`
	DurationMS float64 `json:"duration_ms"`
	Result     string  `json:"result"`
	Reason     string  `json:"reason,omitempty"`
	Method     string  `json:"method,omitempty"`
	Host       string  `json:"host,omitempty"`
	Path       string  `json:"path,omitempty"`
	Status     int     `json:"status,omitempty"`
	User       string  `json:"user,omitempty"`
	Referer    string  `json:"referer,omitempty"`
	UserAgent  string  `json:"user_agent,omitempty"`
}

func (a *accessLog) appendEntry(b []byte, e *accessEntry) []byte {
	if a.format == "combined" {
		return appendCombined(b, e)
	}
	j := jsonEntry{
		Time:   e.Time.UTC().Format("2006-01-02T15:04:05.000Z07:00"),
		Client: e.Client.Addr().String(), ClientPort: e.Client.Port(),
		SNI: e.SNI, ALPN: strings.Join(e.ALPN, ","), Route: e.Route, Action: e.Action, Upstream: e.Upstream,
		BytesUp: e.Up, BytesDown: e.Down, DurationMS: float64(e.Duration.Microseconds()) / 1000,
		Result: e.Result, Reason: e.Reason,
		Method: e.Method, Host: e.Host, Path: e.Path, Status: e.Status, User: e.User, Referer: e.Referer, UserAgent: e.UserAgent,
	}
	out, err := json.Marshal(j)
	if err != nil {
		return b
	}
	return append(append(b, out...), '\n')
}

// appendCombined writes Apache's combined format, then the relay's own
// fields as key=value. A connection's request line is
// "ACTION SNI ALPN" and its status "-".
func appendCombined(b []byte, e *accessEntry) []byte {
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	quote := func(s string) string { // like Apache: no raw quotes or control bytes
		q := strconv.Quote(s)
		return q[1 : len(q)-1]
	}
	b = append(b, e.Client.Addr().String()...)
	b = append(b, " - "...)
	b = append(b, dash(quote(e.User))...)
	b = append(b, " ["...)
	b = e.Time.UTC().AppendFormat(b, "02/Jan/2006:15:04:05 -0700")
	b = append(b, "] \""...)
	status := "-"
	if e.Method != "" {
		b = append(b, quote(e.Method+" "+e.Path+" HTTP")...)
		status = strconv.Itoa(e.Status)
	} else {
		b = append(b, quote(strings.ToUpper(dash(e.Action))+" "+dash(e.SNI)+" "+dash(strings.Join(e.ALPN, ",")))...)
	}
	b = append(b, "\" "...)
	b = append(b, status...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, e.Down, 10)
	b = append(b, " \""...)
	b = append(b, dash(quote(e.Referer))...)
	b = append(b, "\" \""...)
	b = append(b, dash(quote(e.UserAgent))...)
	b = append(b, "\" route=\""...)
	b = append(b, quote(e.Route)...)
	b = append(b, "\" action="...)
	b = append(b, dash(e.Action)...)
	b = append(b, " result="...)
	b = append(b, e.Result...)
	if e.Reason != "" {
		b = append(b, " reason="...)
		b = append(b, quote(e.Reason)...)
	}
	b = append(b, " sni="...)
	b = append(b, dash(quote(e.SNI))...)
	if e.Host != "" {
		b = append(b, " host="...)
		b = append(b, quote(e.Host)...)
	}
	b = append(b, " upstream="...)
	b = append(b, dash(e.Upstream)...)
	b = append(b, " bytes_upstream="...)
	b = strconv.AppendInt(b, e.Up, 10)
	b = append(b, " duration_ms="...)
	b = strconv.AppendFloat(b, float64(e.Duration.Microseconds())/1000, 'f', 3, 64)
	return append(b, '\n')
}

var accessDroppedDesc = metrics.NewDesc("relay_access_log_dropped_total",
	"Access log lines dropped because the writer fell behind (the queue was full).",
	metrics.KindCounter)

type droppedCollector struct{ n *atomic.Uint64 }

func (c droppedCollector) Describe() []*metrics.Desc { return []*metrics.Desc{accessDroppedDesc} }

func (c droppedCollector) Collect(s *metrics.Sink) error {
	s.Add(accessDroppedDesc, float64(c.n.Load()))
	return nil
}

// accessLogger holds the current access log (swapped on reload).
type accessLogger struct {
	mu      sync.Mutex // serializes set and Reopen
	cur     atomic.Pointer[accessLog]
	dropped atomic.Uint64
}

// set opens the access log c names (nil: none), closing the old one
// unless it is the same file and format.
func (al *accessLogger) set(c *config.AccessLog, logf func(string, ...any)) error {
	al.mu.Lock()
	defer al.mu.Unlock()
	old := al.cur.Load()
	if c == nil {
		al.cur.Store(nil)
	} else if old != nil && old.path == c.Path && old.format == cmp.Or(c.Format, "json") {
		return nil
	} else {
		a, err := newAccessLog(c, &al.dropped, logf)
		if err != nil {
			return err
		}
		al.cur.Store(a)
	}
	if old != nil {
		old.close()
	}
	return nil
}

func (al *accessLogger) add(e *accessEntry) {
	if a := al.cur.Load(); a != nil {
		a.add(e)
	}
}

func (al *accessLogger) on() bool { return al.cur.Load() != nil }

func (al *accessLogger) close() { al.set(nil, nil) }

// connEntry starts the access log entry of connection c (nil when there
// is no access log: callers pass it along regardless).
func (s *Server) connEntry(c net.Conn, start time.Time, hello *ClientHello, rt *route) *accessEntry {
	if !s.alog.on() {
		return nil
	}
	e := &accessEntry{Time: start, Client: s.clientAddr(c)}
	if hello != nil {
		e.SNI, e.ALPN = hello.ServerName, hello.ALPN
	}
	if rt != nil {
		e.Route, e.Action = rt.label, rt.action
	}
	return e
}

// logEntry finishes e with its result and queues it (e may be nil).
func (s *Server) logEntry(e *accessEntry, result, reason string) {
	if e == nil {
		return
	}
	e.Result, e.Reason = result, reason
	if e.Duration == 0 {
		e.Duration = time.Since(e.Time)
	}
	s.alog.add(e)
}

// ReopenAccessLog reopens the access log file (SIGUSR1, after logrotate
// moved it); nil when there is none.
func (s *Server) ReopenAccessLog() error {
	s.alog.mu.Lock()
	defer s.alog.mu.Unlock()
	if a := s.alog.cur.Load(); a != nil {
		return a.Reopen()
	}
	return nil
}

// endResult maps how a relayed connection ended to a result and reason.
func endResult(err error) (string, string) {
	switch {
	case err == nil, errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		return resultOK, ""
	case errors.Is(err, ErrIdle):
		return resultOK, "idle_timeout"
	case errors.Is(err, syscall.ECONNRESET):
		return resultOK, "reset"
	}
	return resultError, "io"
}

// maxLoggedPath bounds the path written per request.
const maxLoggedPath = 1024

// requestEntry starts the entry of a request on terminated connection cc
// from the connection's fields (nil when there is no access log).
func (s *Server) requestEntry(cc *termConn, req *http.Request) *accessEntry {
	if cc == nil || cc.ent == nil || !s.alog.on() {
		return nil
	}
	e := *cc.ent
	e.Time, e.Duration = time.Now(), 0
	e.Method, e.Host = req.Method, req.Host
	e.Path = req.URL.Path // no query: it may carry secrets
	if len(e.Path) > maxLoggedPath {
		e.Path = e.Path[:maxLoggedPath]
	}
	if u, _, ok := req.BasicAuth(); ok {
		e.User = u
	}
	e.Referer, e.UserAgent = req.Referer(), req.UserAgent()
	if t := cc.route.term; t != nil && t.proxy != nil {
		e.Upstream = t.proxy.addr
	}
	return &e
}

// requestDone queues a request's entry: its status, and the result the
// relay noted (access denied, upstream error), else ok.
func (s *Server) requestDone(e *accessEntry, status int, up, down int64, result, reason string) {
	if e == nil {
		return
	}
	e.Status, e.Up, e.Down = status, up, down
	if result == "" {
		result = resultOK
	}
	s.logEntry(e, result, reason)
}

// resultNoter is a response writer that keeps what the relay itself
// answered (access denied, upstream error) for the access log.
type resultNoter interface {
	noteResult(result, reason string)
}

func noteResult(w http.ResponseWriter, result, reason string) {
	if n, ok := w.(resultNoter); ok {
		n.noteResult(result, reason)
	}
}

// statusWriter records a net/http handler's status and body size.
type statusWriter struct {
	http.ResponseWriter
	status         int
	n              int64
	result, reason string
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach Flush and deadlines.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) noteResult(result, reason string) { w.result, w.reason = result, reason }
