package relay

import (
	"fmt"

	"github.com/relay-gw/relay/internal/metrics"
)

// Route labels that are not a route's match.
const (
	labelOriginal = "original" // relayed to the original destination (unknown_sni: original)
	labelUnknown  = "unknown"  // rejected: no route for the name
)

// relayMetrics holds the relay's own series. Names and labels are the contract
// in DESIGN.md; labels never carry client-controlled strings.
type relayMetrics struct {
	connections     *metrics.CounterVec // route, action
	active          *metrics.GaugeVec   // route, action
	bytes           *metrics.CounterVec // route, direction
	helloErrors     *metrics.CounterVec // reason
	upstreamErrors  *metrics.CounterVec // route, reason
	bpfAttached     *metrics.Gauge
	reloads         *metrics.CounterVec // result
	limitRejections *metrics.CounterVec // limit
	tlsErrors       *metrics.CounterVec // route
	accessDenied    *metrics.CounterVec // route, reason
	h2Glitches      *metrics.CounterVec // route, kind
	badRequests     *metrics.CounterVec // route, reason
}

func newMetrics(reg *metrics.Registry, sp Splicer) (*relayMetrics, error) {
	m := &relayMetrics{
		connections: metrics.NewCounterVec("relay_connections_total",
			"Connections handled, by route and action (passthrough, terminate, reject, redirect, http).",
			"route", "action"),
		active: metrics.NewGaugeVec("relay_active_connections",
			"Connections open now, by route and action.",
			"route", "action"),
		bytes: metrics.NewCounterVec("relay_bytes_total",
			"Bytes relayed: upstream = client to upstream, downstream = upstream to client.",
			"route", "direction"),
		helloErrors: metrics.NewCounterVec("relay_clienthello_errors_total",
			"Connections dropped before routing because the TLS ClientHello could not be read.",
			"reason"),
		upstreamErrors: metrics.NewCounterVec("relay_upstream_errors_total",
			"Upstream failures, by route and reason (dial, timeout, refused, no_healthy, ...).",
			"route", "reason"),
		bpfAttached: metrics.NewGauge("relay_bpf_attached",
			"1 when the pinned BPF steering programs are in use by this relay, else 0."),
		reloads: metrics.NewCounterVec("relay_config_reloads_total",
			"Configuration reloads, by result (success, failure).",
			"result"),
		limitRejections: metrics.NewCounterVec("relay_limit_rejections_total",
			"Connections refused or closed because a limit was reached (max_connections, max_handshakes, idle_timeout, open_files, ...).",
			"limit"),
		tlsErrors: metrics.NewCounterVec("relay_tls_handshake_errors_total",
			"TLS handshakes that failed on terminate routes, by route.",
			"route"),
	}
	m.accessDenied = metrics.NewCounterVec("relay_access_denied_total",
		"Clients refused by a route's access rules, by route and reason (deny, not_allowed, client_cert, basic_auth, forward_auth).",
		"route", "reason")
	m.h2Glitches = metrics.NewCounterVec("relay_h2_glitches_total",
		"HTTP/2 protocol glitches by route and kind (reset, empty_frame, continuation, ping, settings, window_update_zero, header_too_large, closed_stream, stream_error); past a connection's budget it is closed with ENHANCE_YOUR_CALM.",
		"route", "kind")
	m.badRequests = metrics.NewCounterVec("relay_http_bad_requests_total",
		"Requests refused as malformed on terminate routes, by route and reason (smuggling, malformed, too_large, body: HTTP/1; h2: a malformed h2 request, reset with PROTOCOL_ERROR; host_mismatch: a Host or :authority of another route than the SNI, answered 421).",
		"route", "reason")
	for _, r := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(r)
	}
	for _, r := range []string{"timeout", "not_tls", "too_large", "malformed"} {
		m.helloErrors.WithLabelValues(r)
	}
	for _, c := range []metrics.Collector{m.connections, m.active, m.bytes, m.helloErrors, m.upstreamErrors,
		m.bpfAttached, m.reloads, m.limitRejections, m.tlsErrors, m.accessDenied, m.h2Glitches, m.badRequests, splicedCollector{sp}} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("relay metrics: %w", err)
		}
	}
	return m, nil
}

var splicedDesc = metrics.NewDesc("relay_bpf_spliced_bytes_total",
	"Bytes moved in the kernel by the BPF sockmap splice (splice: sockmap), read from its BPF map. 0 while splice(2) is in use.",
	metrics.KindCounter, "direction")

// splicedCollector reads the kernel's counters at scrape time; the series
// exist at zero without a Splicer, so dashboards need no special case.
type splicedCollector struct{ sp Splicer }

func (c splicedCollector) Describe() []*metrics.Desc { return []*metrics.Desc{splicedDesc} }

func (c splicedCollector) Collect(s *metrics.Sink) error {
	var up, down uint64
	if c.sp != nil {
		up, down, _ = c.sp.SplicedBytes()
	}
	s.Add(splicedDesc, float64(up), "upstream")
	s.Add(splicedDesc, float64(down), "downstream")
	return nil
}
