package main

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/internal/metrics"
)

func gatherSteering(t *testing.T, reg *metrics.Registry) map[string]float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		for _, s := range f.Series {
			out[f.Name+"/"+s.Label("part")] = s.Value
		}
	}
	return out
}

// TestSteerHealthCollector: the relay exports the watcher's state file;
// missing or stale means 0 and one warning (not one per scrape).
func TestSteerHealthCollector(t *testing.T) {
	path := filepath.Join(t.TempDir(), "r22-steering.json")
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	cfg := &config.Config{}
	cfg.Steer.BPF = "on"
	reg := metrics.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	registerSteeringHealth(ctx, reg, cfg, func(k string) string {
		if k == "RELAY_STEERING_STATE" {
			return path
		}
		return ""
	}, log)

	got := gatherSteering(t, reg)
	if got["relay_steering_healthy/iptables_v4"] != 0 || got["relay_steering_healthy/sk_lookup"] != 0 || len(got) < 2 {
		t.Errorf("missing file: %v, want zeros for the configured parts", got)
	}
	gatherSteering(t, reg)
	if n := strings.Count(logs.String(), "steering health unknown"); n != 1 {
		t.Errorf("%d warnings for a missing file, want 1:\n%s", n, logs.String())
	}

	now := time.Now().UTC()
	st := &steerState{PID: 1, Updated: now, Interval: 2, Parts: map[string]*partState{
		partV4:       {State: "repaired", Repairs: 3, RepairedAt: &now},
		partSkLookup: {State: "failing", Error: "pins gone"},
	}}
	if err := writeSteerState(path, st); err != nil {
		t.Fatal(err)
	}
	got = gatherSteering(t, reg)
	if got["relay_steering_healthy/iptables_v4"] != 1 || got["relay_steering_repairs_total/iptables_v4"] != 3 || got["relay_steering_healthy/sk_lookup"] != 0 {
		t.Errorf("fresh state: %v", got)
	}
	if !strings.Contains(logs.String(), "steering health known again") {
		t.Errorf("no recovery log:\n%s", logs.String())
	}

	st.Updated = now.Add(-time.Minute)
	writeSteerState(path, st)
	if got = gatherSteering(t, reg); got["relay_steering_healthy/iptables_v4"] != 0 {
		t.Errorf("stale state: %v, want 0", got)
	}
	if !strings.Contains(logs.String(), "steering state is stale") {
		t.Errorf("no stale warning:\n%s", logs.String())
	}
	var out bytes.Buffer
	printSteerHealth(&out, path)
	if !strings.Contains(out.String(), "unknown: steering state is stale") || !strings.Contains(out.String(), "iptables_v4: repaired; 3 repairs") {
		t.Errorf("printSteerHealth:\n%s", out.String())
	}
}
