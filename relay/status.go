package relay

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/relay-gw/relay/internal/metrics"
)

// Status is the document served at /status and printed by `relayctl stats
// --json`; docs/STATUS.md describes every field. Numbers that are also
// metrics are read from the same registry /metrics serves, so the two
// agree. Field names are a contract: extend, never rename.
type Status struct {
	Version       string    `json:"version"`
	Now           time.Time `json:"now"`
	StartedAt     time.Time `json:"started_at"`
	UptimeSeconds float64   `json:"uptime_seconds"`
	Process       Process   `json:"process"`
	// HistorySeconds is the length of each route's per-second series.
	HistorySeconds    int                `json:"history_seconds"`
	Routes            []RouteStatus      `json:"routes"`
	Certificates      []CertStatus       `json:"certificates"`
	Steering          SteeringStatus     `json:"steering"`
	ClientHelloErrors map[string]float64 `json:"clienthello_errors"` // reason → count
	UpstreamErrors    []ErrorCount       `json:"upstream_errors"`
	LimitRejections   map[string]float64 `json:"limit_rejections"` // limit → count
}

// Process is the relay process's own resources.
type Process struct {
	ResidentBytes     float64 `json:"resident_bytes"`
	HeapBytes         uint64  `json:"heap_bytes"`
	Goroutines        int     `json:"goroutines"`
	OpenFiles         float64 `json:"open_files"`
	MaxOpenFiles      float64 `json:"max_open_files"`
	ActiveConnections int64   `json:"active_connections"`
	MaxConnections    int     `json:"max_connections"`
}

// RouteStatus is one route: those of the config in order, then
// "original" (unknown_sni: original) and "unknown" (rejected names).
type RouteStatus struct {
	Match     string           `json:"match"`
	Action    string           `json:"action"`
	Upstreams []UpstreamStatus `json:"upstreams"`
	// Sums over the route's actions of relay_active_connections,
	// relay_connections_total, relay_bytes_total and
	// relay_upstream_errors_total.
	ActiveConnections float64     `json:"active_connections"`
	Connections       float64     `json:"connections_total"`
	BytesUpstream     float64     `json:"bytes_upstream_total"`
	BytesDownstream   float64     `json:"bytes_downstream_total"`
	UpstreamErrors    float64     `json:"upstream_errors_total"`
	LastError         *ErrorEvent `json:"last_error,omitempty"`
	// Per second over the last HistorySeconds, oldest first; bytes are
	// both directions.
	ConnectionsPerSecond []float64 `json:"connections_per_second"`
	BytesPerSecond       []float64 `json:"bytes_per_second"`
}

// UpstreamStatus is a passthrough upstream's passive health, or a
// terminate route's upstream URL (no passive health: Healthy is true).
type UpstreamStatus struct {
	Address             string      `json:"address"`
	Healthy             bool        `json:"healthy"`
	ConsecutiveFailures int         `json:"consecutive_failures"`
	DownUntil           *time.Time  `json:"down_until,omitempty"`
	LastError           *ErrorEvent `json:"last_error,omitempty"`
}

// ErrorEvent is the last failure of a route or upstream.
type ErrorEvent struct {
	Error string    `json:"error"`
	At    time.Time `json:"at"`
}

// ErrorCount is one relay_upstream_errors_total series.
type ErrorCount struct {
	Route  string  `json:"route"`
	Reason string  `json:"reason"`
	Count  float64 `json:"count"`
}

// CertStatus is a certificate served (relay_certificate_expiry_timestamp_seconds);
// the ACME fields are filled for ACME certificates.
type CertStatus struct {
	Name        string     `json:"name"`
	Issuer      string     `json:"issuer"`
	NotAfter    time.Time  `json:"not_after"`
	NextRenewal *time.Time `json:"next_renewal,omitempty"`
	LastError   string     `json:"last_error,omitempty"`
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
}

// SteeringStatus is what steers traffic to the relay.
type SteeringStatus struct {
	BPFAttached bool           `json:"bpf_attached"`
	Parts       []SteeringPart `json:"parts"`
	// Counters are the relay_bpf_* series (read from the BPF maps).
	Counters []Counter `json:"counters"`
}

// SteeringPart is one relay_steering_healthy part (iptables_v4,
// iptables_v6, sk_lookup, sockmap) with the watcher's detail.
type SteeringPart struct {
	Name      string  `json:"name"`
	Healthy   bool    `json:"healthy"`
	Repairs   float64 `json:"repairs"`
	State     string  `json:"state,omitempty"` // ok | repaired | failing (from the watcher)
	Error     string  `json:"error,omitempty"`
	LastDrift string  `json:"last_drift,omitempty"`
}

// Counter is one metric series.
type Counter struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
	Value  float64           `json:"value"`
}

// SetStatusHook sets a function that completes each status document
// (version, certificate renewal state, steering detail).
func (s *Server) SetStatusHook(fn func(*Status)) {
	s.statusMu.Lock()
	s.statusHook = fn
	s.statusMu.Unlock()
}

// upstreamError counts an upstream failure and keeps it as the route's
// last error.
func (s *Server) upstreamError(label, reason string) {
	s.m.upstreamErrors.WithLabelValues(label, reason).Inc()
	s.lastErrors.Store(label, &errEvent{what: reason, at: time.Now()})
}

const historyLen = 60

// history keeps a sample per second of each route's connection and byte
// totals: historyLen+1 samples give historyLen rates.
type history struct {
	mu      sync.Mutex
	samples [historyLen + 1]sample
	n, head int // head: next slot
}

type sample struct {
	at     time.Time
	totals map[string][2]float64 // route → connections, bytes
}

func (s *Server) sampleLoop(done <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	s.sample()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			s.sample()
		}
	}
}

func (s *Server) sample() {
	tot := map[string][2]float64{}
	s.m.connections.Each(func(lvs []string, v float64) {
		x := tot[lvs[0]]
		x[0] += v
		tot[lvs[0]] = x
	})
	s.m.bytes.Each(func(lvs []string, v float64) {
		x := tot[lvs[0]]
		x[1] += v
		tot[lvs[0]] = x
	})
	h := &s.hist
	h.mu.Lock()
	h.samples[h.head] = sample{at: time.Now(), totals: tot}
	h.head = (h.head + 1) % len(h.samples)
	h.n = min(h.n+1, len(h.samples))
	h.mu.Unlock()
}

// rates returns per-second connections and bytes of route over the last
// historyLen seconds, oldest first, zeros where no sample is yet.
func (h *history) rates(route string) (conns, bytes []float64) {
	conns, bytes = make([]float64, historyLen), make([]float64, historyLen)
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := 1; i < h.n; i++ {
		cur := h.samples[(h.head-i+len(h.samples))%len(h.samples)]
		prev := h.samples[(h.head-i-1+len(h.samples))%len(h.samples)]
		dt := cur.at.Sub(prev.at).Seconds()
		if dt <= 0 {
			continue
		}
		a, b := cur.totals[route], prev.totals[route]
		conns[historyLen-i] = max(0, a[0]-b[0]) / dt
		bytes[historyLen-i] = max(0, a[1]-b[1]) / dt
	}
	return conns, bytes
}

// Status builds the status document.
func (s *Server) Status() *Status {
	now := time.Now()
	fams, _ := s.reg.Gather() // a failed collector leaves its part empty
	byName := map[string][]metrics.Series{}
	for _, f := range fams {
		byName[f.Name] = f.Series
	}
	one := func(name string) float64 {
		if ss := byName[name]; len(ss) > 0 {
			return ss[0].Value
		}
		return 0
	}
	sumRoute := func(name, route, label, value string) float64 {
		var v float64
		for _, x := range byName[name] {
			if x.Label("route") == route && (label == "" || x.Label(label) == value) {
				v += x.Value
			}
		}
		return v
	}
	st := s.state.Load()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	out := &Status{
		Version:       "dev",
		Now:           now.UTC(),
		StartedAt:     s.started.UTC(),
		UptimeSeconds: now.Sub(s.started).Seconds(),
		Process: Process{
			ResidentBytes: one("process_resident_memory_bytes"), HeapBytes: ms.HeapInuse,
			Goroutines: runtime.NumGoroutine(), OpenFiles: one("process_open_fds"), MaxOpenFiles: one("process_max_fds"),
			ActiveConnections: s.active.Load(), MaxConnections: st.cfg.Limits.MaxConnections,
		},
		HistorySeconds:    historyLen,
		Routes:            []RouteStatus{},
		Certificates:      []CertStatus{},
		ClientHelloErrors: map[string]float64{},
		UpstreamErrors:    []ErrorCount{},
		LimitRejections:   map[string]float64{},
	}
	addRoute := func(label, action string, ups []UpstreamStatus) {
		r := RouteStatus{Match: label, Action: action, Upstreams: ups,
			ActiveConnections: sumRoute("relay_active_connections", label, "", ""),
			Connections:       sumRoute("relay_connections_total", label, "", ""),
			BytesUpstream:     sumRoute("relay_bytes_total", label, "direction", "upstream"),
			BytesDownstream:   sumRoute("relay_bytes_total", label, "direction", "downstream"),
			UpstreamErrors:    sumRoute("relay_upstream_errors_total", label, "", ""),
		}
		if r.Upstreams == nil {
			r.Upstreams = []UpstreamStatus{}
		}
		if v, ok := s.lastErrors.Load(label); ok {
			e := v.(*errEvent)
			r.LastError = &ErrorEvent{Error: e.what, At: e.at.UTC()}
		}
		r.ConnectionsPerSecond, r.BytesPerSecond = s.hist.rates(label)
		out.Routes = append(out.Routes, r)
	}
	for i := range st.cfg.Routes {
		rc := &st.cfg.Routes[i]
		label := normalizeName(rc.Match)
		var ups []UpstreamStatus
		for _, a := range rc.Passthrough {
			u := s.health.get(a)
			us := UpstreamStatus{Address: a, Healthy: u.healthy(now), ConsecutiveFailures: int(u.fails.Load())}
			if d := u.downUntil.Load(); d > now.UnixNano() {
				t := time.Unix(0, d).UTC()
				us.DownUntil = &t
			}
			if e := u.lastErr.Load(); e != nil {
				us.LastError = &ErrorEvent{Error: e.what, At: e.at.UTC()}
			}
			ups = append(ups, us)
		}
		if rc.Terminate != nil {
			ups = append(ups, UpstreamStatus{Address: rc.Terminate.Upstream, Healthy: true})
		}
		addRoute(label, rc.Action(), ups)
	}
	addRoute(labelOriginal, "passthrough", nil)
	addRoute(labelUnknown, "reject", nil)

	for _, x := range byName["relay_certificate_expiry_timestamp_seconds"] {
		out.Certificates = append(out.Certificates, CertStatus{Name: x.Label("name"), Issuer: x.Label("issuer"),
			NotAfter: time.Unix(int64(x.Value), 0).UTC()})
	}
	out.Steering.BPFAttached = one("relay_bpf_attached") == 1
	repairs := map[string]float64{}
	for _, x := range byName["relay_steering_repairs_total"] {
		repairs[x.Label("part")] = x.Value
	}
	for _, x := range byName["relay_steering_healthy"] {
		p := x.Label("part")
		out.Steering.Parts = append(out.Steering.Parts, SteeringPart{Name: p, Healthy: x.Value == 1, Repairs: repairs[p]})
	}
	out.Steering.Counters = []Counter{}
	for _, f := range fams {
		if !strings.HasPrefix(f.Name, "relay_bpf_") || f.Name == "relay_bpf_attached" {
			continue
		}
		for _, x := range f.Series {
			c := Counter{Name: x.Name, Value: x.Value}
			if len(x.Labels) > 0 {
				c.Labels = map[string]string{}
				for _, l := range x.Labels {
					c.Labels[l.Name] = l.Value
				}
			}
			out.Steering.Counters = append(out.Steering.Counters, c)
		}
	}
	for _, x := range byName["relay_clienthello_errors_total"] {
		out.ClientHelloErrors[x.Label("reason")] = x.Value
	}
	for _, x := range byName["relay_upstream_errors_total"] {
		out.UpstreamErrors = append(out.UpstreamErrors, ErrorCount{Route: x.Label("route"), Reason: x.Label("reason"), Count: x.Value})
	}
	for _, x := range byName["relay_limit_rejections_total"] {
		out.LimitRejections[x.Label("limit")] += x.Value
	}
	sort.Slice(out.Certificates, func(i, j int) bool { return out.Certificates[i].Name < out.Certificates[j].Name })

	s.statusMu.Lock()
	hook := s.statusHook
	s.statusMu.Unlock()
	if hook != nil {
		hook(out)
	}
	return out
}

//go:embed status.html
var statusPage []byte

func (s *Server) serveStatus(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(s.Status())
}

func serveStatusPage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	// The page is ours and fetches only /status: nothing else may load.
	w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
	w.Write(statusPage)
}
