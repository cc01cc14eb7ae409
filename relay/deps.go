package relay

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
)

// CertSource returns the certificate for a TLS handshake on a terminate
// route. It must answer from memory and never block on the network
// (acme/ and the internal CA satisfy it).
type CertSource interface {
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
}

// HTTPChallenges answers ACME HTTP-01 requests on the http port.
type HTTPChallenges interface {
	// HTTP01 returns the key authorization for token at host, or false.
	HTTP01(host, token string) (keyAuth string, ok bool)
}

// ALPNChallenges answers ACME TLS-ALPN-01 handshakes (ALPN "acme-tls/1").
type ALPNChallenges interface {
	// TLSALPN01 returns the challenge certificate for serverName, or false.
	TLSALPN01(serverName string) (*tls.Certificate, bool)
}

// OriginalDst returns the destination a client dialed before a NAT REDIRECT
// rewrote it. ok is false when the connection was not redirected.
type OriginalDst func(c *net.TCPConn) (dst netip.AddrPort, ok bool, err error)

// Splicer moves bytes both ways between two established TCP connections
// until both directions have ended, propagating half-close. It returns the
// bytes moved client → upstream and upstream → client.
type Splicer interface {
	Splice(ctx context.Context, client, upstream *net.TCPConn) (up, down int64, err error)
}
