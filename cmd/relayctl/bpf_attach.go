package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"syscall"
	"time"

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
	if err := srv.Registry().Register(s.Collector()); err != nil {
		log.Error("BPF counters not exported", "err", err)
	}
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
	if acct, err := bpf.ReadAccounting(cfg.Steer.PinDir); err == nil {
		fmt.Fprintln(w, "bpf kernel connection accounting (sock_ops, every close counted):")
		for _, a := range acct {
			fmt.Fprintf(w, "  port %d: accepted %d, closed %d, bytes from clients %d, to clients %d\n", a.Port, a.Accepted, a.Closed, a.BytesIn, a.BytesOut)
		}
	}
	if up, down, err := bpf.ReadSplicedBytes(cfg.Steer.PinDir); err == nil {
		fmt.Fprintf(w, "bpf sockmap splice: %d bytes client->upstream, %d upstream->client moved in the kernel\n", up, down)
	} else if !errors.Is(err, bpf.ErrSpliceNotLoaded) {
		fmt.Fprintf(w, "bpf sockmap splice: %v\n", err)
	}
}

// kernelSplicer adapts the pinned sockmap splice to the relay.
type kernelSplicer struct{ *bpf.Splicer }

func (k kernelSplicer) Splice(ctx context.Context, client, upstream *net.TCPConn, pre []byte, idle time.Duration, done func(up, down int64, err error)) error {
	return k.Splicer.Splice(ctx, client, upstream, pre, idle, func(up, down int64, err error) {
		if errors.Is(err, bpf.ErrIdle) {
			err = relay.ErrIdle
		}
		done(up, down, err)
	})
}

// openSplicer opens the sockmap splice that `rules apply` pinned. It is
// opened whenever present, so a reload to `splice: sockmap` can use it;
// the relay consults the config per connection.
func openSplicer(cfg *config.Config, log *slog.Logger) relay.Splicer {
	s, err := bpf.OpenSplicer(cfg.Steer.PinDir)
	switch {
	case err == nil:
		if cfg.Splice == "sockmap" {
			log.Info("splice: sockmap: passthrough bytes move in the kernel (BPF sockmap), at most 2 MiB in flight per direction", "pin_dir", cfg.Steer.PinDir)
		}
		return kernelSplicer{s}
	case cfg.Splice != "sockmap":
		return nil
	case errors.Is(err, bpf.ErrSpliceNotLoaded):
		log.Warn("splice: sockmap, but the sockmap splice is not loaded: using splice(2); run `sudo relayctl rules apply` (steer.bpf: auto or on)", "pin_dir", cfg.Steer.PinDir)
	default:
		log.Warn("splice: sockmap unusable, using splice(2)", "err", err)
	}
	return nil
}
