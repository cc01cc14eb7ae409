package relay

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Real hellos captured from clients on this machine's kind (see
// testdata/hello/README.md for how).
var capturedHellos = []struct {
	file, sni string
	alpn      []string
	ech       bool
}{
	{"curl.bin", "hello.example.com", []string{"h2", "http/1.1"}, false},
	{"openssl.bin", "hello.example.com", []string{"h2", "http/1.1"}, false},
	{"openssl-nosni.bin", "", nil, false},
	{"go-mlkem.bin", "go.example.com", []string{"h2", "http/1.1"}, false},
	{"chromium.bin", "chromium.example.com", []string{"h2", "http/1.1"}, true},
}

func readCaptured(t testing.TB, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "hello", file))
	if err != nil {
		t.Skipf("capture %s missing: %v", file, err)
	}
	return b
}

func TestParseCapturedHellos(t *testing.T) {
	for _, c := range capturedHellos {
		t.Run(c.file, func(t *testing.T) {
			raw := readCaptured(t, c.file)
			h, err := ParseClientHello(raw)
			if err != nil {
				t.Fatal(err)
			}
			if h.ServerName != c.sni || !slices.Equal(h.ALPN, c.alpn) || h.ECH != c.ech {
				t.Errorf("got sni=%q alpn=%q ech=%v, want %q %q %v", h.ServerName, h.ALPN, h.ECH, c.sni, c.alpn, c.ech)
			}
			if !slices.Contains(h.SupportedVersions, tls.VersionTLS13) {
				t.Errorf("supported versions %x lack TLS 1.3", h.SupportedVersions)
			}
			// The same hello over two records and one byte per read.
			h2, err := readHelloFrom(t, twoRecords(raw), 1)
			if err != nil {
				t.Fatalf("two records, 1-byte reads: %v", err)
			}
			if h2.ServerName != c.sni || !bytes.Equal(h2.Raw, twoRecords(raw)) {
				t.Errorf("two records: sni %q, raw intact %v", h2.ServerName, bytes.Equal(h2.Raw, twoRecords(raw)))
			}
		})
	}
}

// readHelloFrom runs ReadClientHello on a real loopback TCP connection fed
// data in chunks of chunk bytes (separate segments: TCP_NODELAY and a
// pause between writes), followed by trailing bytes that must not be read.
func readHelloFrom(t testing.TB, data []byte, chunk int) (*ClientHello, error) {
	t.Helper()
	ln := listenLoopback(t)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		defer c.Close()
		c.(*net.TCPConn).SetNoDelay(true)
		for p := data; len(p) > 0; {
			n := min(chunk, len(p))
			if _, err := c.Write(p[:n]); err != nil {
				return
			}
			p = p[n:]
			if chunk < len(data) && len(data)/chunk < 50 {
				time.Sleep(time.Millisecond)
			}
		}
		c.Write([]byte("TRAILING"))
		io.Copy(io.Discard, c)
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h, err := ReadClientHello(c, 5*time.Second, 65536)
	if err == nil {
		rest := make([]byte, 8)
		io.ReadFull(c, rest)
		if string(rest) != "TRAILING" {
			t.Errorf("ReadClientHello consumed bytes past the hello: next bytes %q", rest)
		}
	}
	return h, err
}

func TestReadClientHelloErrors(t *testing.T) {
	hello := readCaptured(t, "go-mlkem.bin")
	for _, tc := range []struct {
		name   string
		data   []byte
		max    int
		want   error
		reason string
	}{
		{"plain http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 65536, ErrNotTLS, "not_tls"},
		{"sslv2", []byte{0x80, 0x2e, 0x01, 0x03, 0x01, 0, 0x15, 0, 0, 0, 0x10}, 65536, ErrNotTLS, "not_tls"},
		{"alert record", []byte{21, 3, 1, 0, 2, 2, 40}, 65536, ErrNotTLS, "not_tls"},
		{"too large", hello, 1024, ErrHelloTooLarge, "too_large"},
		{"server hello", append([]byte{22, 3, 3, 0, 4}, 2, 0, 0, 0), 65536, ErrHelloMalformed, "malformed"},
		{"zero-length record", []byte{22, 3, 1, 0, 0}, 65536, ErrHelloMalformed, "malformed"},
		{"truncated then closed", hello[:100], 65536, ErrHelloEOF, "eof"},
		{"garbage body", append([]byte{22, 3, 1, 0, 8, 1, 0, 0, 4}, 3, 3, 0, 0), 65536, ErrHelloMalformed, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln := listenLoopback(t)
			go func() {
				c, _ := net.Dial("tcp", ln.Addr().String())
				c.Write(tc.data)
				c.(*net.TCPConn).CloseWrite()
				time.Sleep(time.Second)
				c.Close()
			}()
			c, _ := ln.Accept()
			defer c.Close()
			_, err := ReadClientHello(c, 5*time.Second, tc.max)
			if !errors.Is(err, tc.want) || HelloErrorReason(err) != tc.reason {
				t.Fatalf("err %v (reason %s), want %v (%s)", err, HelloErrorReason(err), tc.want, tc.reason)
			}
		})
	}
	t.Run("silent client times out", func(t *testing.T) {
		ln := listenLoopback(t)
		go func() {
			c, _ := net.Dial("tcp", ln.Addr().String())
			time.Sleep(2 * time.Second)
			c.Close()
		}()
		c, _ := ln.Accept()
		defer c.Close()
		_, err := ReadClientHello(c, 100*time.Millisecond, 65536)
		if !errors.Is(err, ErrHelloTimeout) || HelloErrorReason(err) != "timeout" {
			t.Fatalf("err %v, want timeout", err)
		}
	})
}

func TestHelloReplayCompletesRealHandshake(t *testing.T) {
	ca := newTestCA(t)
	ln := listenLoopback(t)
	done := make(chan error, 1)
	go func() {
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "replay.test", RootCAs: ca.pool})
		if err == nil {
			_, err = io.ReadAll(c)
			c.Close()
		}
		done <- err
	}()
	c, _ := ln.Accept()
	defer c.Close()
	h, err := ReadClientHello(c, 5*time.Second, 65536)
	if err != nil {
		t.Fatal(err)
	}
	cc := &termConn{Conn: c, pending: h.Raw}
	srv := tls.Server(cc, &tls.Config{GetCertificate: ca.GetCertificate})
	if err := srv.Handshake(); err != nil {
		t.Fatalf("handshake over replayed hello: %v", err)
	}
	if cc.pending != nil {
		t.Errorf("after the handshake the conn still holds %d bytes (cap %d) of the replayed hello", len(cc.pending), cap(cc.pending))
	}
	srv.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestHostNameValidation(t *testing.T) {
	for name, ok := range map[string]bool{
		"A.Example.COM.": true, "x_y.example": true, "10.0.0.1": true,
		"a b": false, "a/b": false, "a\x00b": false, "": false, strings.Repeat("a", 256): false,
	} {
		_, err := hostName([]byte(name))
		if (err == nil) != ok {
			t.Errorf("hostName(%q) err=%v, want ok=%v", name, err, ok)
		}
	}
}

func FuzzClientHello(f *testing.F) {
	for _, c := range capturedHellos {
		if b, err := os.ReadFile(filepath.Join("testdata", "hello", c.file)); err == nil {
			f.Add(b)
			f.Add(twoRecords(b))
			f.Add(b[:len(b)/2])
		}
	}
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseClientHello(data)
		if err != nil {
			if HelloErrorReason(err) == "io" {
				t.Fatalf("parse error without a reason: %v", err)
			}
			return
		}
		if !bytes.Equal(h.Raw, data) {
			t.Fatal("Raw differs from the input")
		}
		if h.ServerName != normalizeName(h.ServerName) {
			t.Fatalf("server name %q not normalized", h.ServerName)
		}
		// The streaming reader must agree with the parser on whatever
		// prefix of data makes up the hello records.
		if got, err := readHelloRecords(bytes.NewReader(data), 1<<20); err == nil {
			if h2, err := ParseClientHello(got); err != nil || h2.ServerName != h.ServerName {
				t.Fatalf("reader and parser disagree: %v", err)
			}
		}
	})
}

func BenchmarkParseClientHello(b *testing.B) {
	for _, file := range []string{"go-mlkem.bin", "chromium.bin"} {
		raw := readCaptured(b, file)
		b.Run(file, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(raw)))
			for b.Loop() {
				if _, err := ParseClientHello(raw); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkReadClientHello(b *testing.B) {
	raw := readCaptured(b, "go-mlkem.bin")
	b.ReportAllocs()
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		if _, err := readHelloRecords(bytes.NewReader(raw), 65536); err != nil {
			b.Fatal(err)
		}
	}
}
