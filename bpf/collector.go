//go:build linux

package bpf

import (
	"fmt"
	"strconv"

	"github.com/relay-gw/relay/internal/metrics"
)

var (
	descSteered = metrics.NewDesc("relay_bpf_steered_connections_total",
		"Connections the sk_lookup program gave to the relay, by destination port (read from the BPF map).",
		metrics.KindCounter, "port")
	descNoSocket = metrics.NewDesc("relay_bpf_steer_no_socket_total",
		"Connections on a steered port while no relay listener was registered: passed to the normal lookup (fail-open).",
		metrics.KindCounter, "port")
	descAssignErr = metrics.NewDesc("relay_bpf_steer_assign_errors_total",
		"Connections the program could not assign to the relay's listener (e.g. IPv6 to an IPv4-only socket): passed on.",
		metrics.KindCounter, "port")
	descAccepted = metrics.NewDesc("relay_bpf_accepted_connections_total",
		"TCP connections accepted on the relay's ports in its network namespace, counted in the kernel (sock_ops), by local port.",
		metrics.KindCounter, "port")
	descClosed = metrics.NewDesc("relay_bpf_closed_connections_total",
		"Of those, connections closed (counted by the kernel at close, also when the relay died first).",
		metrics.KindCounter, "port")
	descClientBytes = metrics.NewDesc("relay_bpf_client_bytes_total",
		"Bytes of closed client connections counted in the kernel at close: upstream = received from clients, downstream = sent to clients and acknowledged.",
		metrics.KindCounter, "port", "direction")
)

// Collector returns a metrics collector that reads the counters from the
// BPF maps at scrape time.
func (s *Steering) Collector() metrics.Collector { return collector{s} }

type collector struct{ s *Steering }

func (c collector) Describe() []*metrics.Desc {
	return []*metrics.Desc{descSteered, descNoSocket, descAssignErr, descAccepted, descClosed, descClientBytes}
}

// Collect fails the whole scrape (HTTP 500) when the steering map cannot
// be read, rather than silently dropping the BPF series.
func (c collector) Collect(s *metrics.Sink) error {
	pcs, err := c.s.Counters()
	if err != nil {
		return fmt.Errorf("read BPF steering counters: %w", err)
	}
	for _, p := range pcs {
		port := strconv.Itoa(int(p.Port))
		s.Add(descSteered, float64(p.Steered), port)
		s.Add(descNoSocket, float64(p.NoSocket), port)
		s.Add(descAssignErr, float64(p.AssignError), port)
	}
	acct, err := ReadAccounting(c.s.pinDir)
	if err != nil {
		return nil // accounting is optional (no cgroup v2, old kernel)
	}
	for _, a := range acct {
		port := strconv.Itoa(int(a.Port))
		s.Add(descAccepted, float64(a.Accepted), port)
		s.Add(descClosed, float64(a.Closed), port)
		s.Add(descClientBytes, float64(a.BytesIn), port, "upstream")
		s.Add(descClientBytes, float64(a.BytesOut), port, "downstream")
	}
	return nil
}
