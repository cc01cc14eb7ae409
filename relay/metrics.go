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
}

func newMetrics(reg prometheus.Registerer, sp Splicer) *metrics {
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
		tlsErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_tls_handshake_errors_total",
			Help: "TLS handshakes that failed on terminate routes, by route.",
		}, []string{"route"}),
	}
	for _, r := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(r)
	}
	for _, r := range []string{"timeout", "not_tls", "too_large", "malformed"} {
		m.helloErrors.WithLabelValues(r)
	}
	reg.MustRegister(m.connections, m.active, m.bytes, m.helloErrors, m.upstreamErrors,
		m.bpfAttached, m.reloads, m.limitRejections, m.tlsErrors, splicedCollector{sp})
	return m
}

var splicedDesc = prometheus.NewDesc("relay_bpf_spliced_bytes_total",
	"Bytes moved in the kernel by the BPF sockmap splice (splice: sockmap), read from its BPF map. 0 while splice(2) is in use.",
	[]string{"direction"}, nil)

// splicedCollector reads the kernel's counters at scrape time; the series
// exist at zero without a Splicer, so dashboards need no special case.
type splicedCollector struct{ sp Splicer }

func (c splicedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- splicedDesc }

func (c splicedCollector) Collect(ch chan<- prometheus.Metric) {
	var up, down uint64
	if c.sp != nil {
		up, down, _ = c.sp.SplicedBytes()
	}
	ch <- prometheus.MustNewConstMetric(splicedDesc, prometheus.CounterValue, float64(up), "upstream")
	ch <- prometheus.MustNewConstMetric(splicedDesc, prometheus.CounterValue, float64(down), "downstream")
}
