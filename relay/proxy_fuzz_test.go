package relay

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The fuzz targets drive one real relay (terminate route, plain HTTP
// upstream) per fuzz process over TLS: what a client can send is what
// is fuzzed, through the same code paths. A connection the relay does
// not end within 10 s of the client's EOF is a hang.
var fuzzRelay struct {
	once sync.Once
	r    *testRelay
	conf *tls.Config
}

func fuzzTarget(f *testing.F) *testRelay {
	fuzzRelay.once.Do(func() {
		up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, _ := io.Copy(io.Discard, r.Body)
			w.Header().Set("Trailer", "X-N")
			fmt.Fprintf(w, "%d", n)
			w.Header().Set("X-N", "1")
		}))
		// Not cleaned up: the relay lives as long as the fuzz process.
		tb := &fuzzTB{F: f}
		fuzzRelay.r, _ = h1Relay(tb, up.URL)
		fuzzRelay.conf = &tls.Config{ServerName: "h1.test", RootCAs: fuzzRelay.r.ca.pool, ClientSessionCache: tls.NewLRUClientSessionCache(64)}
	})
	return fuzzRelay.r
}

// fuzzTB keeps the shared relay's cleanups from running at the end of
// the first fuzz target.
type fuzzTB struct{ *testing.F }

func (fuzzTB) Cleanup(func()) {}

// fuzzExchange sends data after prefix on a new connection with alpn,
// half-closes, and reads until the relay closes.
func fuzzExchange(t *testing.T, r *testRelay, alpn string, prefix, data []byte) {
	conf := fuzzRelay.conf.Clone()
	conf.NextProtos = []string{alpn}
	c, err := tls.DialWithDialer(dialer(5*time.Second), "tcp", r.HTTPSAddr().String(), conf)
	if err != nil {
		t.Skipf("dial: %v", err) // the machine, not the input
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(prefix)
	c.Write(data)
	c.CloseWrite()
	_, err = io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the relay held the connection 10 s after the client's EOF (%d bytes)", len(data))
	}
}

// h2Seed builds a frame sequence (after the preface) with fn.
func h2Seed(fn func(fr *http2.Framer, hb func(end bool, kv ...string) []byte)) []byte {
	var buf, hbuf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	fr.AllowIllegalWrites = true
	enc := hpack.NewEncoder(&hbuf)
	hb := func(end bool, kv ...string) []byte {
		hbuf.Reset()
		base := []string{":method", "GET", ":scheme", "https", ":authority", "h1.test", ":path", "/"}
		if end {
			base[1] = "POST"
		}
		for _, l := range [][]string{base, kv} {
			for i := 0; i+1 < len(l); i += 2 {
				enc.WriteField(hpack.HeaderField{Name: l[i], Value: l[i+1]})
			}
		}
		return append([]byte(nil), hbuf.Bytes()...)
	}
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	fn(fr, hb)
	return buf.Bytes()
}

func h2Seeds() [][]byte {
	return [][]byte{
		h2Seed(func(fr *http2.Framer, hb func(bool, ...string) []byte) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb(false), EndStream: true, EndHeaders: true})
		}),
		h2Seed(func(fr *http2.Framer, hb func(bool, ...string) []byte) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb(true, "content-length", "5"), EndHeaders: true})
			fr.WriteData(1, false, []byte("he"))
			fr.WriteWindowUpdate(0, 1000)
			fr.WriteData(1, true, []byte("llo"))
		}),
		h2Seed(func(fr *http2.Framer, hb func(bool, ...string) []byte) {
			b := hb(true, "expect", "100-continue", "x-long", string(make([]byte, 100)))
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: b[:10]})
			fr.WriteContinuation(3, true, b[10:])
			fr.WritePriority(3, http2.PriorityParam{StreamDep: 1, Weight: 10})
			fr.WriteRSTStream(3, http2.ErrCodeCancel)
			fr.WritePing(false, [8]byte{1})
			fr.WriteGoAway(3, http2.ErrCodeNo, nil)
		}),
		h2Seed(func(fr *http2.Framer, hb func(bool, ...string) []byte) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb(true), EndHeaders: true})
			fr.WriteData(1, false, []byte("a"))
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb(false, "x-trailer", "1"), EndStream: true, EndHeaders: true})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: hb(false), EndStream: true, EndHeaders: true, Priority: http2.PriorityParam{StreamDep: 5}})
			fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 16384}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
			fr.WriteWindowUpdate(1, 0)
		}),
	}
}

var h1Seeds = []string{
	"GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: h1.test\r\nContent-Length: 5\r\n\r\nhelloGET /2 HTTP/1.1\r\nHost: h1.test\r\nConnection: close\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
	"GET /ws HTTP/1.1\r\nHost: h1.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: h1.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	"GET / HTTP/1.0\r\n\r\n",
}

// FuzzH2Frames: any frame sequence after the preface leaves the relay
// without a crash or a hang, and serving.
func FuzzH2Frames(f *testing.F) {
	for _, s := range h2Seeds() {
		f.Add(s)
	}
	r := fuzzTarget(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzExchange(t, r, "h2", []byte(http2.ClientPreface), data)
	})
}

// FuzzH1Request: any bytes to the HTTP/1 proxy loop leave the relay
// without a crash or a hang.
func FuzzH1Request(f *testing.F) {
	for _, s := range h1Seeds {
		f.Add([]byte(s))
	}
	r := fuzzTarget(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzExchange(t, r, "http/1.1", nil, data)
	})
}

// TestWriteFuzzSeeds writes the seeds above into testdata/fuzz (the
// committed corpus): RELAY_WRITE_FUZZ_SEEDS=1 go test -run TestWriteFuzzSeeds ./relay
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("RELAY_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set RELAY_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz")
	}
	write := func(target string, i int, b []byte) {
		dir := filepath.Join("testdata", "fuzz", target)
		os.MkdirAll(dir, 0o755)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed%d", i)), fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", b), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i, s := range h2Seeds() {
		write("FuzzH2Frames", i, s)
	}
	for i, s := range h1Seeds {
		write("FuzzH1Request", i, []byte(s))
	}
}
