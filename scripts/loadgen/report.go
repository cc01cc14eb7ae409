package main

import (
	"fmt"
	"os"
	"slices"
	"strings"
)

// markdown renders the run: machine facts, settings, and one table per
// kind of path.
func (r *Report) markdown() string {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "Run of %s. Command: `%s`.\n\n", m["date"], r.Command)
	fmt.Fprintf(&b, "Machine: %s CPUs (%s), %s RAM, Linux %s, Debian %s, %s.\n", m["cpus"], m["cpu"], m["memory"], m["kernel"], m["debian"], m["go"])
	var names []string
	for k := range r.Versions {
		names = append(names, k)
	}
	slices.Sort(names)
	fmt.Fprintf(&b, "Versions:")
	for i, k := range names {
		sep := ";"
		if i == len(names)-1 {
			sep = "."
		}
		fmt.Fprintf(&b, " %s `%s`%s", k, r.Versions[k], sep)
	}
	fmt.Fprintln(&b)
	for k, why := range r.Skipped {
		fmt.Fprintf(&b, "Skipped: %s (%s).\n", k, why)
	}
	s := r.Settings
	fmt.Fprintf(&b, "\nSettings: bulk %s per direction over one TLS connection, median of %d; %d round trips of 64 B; "+
		"new connections and GETs: %d concurrent for %.1f s; %d idle connections; proxies with %d workers/threads (= nproc = the relay's GOMAXPROCS).\n\n",
		size(s.BulkBytes), s.Runs, s.RTTs, s.Concurrency, s.LoadSeconds, s.IdleConns, s.Workers)

	var direct *PathResult
	for _, p := range r.Paths {
		if p.Name == "direct" {
			direct = p
		}
	}
	fmt.Fprintln(&b, "**Passthrough** (TLS end to end; the proxy routes on SNI)")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| path | bulk up Gbit/s (× direct) | bulk down Gbit/s (× direct) | proxy CPU s/GiB | 64 B RTT p50 / p99 µs (p50 added) | new TLS conns/s (× direct) | conn p50 / p99 ms | idle RSS MB | RSS + idle conns MB | KB per idle conn |")
	fmt.Fprintln(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, p := range r.Paths {
		if p.Kind != "passthrough" {
			continue
		}
		if !p.OK {
			fmt.Fprintf(&b, "| %s | FAILED: %s |||||||||\n", p.Name, oneLine(p.Error))
			continue
		}
		added := ""
		if direct != nil && p != direct {
			added = fmt.Sprintf(" (%+.0f)", p.RTT.P50-direct.RTT.P50)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %.0f / %.0f%s | %s | %.1f / %.1f | %s |\n",
			p.Name, withRatio(p.UpGbps, p.RatioUp, "%.2f"), withRatio(p.DownGbps, p.RatioDown, "%.2f"), opt(p.CPUSecPerGiB, "%.2f"),
			p.RTT.P50, p.RTT.P99, added, withRatio(p.Conns.PerSec, p.RatioConns, "%.0f"), p.Conns.P50/1000, p.Conns.P99/1000, mem(p))
	}
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "**Termination** (the proxy ends TLS and forwards plain HTTP/1.1 to the upstream; GET of a 128-byte body over keep-alive connections)")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| path | h1 GETs/s (× direct) | h1 p50 / p99 ms | h2 GETs/s (× direct) | h2 p50 / p99 ms | proxy CPU µs/req h1 / h2 | idle RSS MB | RSS + idle conns MB | KB per idle conn |")
	fmt.Fprintln(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, p := range r.Paths {
		if p.Kind != "terminate" {
			continue
		}
		if !p.OK {
			fmt.Fprintf(&b, "| %s | FAILED: %s ||||||||\n", p.Name, oneLine(p.Error))
			continue
		}
		cpu := "—"
		if p.CPUUsPerReqH1 > 0 {
			cpu = fmt.Sprintf("%.0f / %.0f", p.CPUUsPerReqH1, p.CPUUsPerReqH2)
		}
		fmt.Fprintf(&b, "| %s | %s | %.2f / %.2f | %s | %.2f / %.2f | %s | %s |\n",
			p.Name, withRatio(p.H1.PerSec, p.RatioH1, "%.0f"), p.H1.P50/1000, p.H1.P99/1000,
			withRatio(p.H2.PerSec, p.RatioH2, "%.0f"), p.H2.P50/1000, p.H2.P99/1000, cpu, mem(p))
	}
	fmt.Fprintln(&b)
	for _, p := range r.Paths {
		if !p.OK || p.IdleRSSKB == 0 {
			continue
		}
		n := float64(r.Settings.IdleConns)
		fmt.Fprintf(&b, "- %s: %.1f KB per idle connection 0.5 s after the last opened (the table: 5.5 s); anonymous memory (RssAnon) idle %.1f MB, %.1f KB per idle connection", p.Name,
			p.KBPerIdleConnAtOpen, float64(p.IdleAnonKB)/1024, float64(p.LoadedAnonKB-p.IdleAnonKB)/n)
		if p.GoIdle != nil && p.GoLoaded != nil {
			d := func(k string) float64 { return (p.GoLoaded[k] - p.GoIdle[k]) / n }
			free := func(m map[string]float64) float64 {
				return m["go_memstats_heap_idle_bytes"] - m["go_memstats_heap_released_bytes"]
			}
			fmt.Fprintf(&b, "; Go runtime per idle connection: %.1f KB stacks, %.1f KB heap in use, %.1f KB free heap not yet returned to the OS",
				d("go_memstats_stack_inuse_bytes")/1024, d("go_memstats_heap_inuse_bytes")/1024, (free(p.GoLoaded)-free(p.GoIdle))/n/1024)
		}
		fmt.Fprintln(&b, ".")
	}
	return b.String()
}

// oneLine shortens an error for a table cell: its last non-empty line
// (a proxy's own complaint comes last).
func oneLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.ReplaceAll(strings.TrimSpace(lines[len(lines)-1]), "|", "/")
}

func size(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d B", n)
}

func withRatio(v, x float64, f string) string {
	if x == 0 {
		return fmt.Sprintf(f, v)
	}
	return fmt.Sprintf(f+" (%.2f×)", v, x)
}

func opt(v float64, f string) string {
	if v == 0 {
		return "—"
	}
	return fmt.Sprintf(f, v)
}

func mem(p *PathResult) string {
	if p.IdleRSSKB == 0 {
		return "— | — | —"
	}
	return fmt.Sprintf("%.1f | %.1f | %.1f", float64(p.IdleRSSKB)/1024, float64(p.LoadedRSSKB)/1024, p.KBPerIdleConn)
}

// writeBenchDoc replaces the generated section of the markdown file,
// keeping the hand-written notes around it.
func writeBenchDoc(path, table string) error {
	const begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
	old, _ := os.ReadFile(path)
	s := string(old)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		s = "# Benchmarks\n\n" + begin + "\n" + end + "\n"
		i, j = strings.Index(s, begin), strings.Index(s, end)
	}
	s = s[:i+len(begin)] + "\n" + table + s[j:]
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
