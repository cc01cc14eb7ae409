package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func init() {
	register("stats", "stats [-c FILE]", cmdStats)
}

// cmdStats prints the relay's counters (scraped from its metrics listener)
// and the BPF counters (read from the pinned maps) as tables.
func cmdStats(e *env, args []string) error {
	cfg, err := configFromArgs(e, "stats", args)
	if err != nil {
		return err
	}
	families, err := scrape(cfg.Listen.Metrics)
	if err != nil {
		fmt.Fprintf(e.stdout, "relay: not reachable at %s (%v); is `relayctl serve` running?\n", cfg.Listen.Metrics, err)
	} else {
		printRelayStats(e.stdout, families)
	}
	printBPFStats(e.stdout, cfg)
	return nil
}

func scrape(addr string) (map[string]*dto.MetricFamily, error) {
	if addr == "" || addr == "off" {
		return nil, fmt.Errorf("listen.metrics is off")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(host, port) + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return 0
}

func printRelayStats(w io.Writer, fams map[string]*dto.MetricFamily) {
	type row struct {
		route, action string
		conns, active float64
	}
	rows := map[string]*row{}
	get := func(route, action string) *row {
		k := route + "\x00" + action
		if rows[k] == nil {
			rows[k] = &row{route: route, action: action}
		}
		return rows[k]
	}
	for _, m := range fams["relay_connections_total"].GetMetric() {
		get(label(m, "route"), label(m, "action")).conns = value(m)
	}
	for _, m := range fams["relay_active_connections"].GetMetric() {
		get(label(m, "route"), label(m, "action")).active = value(m)
	}
	byRoute := map[string][2]float64{}
	for _, m := range fams["relay_bytes_total"].GetMetric() {
		b := byRoute[label(m, "route")]
		if label(m, "direction") == "upstream" {
			b[0] = value(m)
		} else {
			b[1] = value(m)
		}
		byRoute[label(m, "route")] = b
	}
	errsByRoute := map[string]float64{}
	for _, m := range fams["relay_upstream_errors_total"].GetMetric() {
		errsByRoute[label(m, "route")] += value(m)
	}
	keys := make([]string, 0, len(rows))
	for k := range rows {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROUTE\tACTION\tCONNECTIONS\tACTIVE\tBYTES UP\tBYTES DOWN\tUPSTREAM ERRORS")
	for _, k := range keys {
		r := rows[k]
		b := byRoute[r.route]
		up, down := "-", "-"
		if r.action == "passthrough" || r.action == "terminate" {
			up, down = humanBytes(b[0]), humanBytes(b[1])
		}
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%s\t%s\t%.0f\n", r.route, r.action, r.conns, r.active, up, down, errsByRoute[r.route])
	}
	tw.Flush()
	var hello []string
	for _, m := range fams["relay_clienthello_errors_total"].GetMetric() {
		if v := value(m); v > 0 {
			hello = append(hello, fmt.Sprintf("%s=%.0f", label(m, "reason"), v))
		}
	}
	sort.Strings(hello)
	if len(hello) > 0 {
		fmt.Fprintf(w, "clienthello errors: %s\n", strings.Join(hello, " "))
	}
	for _, m := range fams["relay_bpf_attached"].GetMetric() {
		fmt.Fprintf(w, "bpf attached: %v\n", value(m) == 1)
	}
}

func humanBytes(b float64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%.0f B", b)
	}
	div, exp := float64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", b/div, "KMGTPE"[exp])
}
