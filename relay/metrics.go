package relay

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Route labels that are not a route's match.
const (
	labelOriginal = "original" // relayed to the original destination (unknown_sni: original)
	labelUnknown  = "unknown"  // rejected: no route for the name
)

// metrics holds the relay's own series. Names and labels are the contract
// in DESIGN.md; labels never carry client-controlled strings.
type metrics struct {
	connections     *prometheus.CounterVec // route, action
	active          *prometheus.GaugeVec   // route, action
	bytes           *prometheus.CounterVec // route, direction
	helloErrors     *prometheus.CounterVec // reason
	upstreamErrors  *prometheus.CounterVec // route, reason
	bpfAttached     prometheus.Gauge
	reloads         *prometheus.CounterVec // result
	limitRejections *prometheus.CounterVec // limit
	tlsErrors       *prometheus.CounterVec // route
	splicedBytes    *prometheus.CounterVec // direction; in-kernel (sockmap) splicing only
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_connections_total",
			Help: "Connections handled, by route and action (passthrough, terminate, reject, redirect, http).",
		}, []string{"route", "action"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "relay_active_connections",
			Help: "Connections open now, by route and action.",
		}, []string{"route", "action"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_bytes_total",
			Help: "Bytes relayed: upstream = client to upstream, downstream = upstream to client.",
		}, []string{"route", "direction"}),
		helloErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_clienthello_errors_total",
			Help: "Connections dropped before routing because the TLS ClientHello could not be read.",
		}, []string{"reason"}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_upstream_errors_total",
			Help: "Upstream failures, by route and reason (dial, timeout, refused, no_healthy, ...).",
		}, []string{"route", "reason"}),
		bpfAttached: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_bpf_attached",
			Help: "1 when the pinned BPF steering programs are in use by this relay, else 0.",
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_config_reloads_total",
			Help: "Configuration reloads, by result (success, failure).",
		}, []string{"result"}),
		limitRejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_limit_rejections_total",
			Help: "Connections refused or closed because a limit was reached (max_connections, max_handshakes, idle_timeout).",
		}, []string{"limit"}),
		splicedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_bpf_spliced_bytes_total",
			Help: "Bytes moved in the kernel by the BPF sockmap splice (splice: sockmap). 0 while splice(2) is in use.",
		}, []string{"direction"}),
		tlsErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_tls_handshake_errors_total",
			Help: "TLS handshakes that failed on terminate routes, by route.",
		}, []string{"route"}),
	}
	for _, r := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(r)
	}
	m.splicedBytes.WithLabelValues("upstream")
	m.splicedBytes.WithLabelValues("downstream")
	for _, r := range []string{"timeout", "not_tls", "too_large", "malformed"} {
		m.helloErrors.WithLabelValues(r)
	}
	reg.MustRegister(m.connections, m.active, m.bytes, m.helloErrors, m.upstreamErrors,
		m.bpfAttached, m.reloads, m.limitRejections, m.tlsErrors, m.splicedBytes)
	return m
}
