// Package bpf holds relay's eBPF programs (C sources beside their
// committed bpf2go output for little- and big-endian targets) and typed
// handles on them. It knows nothing of TLS or config files.
//
// Steering (steer.c): an sk_lookup program attached to the network
// namespace gives TCP connections addressed to this host on steered ports
// (443, 80) to the relay's listening sockets, registered in a SOCKMAP.
// When the relay is down its sockets leave the map and the normal lookup
// runs (fail-open).
//
// Sockmap splice (splice.c, opt-in): a SOCKHASH stream verdict moves the
// bytes of a relayed connection pair in the kernel, bounded to 2 MiB in
// flight per direction; the relay copies only what the verdict passes
// under pressure, and one epoll poller watches every pair.
//
// Accounting (account.c): a sock_ops program on the cgroup v2 root counts
// the connections accepted on the relay's ports in its network namespace
// and, at close, the bytes they carried.
//
// Root side (relayctl rules):
//
//	st, err := bpf.Apply(bpf.Options{Ports: []bpf.Port{{443, bpf.SlotHTTPS}, {80, bpf.SlotHTTP}},
//		OwnerUID: uid, Splice: true, AcctPorts: []uint16{443, 80, 8443, 8080}})
//	err = bpf.Delete(bpf.DefaultPinDir)
//
// Relay side (unprivileged; pin permissions suffice):
//
//	s, err := bpf.Open(bpf.DefaultPinDir)
//	err = s.Register(bpf.SlotHTTPS, httpsListener.(*net.TCPListener))
//	registry.MustRegister(s.Collector())
//	sp, err := bpf.OpenSplicer(bpf.DefaultPinDir)
//	err = sp.Splice(ctx, client, upstream, hello, idle, func(up, down int64, err error) { ... })
package bpf
