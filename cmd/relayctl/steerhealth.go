package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/internal/metrics"
)

// defaultSteeringState is where `rules apply --watch` writes its state;
// $RELAY_STEERING_STATE overrides it (tests, several instances). /run is
// root's, but the directory is 0755 and the file 0644: the relay user
// reads it without privilege.
const defaultSteeringState = "/run/relay/steering.json"

// Parts of the steering, the `part` label of relay_steering_*.
const (
	partV4       = "iptables_v4"
	partV6       = "iptables_v6"
	partSkLookup = "sk_lookup"
	partSockmap  = "sockmap"
)

func steeringStatePath(getenv func(string) string) string {
	if p := getenv("RELAY_STEERING_STATE"); p != "" {
		return p
	}
	return defaultSteeringState
}

// steerState is the watcher's state file.
type steerState struct {
	PID      int                   `json:"pid"`
	Updated  time.Time             `json:"updated"`  // last check
	Interval float64               `json:"interval"` // seconds between checks
	Parts    map[string]*partState `json:"parts"`
	Config   string                `json:"config"` // the watcher's config file
	// Reloaded is when the watcher last handled SIGHUP, ReloadError why
	// it refused the new config.
	Reloaded    *time.Time `json:"reloaded,omitempty"`
	ReloadError string     `json:"reload_error,omitempty"`
}

// partState is one part: ok, repaired (at the last check) or failing.
type partState struct {
	State      string     `json:"state"`
	Error      string     `json:"error,omitempty"`       // failing: why
	LastDrift  string     `json:"last_drift,omitempty"`  // what was last found missing
	RepairedAt *time.Time `json:"repaired_at,omitempty"` // last repair
	Repairs    uint64     `json:"repairs"`
}

// writeSteerState replaces path atomically (temp file + rename).
func writeSteerState(path string, st *steerState) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".steering-*")
	if err != nil {
		return fmt.Errorf("write steering state: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("write steering state: %w", err)
	}
	f.Chmod(0o644)
	if err := f.Close(); err != nil {
		return fmt.Errorf("write steering state: %w", err)
	}
	return os.Rename(f.Name(), path)
}

func readSteerState(path string) (*steerState, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var st steerState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	return &st, nil
}

// stale reports why st cannot be trusted any more, or "".
func (st *steerState) stale(now time.Time) string {
	max := 3 * time.Duration(st.Interval*float64(time.Second))
	if max < 6*time.Second {
		max = 6 * time.Second
	}
	if age := now.Sub(st.Updated); age > max {
		return fmt.Sprintf("last checked %s ago (the watcher checks every %gs): is relay-rules.service running?", age.Round(time.Second), st.Interval)
	}
	return ""
}

// loadSteerHealth reads the state file, or says why it is missing or stale.
func loadSteerHealth(path string, now time.Time) (*steerState, string) {
	st, err := readSteerState(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Sprintf("no steering state at %s: nothing watches the steering (run `relayctl rules apply --watch`, as relay-rules.service does)", path)
	case err != nil:
		return nil, err.Error()
	}
	if why := st.stale(now); why != "" {
		return st, "steering state is stale: " + why
	}
	return st, ""
}

var (
	descSteerHealthy = metrics.NewDesc("relay_steering_healthy",
		"1 when the part of the steering (iptables_v4, iptables_v6, sk_lookup, sockmap) is in place as `rules apply --watch` last checked; 0 when failing, or when the watcher's state is missing or stale.",
		metrics.KindGauge, "part")
	descSteerRepairs = metrics.NewDesc("relay_steering_repairs_total",
		"Times `rules apply --watch` found the part drifted and put it back (since the watcher started).",
		metrics.KindCounter, "part")
)

// steerHealth exports the watcher's state file as metrics.
type steerHealth struct {
	path  string
	parts []string // configured, for the zeros when the file is missing
	log   *slog.Logger
	mu    sync.Mutex
	bad   string // the warning last logged; "" when healthy
}

// configuredParts are the parts cfg asks `rules apply` for.
func configuredParts(cfg *config.Config) []string {
	parts := []string{partV4}
	if cfg.Steer.IPv6Enabled() {
		parts = append(parts, partV6)
	}
	if cfg.Steer.BPF != "off" {
		parts = append(parts, partSkLookup)
		if cfg.Splice == "sockmap" {
			parts = append(parts, partSockmap)
		}
	}
	return parts
}

// registerSteeringHealth adds relay_steering_* to reg and checks the
// state once now and then every 30 s, so a missing or stale watcher is
// logged (once) even when nothing scrapes.
func registerSteeringHealth(ctx context.Context, reg *metrics.Registry, cfg *config.Config, getenv func(string) string, log *slog.Logger) {
	h := &steerHealth{path: steeringStatePath(getenv), parts: configuredParts(cfg), log: log}
	if err := reg.Register(h); err != nil {
		log.Error("steering health not exported", "err", err)
		return
	}
	h.load()
	go func() {
		t := time.NewTicker(30 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				h.load()
			}
		}
	}()
}

func (h *steerHealth) load() *steerState {
	st, why := loadSteerHealth(h.path, time.Now())
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case why != "" && h.bad == "":
		h.log.Warn("steering health unknown: relay_steering_healthy is 0", "why", why)
	case why == "" && h.bad != "":
		h.log.Info("steering health known again", "state", h.path)
	}
	h.bad = why
	if why != "" {
		return nil
	}
	return st
}

func (h *steerHealth) Describe() []*metrics.Desc {
	return []*metrics.Desc{descSteerHealthy, descSteerRepairs}
}

func (h *steerHealth) Collect(s *metrics.Sink) error {
	st := h.load()
	if st == nil {
		for _, p := range h.parts {
			s.Add(descSteerHealthy, 0, p)
		}
		return nil
	}
	for _, p := range sortedParts(st) {
		ps := st.Parts[p]
		v := 0.0
		if ps.State != "failing" {
			v = 1
		}
		s.Add(descSteerHealthy, v, p)
		s.Add(descSteerRepairs, float64(ps.Repairs), p)
	}
	return nil
}

func sortedParts(st *steerState) []string {
	var out []string
	for p := range st.Parts {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// printSteerHealth is the steering section of `stats` and `rules show`.
func printSteerHealth(w io.Writer, path string) {
	st, why := loadSteerHealth(path, time.Now())
	if why != "" {
		fmt.Fprintf(w, "steering health: unknown: %s\n", why)
		if st == nil {
			return
		}
	} else {
		fmt.Fprintf(w, "steering health (watcher pid %d, checked %s ago):\n", st.PID, time.Since(st.Updated).Round(time.Second))
	}
	for _, p := range sortedParts(st) {
		ps := st.Parts[p]
		line := "  " + p + ": " + ps.State
		if ps.Error != "" {
			line += ": " + ps.Error
		}
		if ps.Repairs > 0 {
			line += fmt.Sprintf("; %d repairs", ps.Repairs)
			if ps.RepairedAt != nil {
				line += ", last at " + ps.RepairedAt.Format(time.RFC3339)
			}
			if ps.LastDrift != "" {
				line += " (" + ps.LastDrift + ")"
			}
		}
		fmt.Fprintln(w, line)
	}
}
