// Package relay is the data path of relay: it accepts TCP on the https
// port, reads the TLS ClientHello without consuming it (ReadClientHello),
// routes by server name (and ALPN), and per route passes the bytes through
// to an upstream (splice(2) by default), terminates TLS and reverse-proxies,
// or rejects. First bytes that are not TLS may select a protocol route
// (ssh, openvpn, http, or a silent client), passed through as well. It
// also serves the http port (ACME HTTP-01, 308 to https), Prometheus
// metrics, and the access log (written off the data path).
//
// relay knows nothing of iptables, BPF loading or ACME clients: those reach
// it as the small interfaces in deps.go (CertSource, HTTPChallenges,
// ALPNChallenges, OriginalDst, Splicer), wired by cmd/relayctl.
//
// Typical use:
//
//	srv, err := relay.New(relay.Options{Config: cfg, Certs: certsFor, OriginalDst: relay.OriginalDst})
//	if err != nil { ... }
//	go watchReload(srv)          // srv.Reload(newCfg) swaps routes atomically
//	err = srv.Serve(ctx)         // returns after draining when ctx is done
package relay
