package relay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"
)

// ClientHello is what routing needs from a TLS ClientHello, plus the exact
// bytes read so they can be replayed to the upstream.
type ClientHello struct {
	ServerName        string   // SNI host_name, lowercased, trailing dot removed; "" when absent
	ALPN              []string // offered protocols, in client order
	SupportedVersions []uint16 // supported_versions extension, else {legacy_version}
	ECH               bool     // encrypted_client_hello present: we route on the outer (public) name
	Raw               []byte   // every byte read from the connection, in order
}

// Errors of ReadClientHello; errors.Is works on what it returns.
var (
	ErrHelloTimeout   = errors.New("clienthello: timed out before the whole hello arrived")
	ErrNotTLS         = errors.New("clienthello: not a TLS handshake (plain HTTP on the TLS port, SSLv2, or another protocol)")
	ErrHelloTooLarge  = errors.New("clienthello: larger than limits.max_hello_bytes")
	ErrHelloMalformed = errors.New("clienthello: malformed")
	ErrHelloEOF       = errors.New("clienthello: client closed the connection before sending a whole hello")
)

const (
	recordHeaderLen     = 5
	recordTypeHandshake = 22
	handshakeClientHelo = 1
	maxRecordLen        = 1<<14 + 2048 // TLSCiphertext bound; plaintext hellos are ≤ 2^14
)

// ReadClientHello reads TLS records from c until one whole ClientHello
// handshake message has arrived, across TCP segments and across several
// handshake records, never reading past the record that completes it. It
// sets a read deadline of now+timeout and clears it before returning.
func ReadClientHello(c net.Conn, timeout time.Duration, maxBytes int) (*ClientHello, error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, fmt.Errorf("clienthello: set deadline: %w", err)
	}
	defer c.SetReadDeadline(time.Time{})
	raw, err := readHelloRecords(c, maxBytes)
	if err != nil {
		return nil, err
	}
	return ParseClientHello(raw)
}

func readErr(err error, got int) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("%w (after %d bytes)", ErrHelloTimeout, got)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w (after %d bytes)", ErrHelloEOF, got)
	}
	return fmt.Errorf("clienthello: read: %w", err)
}

// readHelloRecords reads exactly the records holding the first handshake
// message.
func readHelloRecords(r io.Reader, maxBytes int) ([]byte, error) {
	raw := make([]byte, 0, 2048)
	msgLen := -1 // handshake message length incl. its 4-byte header, once known
	hs := 0      // handshake bytes collected so far
	var hsHdr [4]byte
	for {
		start := len(raw)
		raw = append(raw, make([]byte, recordHeaderLen)...)
		if _, err := io.ReadFull(r, raw[start:]); err != nil {
			return nil, readErr(err, start)
		}
		h := raw[start:]
		if start == 0 {
			if h[0] != recordTypeHandshake {
				return nil, ErrNotTLS
			}
			if h[1] != 3 {
				return nil, fmt.Errorf("%w (record version %d.%d)", ErrNotTLS, h[1], h[2])
			}
		} else if h[0] != recordTypeHandshake || h[1] != 3 {
			return nil, fmt.Errorf("%w: record of type %d inside the hello", ErrHelloMalformed, h[0])
		}
		n := int(binary.BigEndian.Uint16(h[3:5]))
		if n == 0 || n > maxRecordLen {
			return nil, fmt.Errorf("%w: record length %d", ErrHelloMalformed, n)
		}
		if len(raw)+n > maxBytes+recordHeaderLen {
			return nil, fmt.Errorf("%w (%d bytes read, record of %d more)", ErrHelloTooLarge, len(raw), n)
		}
		body := len(raw)
		raw = append(raw, make([]byte, n)...)
		if _, err := io.ReadFull(r, raw[body:]); err != nil {
			return nil, readErr(err, body)
		}
		for _, b := range raw[body:] {
			if hs < 4 {
				hsHdr[hs] = b
			}
			hs++
			if hs == 4 {
				if hsHdr[0] != handshakeClientHelo {
					return nil, fmt.Errorf("%w: first handshake message is type %d, not ClientHello", ErrHelloMalformed, hsHdr[0])
				}
				msgLen = 4 + (int(hsHdr[1])<<16 | int(hsHdr[2])<<8 | int(hsHdr[3]))
				if msgLen > maxBytes {
					return nil, fmt.Errorf("%w (hello of %d bytes)", ErrHelloTooLarge, msgLen)
				}
			}
		}
		if msgLen >= 0 && hs >= msgLen {
			return raw, nil
		}
	}
}

// ParseClientHello parses TLS records (as read from the wire) holding a
// ClientHello. Extra records after the hello are ignored.
func ParseClientHello(raw []byte) (*ClientHello, error) {
	// Reassemble the handshake message from its records (no copy when,
	// as usual, one record holds it all).
	var msg []byte
	records := 0
	for p := raw; len(p) > 0; {
		if len(p) < recordHeaderLen {
			return nil, fmt.Errorf("%w: truncated record header", ErrHelloMalformed)
		}
		if p[0] != recordTypeHandshake {
			if len(msg) == 0 {
				return nil, ErrNotTLS
			}
			break
		}
		n := int(binary.BigEndian.Uint16(p[3:5]))
		if len(p) < recordHeaderLen+n {
			return nil, fmt.Errorf("%w: truncated record", ErrHelloMalformed)
		}
		if records == 0 {
			msg = p[recordHeaderLen : recordHeaderLen+n : recordHeaderLen+n]
		} else {
			msg = append(msg, p[recordHeaderLen:recordHeaderLen+n]...)
		}
		records++
		p = p[recordHeaderLen+n:]
		if len(msg) >= 4 && len(msg) >= 4+(int(msg[1])<<16|int(msg[2])<<8|int(msg[3])) {
			break
		}
	}
	h := &ClientHello{Raw: raw}
	if err := h.parseMessage(msg); err != nil {
		return nil, err
	}
	return h, nil
}

// parseMessage parses a ClientHello handshake message (4-byte header and
// body), as reassembled from TLS records or from QUIC CRYPTO frames.
func (h *ClientHello) parseMessage(msg []byte) error {
	if len(msg) < 4 || msg[0] != handshakeClientHelo {
		return fmt.Errorf("%w: no ClientHello message", ErrHelloMalformed)
	}
	n := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
	if len(msg) < 4+n {
		return fmt.Errorf("%w: truncated ClientHello", ErrHelloMalformed)
	}
	return h.parseBody(msg[4 : 4+n])
}

// reader is a bounds-checked cursor; every read fails once it has failed.
type reader struct {
	b  []byte
	ok bool
}

func (r *reader) bytes(n int) []byte {
	if !r.ok || n < 0 || len(r.b) < n {
		r.ok = false
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() int {
	b := r.bytes(1)
	if b == nil {
		return 0
	}
	return int(b[0])
}

func (r *reader) u16() int {
	b := r.bytes(2)
	if b == nil {
		return 0
	}
	return int(binary.BigEndian.Uint16(b))
}

func (r *reader) vec8() reader  { return reader{b: r.bytes(r.u8()), ok: r.ok} }
func (r *reader) vec16() reader { return reader{b: r.bytes(r.u16()), ok: r.ok} }

// TLS extension code points we read.
const (
	extServerName        = 0
	extALPN              = 16
	extSupportedVersions = 43
	extECH               = 0xfe0d
)

func malformed(what string) error { return fmt.Errorf("%w: %s", ErrHelloMalformed, what) }

func (h *ClientHello) parseBody(body []byte) error {
	r := &reader{b: body, ok: true}
	legacy := r.u16()
	r.bytes(32) // random
	r.vec8()    // legacy_session_id
	r.vec16()   // cipher_suites
	r.vec8()    // legacy_compression_methods
	if !r.ok {
		return malformed("truncated fixed fields")
	}
	if legacy>>8 != 3 {
		return malformed(fmt.Sprintf("legacy version %#04x", legacy))
	}
	h.SupportedVersions = []uint16{uint16(legacy)}
	if len(r.b) == 0 {
		return nil // no extensions (SSL 3.0 / TLS 1.0 clients)
	}
	exts := r.vec16()
	if !r.ok || len(r.b) != 0 {
		return malformed("extensions length")
	}
	var seenBuf [32]int
	seen := seenBuf[:0] // few extensions: a slice beats a map and stays on the stack
	for len(exts.b) > 0 {
		typ := exts.u16()
		data := exts.vec16()
		if !exts.ok {
			return malformed("truncated extension")
		}
		if slices.Contains(seen, typ) {
			return malformed(fmt.Sprintf("duplicate extension %d", typ))
		}
		seen = append(seen, typ)
		switch typ {
		case extServerName:
			list := data.vec16()
			for list.ok && len(list.b) > 0 {
				kind := list.u8()
				name := list.vec16()
				if !list.ok {
					break
				}
				if kind == 0 && h.ServerName == "" {
					s, err := hostName(name.b)
					if err != nil {
						return err
					}
					h.ServerName = s
				}
			}
			if !list.ok || len(data.b) != 0 {
				return malformed("server_name extension")
			}
		case extALPN:
			list := data.vec16()
			for list.ok && len(list.b) > 0 {
				p := list.vec8()
				if !list.ok || len(p.b) == 0 {
					return malformed("empty ALPN protocol")
				}
				h.ALPN = append(h.ALPN, string(p.b))
			}
			if !list.ok || len(data.b) != 0 {
				return malformed("ALPN extension")
			}
		case extSupportedVersions:
			list := data.vec8()
			if !list.ok || len(list.b)%2 != 0 || len(data.b) != 0 {
				return malformed("supported_versions extension")
			}
			h.SupportedVersions = h.SupportedVersions[:0]
			for len(list.b) > 0 {
				h.SupportedVersions = append(h.SupportedVersions, uint16(list.u16()))
			}
		case extECH:
			h.ECH = true
		}
	}
	return nil
}

// hostName validates an SNI host_name: LDH labels plus '_' (seen in the
// wild), no IP literals per RFC 6066 but tolerated. Anything that could
// confuse a log line or a route lookup is malformed.
func hostName(b []byte) (string, error) {
	if len(b) == 0 || len(b) > 255 {
		return "", malformed("server name length")
	}
	for _, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.', c == '_', c == '*', c == ':':
		default:
			return "", malformed(fmt.Sprintf("server name byte %#02x", c))
		}
	}
	return normalizeName(string(b)), nil
}

// HelloErrorReason maps an error from ReadClientHello to the reason label
// of relay_clienthello_errors_total.
func HelloErrorReason(err error) string {
	switch {
	case errors.Is(err, ErrHelloTimeout):
		return "timeout"
	case errors.Is(err, ErrNotTLS):
		return "not_tls"
	case errors.Is(err, ErrHelloTooLarge):
		return "too_large"
	case errors.Is(err, ErrHelloMalformed):
		return "malformed"
	case errors.Is(err, ErrHelloEOF):
		return "eof"
	default:
		return "io"
	}
}
