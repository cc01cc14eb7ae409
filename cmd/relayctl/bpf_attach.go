package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"syscall"

	"github.com/relay-gw/relay/bpf"
	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/relay"
)

// attachBPF registers the relay's listeners with the pinned BPF steering
// maps when `rules apply` loaded them; without pins the relay runs in
// userspace mode and says so.
func attachBPF(srv *relay.Server, cfg *config.Config, log *slog.Logger) *bpf.Steering {
	srv.SetBPFAttached(false)
	s, err := bpf.Open(cfg.Steer.PinDir)
	if errors.Is(err, bpf.ErrNotLoaded) {
		log.Info("BPF steering not loaded: userspace mode (iptables REDIRECT, splice(2), relay counters)", "pin_dir", cfg.Steer.PinDir)
		return nil
	}
	if err != nil {
		log.Warn("BPF steering pinned but not usable by this user: userspace mode", "err", err)
		return nil
	}
	for _, l := range []struct {
		slot uint32
		ln   any
	}{{bpf.SlotHTTPS, srv.HTTPSListener()}, {bpf.SlotHTTP, srv.HTTPListener()}} {
		sc, ok := l.ln.(syscall.Conn)
		if !ok || l.ln == nil {
			continue
		}
		if err := s.Register(l.slot, sc); err != nil {
			log.Warn("register listener with BPF steering: userspace mode", "err", err)
			s.Close()
			return nil
		}
	}
	srv.Registry().MustRegister(s.Collector())
	srv.SetBPFAttached(true)
	log.Info("BPF steering attached: connections to this host's ports are handed to the relay by sk_lookup", "pin_dir", cfg.Steer.PinDir)
	return s
}

// printBPFStats prints the counters of the pinned BPF maps, if any.
func printBPFStats(w io.Writer, cfg *config.Config) {
	s, err := bpf.Open(cfg.Steer.PinDir)
	if err != nil {
		if errors.Is(err, bpf.ErrNotLoaded) {
			fmt.Fprintln(w, "bpf: steering not loaded (sudo relayctl rules apply with steer.bpf: auto|on)")
		} else {
			fmt.Fprintf(w, "bpf: %v\n", err)
		}
		return
	}
	defer s.Close()
	pcs, err := s.Counters()
	if err != nil {
		fmt.Fprintf(w, "bpf: %v\n", err)
		return
	}
	fmt.Fprintln(w, "bpf sk_lookup steering:")
	for _, p := range pcs {
		fmt.Fprintf(w, "  port %d: steered %d, no socket %d, assign errors %d\n", p.Port, p.Steered, p.NoSocket, p.AssignError)
	}
}
