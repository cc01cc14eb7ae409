//go:build linux

package bpf

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	descSteered = prometheus.NewDesc("relay_bpf_steered_connections_total",
		"Connections the sk_lookup program gave to the relay, by destination port (read from the BPF map).", []string{"port"}, nil)
	descNoSocket = prometheus.NewDesc("relay_bpf_steer_no_socket_total",
		"Connections on a steered port while no relay listener was registered: passed to the normal lookup (fail-open).", []string{"port"}, nil)
	descAssignErr = prometheus.NewDesc("relay_bpf_steer_assign_errors_total",
		"Connections the program could not assign to the relay's listener (e.g. IPv6 to an IPv4-only socket): passed on.", []string{"port"}, nil)
	descAccepted = prometheus.NewDesc("relay_bpf_accepted_connections_total",
		"TCP connections accepted on the relay's ports in its network namespace, counted in the kernel (sock_ops), by local port.", []string{"port"}, nil)
	descClosed = prometheus.NewDesc("relay_bpf_closed_connections_total",
		"Of those, connections closed (counted by the kernel at close, also when the relay died first).", []string{"port"}, nil)
	descClientBytes = prometheus.NewDesc("relay_bpf_client_bytes_total",
		"Bytes of closed client connections counted in the kernel at close: upstream = received from clients, downstream = sent to clients and acknowledged.", []string{"port", "direction"}, nil)
)

// Collector returns a Prometheus collector that reads the counters from
// the BPF maps at scrape time.
func (s *Steering) Collector() prometheus.Collector { return collector{s} }

type collector struct{ s *Steering }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSteered
	ch <- descNoSocket
	ch <- descAssignErr
	ch <- descAccepted
	ch <- descClosed
	ch <- descClientBytes
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	pcs, err := c.s.Counters()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descSteered, err)
		return
	}
	for _, p := range pcs {
		port := strconv.Itoa(int(p.Port))
		ch <- prometheus.MustNewConstMetric(descSteered, prometheus.CounterValue, float64(p.Steered), port)
		ch <- prometheus.MustNewConstMetric(descNoSocket, prometheus.CounterValue, float64(p.NoSocket), port)
		ch <- prometheus.MustNewConstMetric(descAssignErr, prometheus.CounterValue, float64(p.AssignError), port)
	}
	acct, err := ReadAccounting(c.s.pinDir)
	if err != nil {
		return // accounting is optional (no cgroup v2, old kernel)
	}
	for _, a := range acct {
		port := strconv.Itoa(int(a.Port))
		ch <- prometheus.MustNewConstMetric(descAccepted, prometheus.CounterValue, float64(a.Accepted), port)
		ch <- prometheus.MustNewConstMetric(descClosed, prometheus.CounterValue, float64(a.Closed), port)
		ch <- prometheus.MustNewConstMetric(descClientBytes, prometheus.CounterValue, float64(a.BytesIn), port, "upstream")
		ch <- prometheus.MustNewConstMetric(descClientBytes, prometheus.CounterValue, float64(a.BytesOut), port, "downstream")
	}
}
