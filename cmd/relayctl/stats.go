package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/relay-gw/relay/internal/metrics"
)

func init() {
	register("stats", "stats [-c FILE] [--json]", cmdStats)
}

// cmdStats prints the relay's counters (scraped from its metrics listener)
// and the BPF counters (read from the pinned maps) as tables; --json
// prints the relay's /status document as it is.
func cmdStats(e *env, args []string) error {
	fs, cfgPath := newConfigFlagSet(e, "stats")
	asJSON := fs.Bool("json", false, "print the relay's /status document (docs/STATUS.md)")
	if _, err := parseInterspersed(fs, args); err != nil {
		return err
	}
	cfg, err := loadConfig(e, *cfgPath)
	if err != nil {
		return err
	}
	if *asJSON {
		b, err := fetchStatus(cfg.Listen.Metrics)
		if err != nil {
			return fmt.Errorf("relay not reachable at %s: %w; is `relayctl serve` running?", cfg.Listen.Metrics, err)
		}
		var out bytes.Buffer
		if err := json.Indent(&out, b, "", "  "); err != nil {
			return fmt.Errorf("relay at %s sent bad /status JSON: %w", cfg.Listen.Metrics, err)
		}
		_, err = e.stdout.Write(out.Bytes())
		return err
	}
	families, err := scrape(cfg.Listen.Metrics)
	if err != nil {
		fmt.Fprintf(e.stdout, "relay: not reachable at %s (%v); is `relayctl serve` running?\n", cfg.Listen.Metrics, err)
	} else {
		printRelayStats(e.stdout, families)
	}
	printBPFStats(e.stdout, cfg)
	printSteerHealth(e.stdout, steeringStatePath(e.getenv))
	return nil
}

// metricsURL is the URL of path on the metrics listener at addr.
func metricsURL(addr, path string) (string, error) {
	if addr == "" || addr == "off" {
		return "", fmt.Errorf("listen.metrics is off")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + path, nil
}

func fetchStatus(addr string) ([]byte, error) {
	body, err := getMetricsPath(addr, "/status")
	if err != nil {
		return nil, err
	}
	defer body.Close()
	return io.ReadAll(body)
}

// getMetricsPath GETs path from the metrics listener; the caller closes
// the body.
func getMetricsPath(addr, path string) (io.ReadCloser, error) {
	u, err := metricsURL(addr, path)
	if err != nil {
		return nil, err
	}
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(u)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return resp.Body, nil
}

func scrape(addr string) (map[string][]metrics.Series, error) {
	body, err := getMetricsPath(addr, "/metrics")
	if err != nil {
		return nil, err
	}
	defer body.Close()
	fams, err := metrics.Parse(body)
	if err != nil {
		return nil, err
	}
	series := map[string][]metrics.Series{}
	for _, f := range fams {
		series[f.Name] = f.Series
	}
	return series, nil
}

func printRelayStats(w io.Writer, fams map[string][]metrics.Series) {
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
	for _, m := range fams["relay_connections_total"] {
		get(m.Label("route"), m.Label("action")).conns = m.Value
	}
	for _, m := range fams["relay_active_connections"] {
		get(m.Label("route"), m.Label("action")).active = m.Value
	}
	byRoute := map[string][2]float64{}
	for _, m := range fams["relay_bytes_total"] {
		b := byRoute[m.Label("route")]
		if m.Label("direction") == "upstream" {
			b[0] = m.Value
		} else {
			b[1] = m.Value
		}
		byRoute[m.Label("route")] = b
	}
	errsByRoute := map[string]float64{}
	for _, m := range fams["relay_upstream_errors_total"] {
		errsByRoute[m.Label("route")] += m.Value
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
	for _, m := range fams["relay_clienthello_errors_total"] {
		if v := m.Value; v > 0 {
			hello = append(hello, fmt.Sprintf("%s=%.0f", m.Label("reason"), v))
		}
	}
	sort.Strings(hello)
	if len(hello) > 0 {
		fmt.Fprintf(w, "clienthello errors: %s\n", strings.Join(hello, " "))
	}
	printQUICStats(w, fams)
	for _, m := range fams["relay_bpf_attached"] {
		fmt.Fprintf(w, "bpf attached: %v\n", m.Value == 1)
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

// printQUICStats prints the QUIC flows (UDP), when there were any.
func printQUICStats(w io.Writer, fams map[string][]metrics.Series) {
	type row struct{ conns, active float64 }
	rows := map[[2]string]*row{}
	get := func(m metrics.Series) *row {
		k := [2]string{m.Label("route"), m.Label("action")}
		if rows[k] == nil {
			rows[k] = &row{}
		}
		return rows[k]
	}
	for _, m := range fams["relay_quic_connections_total"] {
		get(m).conns = m.Value
	}
	for _, m := range fams["relay_quic_active_flows"] {
		get(m).active = m.Value
	}
	bytes := map[string][2]float64{}
	for _, m := range fams["relay_quic_bytes_total"] {
		b := bytes[m.Label("route")]
		if m.Label("direction") == "upstream" {
			b[0] = m.Value
		} else {
			b[1] = m.Value
		}
		bytes[m.Label("route")] = b
	}
	if len(rows) > 0 {
		keys := make([][2]string, 0, len(rows))
		for k := range rows {
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool { return keys[i][0]+"\x00"+keys[i][1] < keys[j][0]+"\x00"+keys[j][1] })
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "QUIC ROUTE\tACTION\tFLOWS\tACTIVE\tBYTES UP\tBYTES DOWN")
		for _, k := range keys {
			r := rows[k]
			up, down := "-", "-"
			if k[1] == "passthrough" {
				up, down = humanBytes(bytes[k[0]][0]), humanBytes(bytes[k[0]][1])
			}
			fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%s\t%s\n", k[0], k[1], r.conns, r.active, up, down)
		}
		tw.Flush()
	}
	var errs []string
	for _, m := range fams["relay_quic_initial_errors_total"] {
		if m.Value > 0 {
			errs = append(errs, fmt.Sprintf("%s=%.0f", m.Label("reason"), m.Value))
		}
	}
	sort.Strings(errs)
	if len(errs) > 0 {
		fmt.Fprintf(w, "quic initial errors: %s\n", strings.Join(errs, " "))
	}
}
