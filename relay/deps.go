package relay

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"time"
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

// Splicer moves bytes in the kernel both ways between two established TCP
// connections (the BPF sockmap splice, `splice: sockmap`): it writes pre
// (the peeked ClientHello) to upstream and hands the pair over, returning
// at once; done is called once, later, when both directions have ended
// (half-close propagated), the pair failed, neither side received data for
// idle, or ctx was canceled, with the bytes moved client → upstream (pre
// not included) and upstream → client. An error wrapping
// errors.ErrUnsupported means it did nothing and the relay uses splice(2)
// for this connection; any other error means the pair is unusable (done
// is not called). On success the Splicer owns client and upstream and
// closes them (the relay keeps no reference). Without a Splicer the relay
// uses splice(2).
type Splicer interface {
	Splice(ctx context.Context, client, upstream *net.TCPConn, pre []byte, idle time.Duration, done func(up, down int64, err error)) error
	// SplicedBytes are the bytes moved in the kernel so far, all connections.
	SplicedBytes() (up, down uint64, err error)
}
