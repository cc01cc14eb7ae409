// Package acme provides certificates to the relay's terminate routes:
// an internal CA kept in state_dir (InternalCA), certificate/key files
// reloaded on change (FileSource), and, for `tls: acme`, ACME issuance.
// Every source answers GetCertificate from memory; none blocks a TLS
// handshake on the network. acme does not import the relay: its types
// satisfy relay's small interfaces and cmd/relayctl wires them.
//
//	ca, err := acme.OpenInternalCA(filepath.Join(stateDir, "ca"))
//	tlsConf := &tls.Config{GetCertificate: ca.GetCertificate}
package acme
