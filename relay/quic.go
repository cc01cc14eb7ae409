package relay

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/crypto/hkdf"
)

// QUIC Initial packets (RFC 9000 §17.2.2) are encrypted with keys anyone
// can derive from the Destination Connection ID (RFC 9001 §5.2), so a
// router can read the TLS ClientHello they carry without being an
// endpoint. quic-go keeps its Initial AEAD internal; this is the part of
// QUIC no library exports: keys, header protection, the few frames an
// Initial may carry, and CRYPTO stream reassembly.

// QUIC versions whose Initials we read.
const (
	quicV1 uint32 = 0x00000001 // RFC 9000
	quicV2 uint32 = 0x6b3343cf // RFC 9369
)

// Errors of quicHello.add, beside ErrHelloTooLarge and ErrHelloMalformed
// (the reassembled ClientHello is bad).
var (
	ErrNotQUIC      = errors.New("quic: not a QUIC long-header packet")
	ErrQUICVersion  = errors.New("quic: unsupported QUIC version (only v1 and v2 Initials are read)")
	ErrQUICNotFirst = errors.New("quic: datagram holds no Initial packet (not the start of a connection)")
	ErrQUICDecrypt  = errors.New("quic: Initial packet did not decrypt")
	ErrQUICFrame    = errors.New("quic: malformed or forbidden frame in an Initial packet")
)

var (
	quicSaltV1 = []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a}
	quicSaltV2 = []byte{0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9}
)

// quicKeys are a client's Initial packet protection keys.
type quicKeys struct {
	aead cipher.AEAD
	iv   [12]byte
	hp   cipher.Block
}

// hkdfExpandLabel is TLS 1.3's HKDF-Expand-Label with an empty context.
func hkdfExpandLabel(secret []byte, label string, n int) []byte {
	full := "tls13 " + label
	info := make([]byte, 0, 4+len(full))
	info = binary.BigEndian.AppendUint16(info, uint16(n))
	info = append(info, byte(len(full)))
	info = append(info, full...)
	info = append(info, 0)
	out := make([]byte, n)
	if _, err := hkdf.Expand(sha256.New, secret, info).Read(out); err != nil {
		panic("hkdf: " + err.Error()) // only for n > 255*32
	}
	return out
}

func newQUICKeys(version uint32, dcid []byte) *quicKeys {
	salt, prefix := quicSaltV1, "quic "
	if version == quicV2 {
		salt, prefix = quicSaltV2, "quicv2 "
	}
	initial := hkdf.Extract(sha256.New, dcid, salt)
	secret := hkdfExpandLabel(initial, "client in", 32)
	block, err := aes.NewCipher(hkdfExpandLabel(secret, prefix+"key", 16))
	if err != nil {
		panic(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	hp, err := aes.NewCipher(hkdfExpandLabel(secret, prefix+"hp", 16))
	if err != nil {
		panic(err)
	}
	k := &quicKeys{aead: aead, hp: hp}
	copy(k.iv[:], hkdfExpandLabel(secret, prefix+"iv", 12))
	return k
}

// quicVarint reads a QUIC variable-length integer (RFC 9000 §16).
func quicVarint(b []byte) (v uint64, n int, ok bool) {
	if len(b) == 0 {
		return 0, 0, false
	}
	n = 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, 0, false
	}
	v = uint64(b[0] & 0x3f)
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
	}
	return v, n, true
}

// isQUICInitial reports whether a datagram starts with a long-header
// Initial packet of a version we read: the cheap test before any state is
// made for a new flow.
func isQUICInitial(b []byte) bool {
	if len(b) < 7 || b[0]&0xc0 != 0xc0 {
		return false
	}
	v := binary.BigEndian.Uint32(b[1:5])
	return (v == quicV1 && (b[0]>>4)&3 == 0) || (v == quicV2 && (b[0]>>4)&3 == 1)
}

// quicHello collects the Initial packets of one client connection until
// the ClientHello in their CRYPTO frames is whole. Not safe for concurrent
// use.
type quicHello struct {
	max     int // max_hello_bytes: CRYPTO bytes beyond it are refused
	version uint32
	keys    *quicKeys
	dcid    []byte // of the first Initial, whose keys every Initial uses
	largest int64  // largest packet number decrypted, -1 before any
	crypto  cryptoStream
	scratch []byte
}

func newQUICHello(max int) *quicHello { return &quicHello{max: max, largest: -1} }

// add reads one datagram. It returns the ClientHello once the CRYPTO
// stream holds all of it, (nil, nil) when more packets are needed, or an
// error for a datagram that cannot be part of a QUIC connection's first
// flight. A datagram with an error is not counted: a later good one may
// still complete the hello (callers bound how many they accept).
func (q *quicHello) add(d []byte) (*ClientHello, error) {
	if len(d) == 0 || d[0]&0x80 == 0 {
		return nil, ErrNotQUIC
	}
	found := false
	for len(d) > 0 {
		if d[0]&0x80 == 0 {
			break // a short-header packet ends the datagram's long ones
		}
		rest, initial, err := q.packet(d)
		if err != nil {
			if found {
				break // coalesced packets after a good Initial: ignore
			}
			return nil, err
		}
		found = found || initial
		d = rest
	}
	if !found {
		return nil, ErrQUICNotFirst
	}
	msg, err := q.crypto.hello(q.max)
	if err != nil || msg == nil {
		return nil, err
	}
	h := &ClientHello{}
	if err := h.parseMessage(msg); err != nil {
		return nil, err
	}
	return h, nil
}

// packet reads the long-header packet at the start of d and returns what
// follows it in the datagram. Packets other than Initials are skipped.
func (q *quicHello) packet(d []byte) (rest []byte, initial bool, err error) {
	if len(d) < 7 || d[0]&0x40 == 0 {
		return nil, false, ErrNotQUIC
	}
	version := binary.BigEndian.Uint32(d[1:5])
	if version != quicV1 && version != quicV2 {
		return nil, false, fmt.Errorf("%w: %#08x", ErrQUICVersion, version)
	}
	if q.version != 0 && version != q.version {
		return nil, false, fmt.Errorf("%w: version %#08x after %#08x", ErrQUICVersion, version, q.version)
	}
	typ := (d[0] >> 4) & 3
	isInitial := (version == quicV1 && typ == 0) || (version == quicV2 && typ == 1)
	p := 5
	dcidLen := int(d[p])
	p++
	if dcidLen > 20 || len(d) < p+dcidLen+1 {
		return nil, false, fmt.Errorf("%w: connection ID length", ErrNotQUIC)
	}
	dcid := d[p : p+dcidLen]
	p += dcidLen
	scidLen := int(d[p])
	p++
	if scidLen > 20 || len(d) < p+scidLen {
		return nil, false, fmt.Errorf("%w: connection ID length", ErrNotQUIC)
	}
	p += scidLen
	retry := (version == quicV1 && typ == 3) || (version == quicV2 && typ == 0)
	if retry {
		return nil, false, fmt.Errorf("%w: Retry from a client", ErrNotQUIC)
	}
	if isInitial {
		tokLen, n, ok := quicVarint(d[p:])
		if !ok || uint64(len(d)-p-n) < tokLen {
			return nil, false, fmt.Errorf("%w: truncated token", ErrNotQUIC)
		}
		p += n + int(tokLen)
	}
	length, n, ok := quicVarint(d[p:])
	if !ok || uint64(len(d)-p-n) < length {
		return nil, false, fmt.Errorf("%w: truncated packet (length %d)", ErrNotQUIC, length)
	}
	p += n
	end := p + int(length)
	if !isInitial {
		return d[end:], false, nil // 0-RTT or Handshake coalesced with it
	}
	if q.keys == nil {
		if dcidLen < 8 {
			return nil, false, fmt.Errorf("%w: client's first Destination Connection ID has %d bytes, fewer than 8", ErrNotQUIC, dcidLen)
		}
		q.version = version
		q.dcid = append([]byte(nil), dcid...)
		q.keys = newQUICKeys(version, q.dcid)
	}
	payload, err := q.open(d[:end], p, q.keys)
	if err != nil && string(dcid) != string(q.dcid) {
		// A later Initial with another DCID (after a Retry) has keys of
		// its own.
		payload, err = q.open(d[:end], p, newQUICKeys(version, dcid))
	}
	if err != nil {
		return nil, false, err
	}
	if err := q.frames(payload); err != nil {
		return nil, false, err
	}
	return d[end:], true, nil
}

// open removes header protection and decrypts the packet pkt whose packet
// number starts at pnOff (RFC 9001 §5.3, §5.4). pkt is not modified.
func (q *quicHello) open(pkt []byte, pnOff int, k *quicKeys) ([]byte, error) {
	if len(pkt) < pnOff+4+16 {
		return nil, fmt.Errorf("%w: too short for a header protection sample", ErrQUICDecrypt)
	}
	var mask [16]byte
	k.hp.Encrypt(mask[:], pkt[pnOff+4:pnOff+4+16])
	first := pkt[0] ^ (mask[0] & 0x0f)
	pnLen := int(first&3) + 1
	hdr := append(q.scratch[:0], pkt[:pnOff+pnLen]...)
	hdr[0] = first
	var trunc uint64
	for i := range pnLen {
		hdr[pnOff+i] ^= mask[1+i]
		trunc = trunc<<8 | uint64(hdr[pnOff+i])
	}
	pn := decodePacketNumber(q.largest, trunc, pnLen)
	var nonce [12]byte
	copy(nonce[:], k.iv[:])
	for i := range 8 {
		nonce[4+i] ^= byte(uint64(pn) >> (56 - 8*i))
	}
	ct := pkt[pnOff+pnLen:]
	if len(ct) < k.aead.Overhead() {
		return nil, fmt.Errorf("%w: too short", ErrQUICDecrypt)
	}
	out, err := k.aead.Open(hdr[len(hdr):], nonce[:], ct, hdr)
	if err != nil {
		return nil, fmt.Errorf("%w (packet number %d)", ErrQUICDecrypt, pn)
	}
	if hdr[0]&0x0c != 0 {
		return nil, fmt.Errorf("%w: reserved header bits set", ErrQUICFrame)
	}
	q.scratch = hdr[:0]
	if pn > q.largest {
		q.largest = pn
	}
	// out aliases scratch, reused by the next packet: frames copies
	// what it keeps.
	return out, nil
}

// decodePacketNumber is RFC 9000 §A.3.
func decodePacketNumber(largest int64, trunc uint64, pnLen int) int64 {
	expected := largest + 1
	win := int64(1) << (8 * pnLen)
	hwin := win / 2
	cand := (expected &^ (win - 1)) | int64(trunc)
	switch {
	case cand <= expected-hwin && cand < (1<<62)-win:
		return cand + win
	case cand > expected+hwin && cand >= win:
		return cand - win
	}
	return cand
}

// Frame types an Initial may carry (RFC 9000 §12.4, table 3).
const (
	framePadding    = 0x00
	framePing       = 0x01
	frameAck        = 0x02
	frameAckECN     = 0x03
	frameCrypto     = 0x06
	frameConnClose  = 0x1c
	maxCryptoOffset = 1 << 20 // past any sane max_hello_bytes
)

func (q *quicHello) frames(b []byte) error {
	if len(b) == 0 {
		return fmt.Errorf("%w: empty payload", ErrQUICFrame)
	}
	for len(b) > 0 {
		typ, n, ok := quicVarint(b)
		if !ok {
			return fmt.Errorf("%w: frame type", ErrQUICFrame)
		}
		b = b[n:]
		switch typ {
		case framePadding, framePing:
		case frameAck, frameAckECN:
			fields := 4 // largest, delay, range count, first range
			var count uint64
			for i := 0; i < fields; i++ {
				v, n, ok := quicVarint(b)
				if !ok {
					return fmt.Errorf("%w: ACK", ErrQUICFrame)
				}
				b = b[n:]
				if i == 2 {
					if v > uint64(len(b)) {
						return fmt.Errorf("%w: ACK range count", ErrQUICFrame)
					}
					count = v
				}
			}
			rem := 2 * int(count)
			if typ == frameAckECN {
				rem += 3
			}
			for range rem {
				_, n, ok := quicVarint(b)
				if !ok {
					return fmt.Errorf("%w: ACK", ErrQUICFrame)
				}
				b = b[n:]
			}
		case frameCrypto:
			off, n, ok := quicVarint(b)
			if !ok {
				return fmt.Errorf("%w: CRYPTO offset", ErrQUICFrame)
			}
			b = b[n:]
			l, n, ok := quicVarint(b)
			if !ok || l > uint64(len(b)-n) {
				return fmt.Errorf("%w: CRYPTO length", ErrQUICFrame)
			}
			b = b[n:]
			if off > maxCryptoOffset || off+l > uint64(q.max) {
				return fmt.Errorf("%w (CRYPTO data up to byte %d)", ErrHelloTooLarge, off+l)
			}
			q.crypto.add(int(off), b[:l])
			b = b[l:]
		case frameConnClose:
			return fmt.Errorf("%w: CONNECTION_CLOSE", ErrQUICFrame)
		default:
			return fmt.Errorf("%w: frame type %#x", ErrQUICFrame, typ)
		}
	}
	return nil
}

// cryptoStream reassembles the Initial CRYPTO stream from frames that may
// arrive out of order, overlap, or repeat.
type cryptoStream struct {
	buf  []byte
	have []span // sorted, disjoint, merged
}

type span struct{ lo, hi int }

func (c *cryptoStream) add(off int, data []byte) {
	if len(data) == 0 {
		return
	}
	end := off + len(data)
	if end > len(c.buf) {
		c.buf = append(c.buf, make([]byte, end-len(c.buf))...)
	}
	copy(c.buf[off:], data)
	// Insert [off,end) and merge neighbours.
	out := c.have[:0:0]
	n := span{off, end}
	placed := false
	for _, s := range c.have {
		switch {
		case s.hi < n.lo:
			out = append(out, s)
		case n.hi < s.lo:
			if !placed {
				out = append(out, n)
				placed = true
			}
			out = append(out, s)
		default:
			n.lo, n.hi = min(n.lo, s.lo), max(n.hi, s.hi)
		}
	}
	if !placed {
		out = append(out, n)
	}
	c.have = out
}

// contiguous is how many bytes from offset 0 have arrived.
func (c *cryptoStream) contiguous() int {
	if len(c.have) == 0 || c.have[0].lo != 0 {
		return 0
	}
	return c.have[0].hi
}

// hello returns the whole ClientHello handshake message once it arrived.
func (c *cryptoStream) hello(max int) ([]byte, error) {
	got := c.contiguous()
	if got < 4 {
		return nil, nil
	}
	if c.buf[0] != handshakeClientHelo {
		return nil, fmt.Errorf("%w: first handshake message is type %d, not ClientHello", ErrHelloMalformed, c.buf[0])
	}
	n := 4 + (int(c.buf[1])<<16 | int(c.buf[2])<<8 | int(c.buf[3]))
	if n > max {
		return nil, fmt.Errorf("%w (hello of %d bytes)", ErrHelloTooLarge, n)
	}
	if got < n {
		return nil, nil
	}
	return c.buf[:n], nil
}

// QUICErrorReason maps an error from reading Initials to the reason label
// of relay_quic_initial_errors_total.
func QUICErrorReason(err error) string {
	switch {
	case errors.Is(err, ErrQUICVersion):
		return "version"
	case errors.Is(err, ErrQUICNotFirst):
		return "not_initial"
	case errors.Is(err, ErrQUICDecrypt):
		return "decrypt"
	case errors.Is(err, ErrQUICFrame):
		return "frame"
	case errors.Is(err, ErrNotQUIC):
		return "not_quic"
	}
	return HelloErrorReason(err)
}
