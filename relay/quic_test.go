package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// captureInitials dials a quic-go client at a plain UDP socket of ours
// that never answers and returns the client's first datagrams (its first
// flight, before any retransmission).
func captureInitials(t testing.TB, tc *tls.Config, qc *quic.Config) [][]byte {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if c, err := quic.DialAddr(ctx, pc.LocalAddr().String(), tc, qc); err == nil {
			c.CloseWithError(0, "")
		}
	}()
	var out [][]byte
	buf := make([]byte, 65536)
	first := time.Time{}
	for len(out) < 8 {
		// Retransmissions come after a PTO (hundreds of ms); the first
		// flight's datagrams are sent back to back.
		wait := 2 * time.Second
		if !first.IsZero() {
			wait = 50 * time.Millisecond
		}
		pc.SetReadDeadline(time.Now().Add(wait))
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			break
		}
		if first.IsZero() {
			first = time.Now()
		}
		out = append(out, append([]byte(nil), buf[:n]...))
	}
	cancel()
	<-done
	if len(out) == 0 {
		t.Fatal("quic-go client sent nothing")
	}
	return out
}

// bigALPN makes a hello that cannot fit one Initial even without ML-KEM.
func bigALPN() []string {
	var p []string
	for i := range 40 {
		p = append(p, "proto-"+strings.Repeat("x", 30)+string(rune('a'+i%26)))
	}
	return append(p, "h3")
}

func feedAll(t testing.TB, q *quicHello, ds [][]byte) (*ClientHello, int) {
	t.Helper()
	for i, d := range ds {
		h, err := q.add(d)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		if h != nil {
			return h, i + 1
		}
	}
	return nil, len(ds)
}

func TestQUICInitialQuicGo(t *testing.T) {
	cases := []struct {
		name    string
		version quic.Version
		alpn    []string
		curves  []tls.CurveID
		split   bool // the hello needs more than one Initial
	}{
		{"v1-x25519", quic.Version1, []string{"h3"}, []tls.CurveID{tls.X25519}, false},
		{"v1-mlkem", quic.Version1, []string{"h3"}, []tls.CurveID{tls.X25519MLKEM768}, true},
		{"v2-mlkem", quic.Version2, []string{"h3"}, []tls.CurveID{tls.X25519MLKEM768}, true},
		{"v1-big-alpn", quic.Version1, bigALPN(), []tls.CurveID{tls.X25519}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ds := captureInitials(t, &tls.Config{ServerName: "quic.example.com", NextProtos: c.alpn, CurvePreferences: c.curves},
				&quic.Config{Versions: []quic.Version{c.version}})
			h, n := feedAll(t, newQUICHello(65536), ds)
			if h == nil {
				t.Fatalf("no hello in %d datagrams", len(ds))
			}
			if h.ServerName != "quic.example.com" || !slices.Equal(h.ALPN, c.alpn) {
				t.Errorf("sni %q alpn %q", h.ServerName, h.ALPN)
			}
			if !slices.Contains(h.SupportedVersions, tls.VersionTLS13) {
				t.Errorf("supported versions %x", h.SupportedVersions)
			}
			if c.split != (n > 1) {
				t.Fatalf("hello complete after %d datagrams, split=%v expected", n, c.split)
			}
			if !c.split {
				return
			}
			// Reordered: the later datagrams first.
			q := newQUICHello(65536)
			for i := n - 1; i > 0; i-- {
				if h, err := q.add(ds[i]); h != nil || err != nil {
					t.Fatalf("datagram %d alone: hello %v err %v", i, h, err)
				}
			}
			if h, err := q.add(ds[0]); err != nil || h == nil || h.ServerName != "quic.example.com" {
				t.Fatalf("reordered: %v %v", h, err)
			}
			// Duplicates change nothing.
			q = newQUICHello(65536)
			q.add(ds[0])
			if h, _ := q.add(ds[0]); h != nil {
				t.Fatal("a duplicate completed the hello")
			}
			// A budget below the hello's size.
			q = newQUICHello(1000)
			var err error
			for _, d := range ds[:n] {
				if _, err = q.add(d); err != nil {
					break
				}
			}
			if !errors.Is(err, ErrHelloTooLarge) {
				t.Fatalf("max 1000: %v", err)
			}
		})
	}
}

func TestQUICInitialGarbage(t *testing.T) {
	ds := captureInitials(t, &tls.Config{ServerName: "quic.example.com", NextProtos: []string{"h3"}, CurvePreferences: []tls.CurveID{tls.X25519}}, nil)
	good := ds[0]
	flip := func(i int) []byte { b := bytes.Clone(good); b[i] ^= 0x01; return b }
	version := func(v uint32) []byte { b := bytes.Clone(good); binary.BigEndian.PutUint32(b[1:], v); return b }
	cases := []struct {
		name   string
		d      []byte
		reason string
	}{
		{"empty", nil, "not_quic"},
		{"http", []byte("GET / HTTP/1.1\r\n\r\n"), "not_quic"},
		{"short-header", append([]byte{0x40}, good[1:]...), "not_quic"},
		{"truncated-header", good[:6], "not_quic"},
		{"truncated-packet", good[:100], "not_quic"},
		{"truncated-by-one", good[:len(good)-1], "not_quic"},
		{"version-negotiation", version(0), "version"},
		{"unknown-version", version(0xff00001d), "version"},
		{"ciphertext-flipped", flip(len(good) - 20), "decrypt"},
		{"tag-flipped", flip(len(good) - 1), "decrypt"},
		{"dcid-flipped", flip(7), "decrypt"},
		{"zeros", make([]byte, 1200), "not_quic"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, err := newQUICHello(65536).add(c.d)
			if h != nil || err == nil {
				t.Fatalf("accepted: %v %v", h, err)
			}
			if r := QUICErrorReason(err); r != c.reason {
				t.Errorf("reason %q (%v), want %q", r, err, c.reason)
			}
		})
	}
	// A bad datagram leaves the flow usable for the good one.
	q := newQUICHello(65536)
	q.add(flip(len(good) - 20))
	if h, err := q.add(good); err != nil || h == nil {
		t.Fatalf("good after bad: %v %v", h, err)
	}
}

// sealInitial builds a client Initial packet with the given frames,
// packet number and packet-number length: the cases quic-go's client does
// not produce (Chrome's many small CRYPTO frames, reordered in a packet).
func sealInitial(version uint32, dcid []byte, pn uint64, pnLen int, frames []byte) []byte {
	return sealInitialKeys(version, dcid, dcid, pn, pnLen, frames)
}

// sealInitialKeys is sealInitial with keys from keyDCID and wireDCID in
// the header (a later Initial after the client changed its DCID).
func sealInitialKeys(version uint32, wireDCID, keyDCID []byte, pn uint64, pnLen int, frames []byte) []byte {
	k := newQUICKeys(version, keyDCID)
	typ := byte(0)
	if version == quicV2 {
		typ = 1
	}
	hdr := []byte{0xc0 | typ<<4 | byte(pnLen-1)}
	hdr = binary.BigEndian.AppendUint32(hdr, version)
	hdr = append(hdr, byte(len(wireDCID)))
	hdr = append(hdr, wireDCID...)
	hdr = append(hdr, 0, 0) // no SCID, no token
	// Pad to a 1200-byte datagram, as clients must.
	if pad := 1200 - (len(hdr) + 2 + pnLen + len(frames) + 16); pad > 0 {
		frames = append(bytes.Clone(frames), make([]byte, pad)...)
	}
	l := pnLen + len(frames) + 16
	hdr = append(hdr, 0x40|byte(l>>8), byte(l))
	pnOff := len(hdr)
	for i := pnLen - 1; i >= 0; i-- {
		hdr = append(hdr, byte(pn>>(8*i)))
	}
	var nonce [12]byte
	copy(nonce[:], k.iv[:])
	for i := range 8 {
		nonce[4+i] ^= byte(pn >> (56 - 8*i))
	}
	pkt := k.aead.Seal(bytes.Clone(hdr), nonce[:], frames, hdr)
	var mask [16]byte
	k.hp.Encrypt(mask[:], pkt[pnOff+4:pnOff+20])
	pkt[0] ^= mask[0] & 0x0f
	for i := range pnLen {
		pkt[pnOff+i] ^= mask[1+i]
	}
	return pkt
}

func appendVarint(b []byte, v uint64) []byte {
	switch {
	case v < 1<<6:
		return append(b, byte(v))
	case v < 1<<14:
		return append(b, 0x40|byte(v>>8), byte(v))
	default:
		return append(b, 0x80|byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
}

func cryptoFrame(off int, data []byte) []byte {
	b := appendVarint([]byte{frameCrypto}, uint64(off))
	b = appendVarint(b, uint64(len(data)))
	return append(b, data...)
}

// helloMessage is a TLS ClientHello handshake message (no record header).
func helloMessage(t testing.TB, name string) []byte {
	return clientHello(t, name, "h3")[recordHeaderLen:]
}

func TestQUICInitialCraftedFrames(t *testing.T) {
	msg := helloMessage(t, "crafted.example.com")
	dcid := []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	// Chrome-like: the hello in small CRYPTO frames, last first, PING and
	// PADDING between them, an ACK frame too, a 4-byte packet number
	// that does not start at 0.
	var frames []byte
	chunk := 37
	var offs []int
	for off := 0; off < len(msg); off += chunk {
		offs = append(offs, off)
	}
	slices.Reverse(offs)
	frames = append(frames, frameAck, 0, 0, 0, 0)
	for _, off := range offs {
		frames = append(frames, cryptoFrame(off, msg[off:min(off+chunk, len(msg))])...)
		frames = append(frames, framePing, framePadding, framePadding)
	}
	for _, v := range []uint32{quicV1, quicV2} {
		pkt := sealInitial(v, dcid, 7, 4, frames)
		h, err := newQUICHello(65536).add(pkt)
		if err != nil || h == nil || h.ServerName != "crafted.example.com" {
			t.Fatalf("version %#x: %v %v", v, h, err)
		}
	}

	// Two packets, the second one with another DCID (keys stay those of
	// the first).
	half := len(msg) / 2
	p1 := sealInitial(quicV1, dcid, 0, 1, cryptoFrame(0, msg[:half]))
	// A Handshake packet (type 2) coalesced after the Initial is skipped.
	hs := append([]byte{0xe0, 0, 0, 0, 1, byte(len(dcid))}, dcid...)
	hs = append(hs, 0, 0x40, 30)
	p1 = append(p1, append(hs, make([]byte, 30)...)...)
	q := newQUICHello(65536)
	if h, err := q.add(p1); h != nil || err != nil {
		t.Fatalf("first half: %v %v", h, err)
	}
	other := bytes.Clone(dcid)
	other[0] ^= 0xff
	p2 := sealInitialKeys(quicV1, other, dcid, 1, 2, cryptoFrame(half, msg[half:]))
	if h, err := q.add(p2); err != nil || h == nil || h.ServerName != "crafted.example.com" {
		t.Fatalf("second half with another DCID: %v %v", h, err)
	}

	// A forbidden frame (STREAM) in an Initial.
	if _, err := newQUICHello(65536).add(sealInitial(quicV1, dcid, 0, 1, []byte{0x08, 0, 0})); !errors.Is(err, ErrQUICFrame) {
		t.Fatalf("STREAM frame: %v", err)
	}
	// A CRYPTO frame past the budget.
	if _, err := newQUICHello(4096).add(sealInitial(quicV1, dcid, 0, 1, cryptoFrame(5000, []byte{1}))); !errors.Is(err, ErrHelloTooLarge) {
		t.Fatalf("far CRYPTO offset: %v", err)
	}
	// A short DCID is no client's first Initial.
	if _, err := newQUICHello(65536).add(sealInitial(quicV1, dcid[:4], 0, 1, cryptoFrame(0, msg))); !errors.Is(err, ErrNotQUIC) {
		t.Fatalf("4-byte DCID: %v", err)
	}
}

func TestDecodePacketNumber(t *testing.T) {
	// RFC 9000 §A.3's example.
	if got := decodePacketNumber(0xa82f30ea, 0x9b32, 2); got != 0xa82f9b32 {
		t.Fatalf("got %#x", got)
	}
	if got := decodePacketNumber(-1, 5, 1); got != 5 {
		t.Fatalf("first packet: %d", got)
	}
}

func FuzzQUICInitial(f *testing.F) {
	msg := helloMessage(f, "fuzz.example.com")
	dcid := []byte{8, 7, 6, 5, 4, 3, 2, 1}
	half := len(msg) / 2
	f.Add(sealInitial(quicV1, dcid, 0, 1, cryptoFrame(0, msg)), 0)
	f.Add(append(sealInitial(quicV1, dcid, 0, 1, cryptoFrame(0, msg[:half])), sealInitial(quicV1, dcid, 1, 1, cryptoFrame(half, msg[half:]))...), 1200)
	f.Add(sealInitial(quicV2, dcid, 3, 4, append([]byte{framePing, frameAck, 1, 0, 1, 0, 0, 0}, cryptoFrame(0, msg)...)), 600)
	f.Add([]byte{0xc0, 0, 0, 0, 1, 8}, 3)
	f.Fuzz(func(t *testing.T, data []byte, split int) {
		q := newQUICHello(16384)
		if split <= 0 || split >= len(data) {
			q.add(data)
			return
		}
		// As two datagrams, second first.
		q.add(data[split:])
		if h, err := q.add(data[:split]); h != nil && err != nil {
			t.Fatal("hello and error")
		}
		if len(q.crypto.buf) > 16384 {
			t.Fatalf("crypto buffer %d bytes past the budget", len(q.crypto.buf))
		}
	})
}
