// Package bpf holds relay's eBPF programs (C sources beside their
// committed bpf2go output for little- and big-endian targets) and typed
// handles on them. It knows nothing of TLS or config files.
//
// Steering: an sk_lookup program attached to the network namespace gives
// TCP connections addressed to this host on steered ports (443, 80) to the
// relay's listening sockets, registered in a SOCKMAP. When the relay is
// down its sockets leave the map and the normal lookup runs (fail-open).
//
// Root side (relayctl rules):
//
//	st, err := bpf.Apply(bpf.Options{Ports: []bpf.Port{{443, bpf.SlotHTTPS}, {80, bpf.SlotHTTP}}, OwnerUID: uid})
//	err = bpf.Delete(bpf.DefaultPinDir)
//
// Relay side (unprivileged; pin permissions suffice):
//
//	s, err := bpf.Open(bpf.DefaultPinDir)
//	err = s.Register(bpf.SlotHTTPS, httpsListener.(*net.TCPListener))
//	registry.MustRegister(s.Collector())
package bpf
