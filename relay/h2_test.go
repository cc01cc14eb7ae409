package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// bulkUpstream answers /sha with the length and sha256 of the request
// body, and /bytes?n=N with N bytes of pattern.
func bulkUpstream(t testing.TB) string {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/sha":
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), 400)
				return
			}
			fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
		case "/bytes":
			n, _ := strconv.Atoi(r.URL.Query().Get("n"))
			w.Header().Set("Content-Length", strconv.Itoa(n))
			w.Write(patternBytes(n))
		case "/slow":
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			time.Sleep(500 * time.Millisecond)
			io.WriteString(w, "done")
		}
	}))
	t.Cleanup(up.Close)
	return up.URL
}

func patternBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>12)
	}
	return b
}

// TestH2BulkBothWays: several streams at once move large bodies each way
// through the relay's h2 server, intact, within its flow-control windows
// (1 MiB per stream and per connection) and the client's.
func TestH2BulkBothWays(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t))
	tr := h2Transport(r)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 60 * time.Second}
	const size = 16 << 20
	data := patternBytes(size)
	sum := sha256.Sum256(data)
	want := fmt.Sprintf("%d %s", size, hex.EncodeToString(sum[:]))
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() {
			resp, err := client.Post("https://h1.test/sha", "application/octet-stream", bytes.NewReader(data))
			if err != nil {
				t.Errorf("upload %d: %v", i, err)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.ProtoMajor != 2 || string(b) != want {
				t.Errorf("upload %d over %s: upstream saw %q, want %q", i, resp.Proto, b, want)
			}
		})
		wg.Go(func() {
			resp, err := client.Get("https://h1.test/bytes?n=" + strconv.Itoa(size))
			if err != nil {
				t.Errorf("download %d: %v", i, err)
				return
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(b, data) {
				t.Errorf("download %d: %d bytes (%v), want %d intact", i, len(b), err, size)
			}
		})
	}
	wg.Wait()
}

// h2Raw is a hand-driven HTTP/2 client connection to the relay.
type h2Raw struct {
	t    *testing.T
	c    *tls.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func dialH2Raw(t *testing.T, r *testRelay) *h2Raw {
	t.Helper()
	c, err := r.dialTLS(t, "h1.test", r.ca.pool, "h2")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q, want h2", p)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	h := &h2Raw{t: t, c: c, fr: http2.NewFramer(c, c)}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	h.enc = hpack.NewEncoder(&h.hbuf)
	io.WriteString(c, http2.ClientPreface)
	h.fr.WriteSettings()
	return h
}

func (h *h2Raw) headers(id uint32, end bool, fields ...string) {
	h.hbuf.Reset()
	base := []string{":method", "GET", ":scheme", "https", ":authority", "h1.test", ":path", "/bytes?n=5"}
	for i := 0; i < len(base); i += 2 {
		replaced := false
		for j := 0; j < len(fields); j += 2 {
			if fields[j] == base[i] {
				replaced = true
			}
		}
		if !replaced {
			h.enc.WriteField(hpack.HeaderField{Name: base[i], Value: base[i+1]})
		}
	}
	for i := 0; i < len(fields); i += 2 {
		h.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.hbuf.Bytes(), EndStream: end, EndHeaders: true}); err != nil {
		h.t.Fatal(err)
	}
}

// until reads frames (acknowledging SETTINGS) until match says stop.
func (h *h2Raw) until(what string, match func(http2.Frame) bool) {
	h.t.Helper()
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.t.Fatalf("waiting for %s: %v", what, err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			h.fr.WriteSettingsAck()
		}
		if match(f) {
			return
		}
	}
}

func (h *h2Raw) expectGoAway(code http2.ErrCode) {
	h.t.Helper()
	h.until(fmt.Sprintf("GOAWAY %v", code), func(f http2.Frame) bool {
		ga, ok := f.(*http2.GoAwayFrame)
		if ok && ga.ErrCode != code {
			h.t.Fatalf("GOAWAY %v, want %v", ga.ErrCode, code)
		}
		return ok
	})
}

// expectAnswer reads stream id's response to its end; status, body.
func (h *h2Raw) expectAnswer(id uint32) (string, string) {
	h.t.Helper()
	var status string
	var body []byte
	h.until(fmt.Sprintf("the answer on stream %d", id), func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if f.StreamID == id {
				if s := f.PseudoValue("status"); s != "" {
					status = s
				}
				return f.StreamEnded()
			}
		case *http2.DataFrame:
			if f.StreamID == id {
				body = append(body, f.Data()...)
				return f.StreamEnded()
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				h.t.Fatalf("stream %d reset: %v", id, f.ErrCode)
			}
		case *http2.GoAwayFrame:
			h.t.Fatalf("GOAWAY %v while waiting for stream %d", f.ErrCode, id)
		}
		return false
	})
	return status, string(body)
}

// TestH2ProtocolErrors: frames that break the protocol end the stream
// (RST_STREAM) or the connection (GOAWAY) as RFC 9113 says, and a stream
// error leaves the connection serving.
func TestH2ProtocolErrors(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t))

	t.Run("ping", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.fr.WritePing(false, [8]byte{1, 2, 3})
		h.until("PING ack", func(f http2.Frame) bool {
			p, ok := f.(*http2.PingFrame)
			return ok && p.IsAck() && p.Data == [8]byte{1, 2, 3}
		})
	})
	t.Run("bad header is a stream error", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.headers(1, true, "connection", "keep-alive")
		h.until("RST_STREAM PROTOCOL_ERROR", func(f http2.Frame) bool {
			rst, ok := f.(*http2.RSTStreamFrame)
			return ok && rst.StreamID == 1 && rst.ErrCode == http2.ErrCodeProtocol
		})
		h.headers(3, true)
		if status, body := h.expectAnswer(3); status != "200" || body != string(patternBytes(5)) {
			t.Fatalf("after a stream error: %s %q", status, body)
		}
	})
	t.Run("missing :path", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.hbuf.Reset()
		h.enc.WriteField(hpack.HeaderField{Name: ":method", Value: "GET"})
		h.enc.WriteField(hpack.HeaderField{Name: ":scheme", Value: "https"})
		h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: h.hbuf.Bytes(), EndStream: true, EndHeaders: true})
		h.until("RST_STREAM", func(f http2.Frame) bool {
			rst, ok := f.(*http2.RSTStreamFrame)
			return ok && rst.StreamID == 1
		})
	})
	t.Run("data on an idle stream", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.fr.WriteData(5, true, []byte("x"))
		h.expectGoAway(http2.ErrCodeProtocol)
	})
	t.Run("even stream id", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.headers(2, true)
		h.expectGoAway(http2.ErrCodeProtocol)
	})
	t.Run("window overflow", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.fr.WriteWindowUpdate(0, 1<<31-1)
		h.expectGoAway(http2.ErrCodeFlowControl)
	})
	t.Run("stream window overflow", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.headers(1, true, ":path", "/slow")
		h.until("the slow answer's head", func(f http2.Frame) bool {
			mh, ok := f.(*http2.MetaHeadersFrame)
			return ok && mh.StreamID == 1
		})
		h.fr.WriteWindowUpdate(1, 1<<31-1)
		h.until("RST_STREAM FLOW_CONTROL_ERROR", func(f http2.Frame) bool {
			rst, ok := f.(*http2.RSTStreamFrame)
			return ok && rst.StreamID == 1 && rst.ErrCode == http2.ErrCodeFlowControl
		})
	})
	t.Run("reset during an upload", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.headers(1, false, ":method", "POST", ":path", "/sha", "content-length", "100000")
		h.fr.WriteData(1, false, make([]byte, 1000))
		h.fr.WriteRSTStream(1, http2.ErrCodeCancel)
		// The connection serves on; the upstream request was ended (else
		// the relay's stop below would wait for it).
		h.headers(3, true)
		if status, _ := h.expectAnswer(3); status != "200" {
			t.Fatalf("after a reset upload: %s", status)
		}
	})
	t.Run("body longer than content-length", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.headers(1, false, ":method", "POST", ":path", "/sha", "content-length", "3")
		h.fr.WriteData(1, true, []byte("four"))
		h.until("RST_STREAM PROTOCOL_ERROR", func(f http2.Frame) bool {
			rst, ok := f.(*http2.RSTStreamFrame)
			return ok && rst.StreamID == 1 && rst.ErrCode == http2.ErrCodeProtocol
		})
	})
	t.Run("bad preface", func(t *testing.T) {
		c, err := r.dialTLS(t, "h1.test", r.ca.pool, "h2")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: h1.test\r\n\r\n")
		if _, err := io.ReadAll(c); err != nil && !errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "reset") {
			t.Fatalf("connection with a bad preface: %v, want it closed", err)
		}
	})
}

// TestH2RefusesStreamsOverTheLimit: streams beyond the advertised
// SETTINGS_MAX_CONCURRENT_STREAMS are refused (REFUSED_STREAM, safe to
// retry), the others answered.
func TestH2RefusesStreamsOverTheLimit(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	defer close(release)
	r, _ := h1Relay(t, up.URL)
	h := dialH2Raw(t, r)
	const n = h2MaxStreams + 10
	for i := range n {
		h.headers(uint32(2*i+1), true, ":path", "/")
	}
	refused := 0
	h.until("REFUSED_STREAM for every stream over the limit", func(f http2.Frame) bool {
		if rst, ok := f.(*http2.RSTStreamFrame); ok {
			if rst.ErrCode != http2.ErrCodeRefusedStream {
				t.Fatalf("stream %d reset with %v", rst.StreamID, rst.ErrCode)
			}
			refused++
		}
		return refused == n-h2MaxStreams
	})
}

// TestH2DrainAndIdle: a drain sends GOAWAY and lets the stream in flight
// finish; a connection without streams for the idle timeout is closed
// with GOAWAY.
func TestH2DrainAndIdle(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t), func(c *config.Config) { c.Limits.IdleTimeout = config.Duration(time.Second) })

	idle := dialH2Raw(t, r)
	idle.headers(1, true)
	idle.expectAnswer(1)
	idle.expectGoAway(http2.ErrCodeNo) // after a second without streams
	if _, err := idle.fr.ReadFrame(); err == nil {
		t.Error("connection open after its idle GOAWAY")
	}

	busy := dialH2Raw(t, r)
	busy.headers(1, true, ":path", "/slow")
	busy.until("the slow answer's head", func(f http2.Frame) bool {
		mh, ok := f.(*http2.MetaHeadersFrame)
		return ok && mh.StreamID == 1
	})
	stopped := make(chan struct{})
	go func() { r.stopWithin(t, 10*time.Second); close(stopped) }()
	var body []byte
	sawGoAway := false
	busy.until("the slow answer's end", func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			sawGoAway = true
			if f.LastStreamID != 1 {
				t.Errorf("GOAWAY last stream %d, want 1", f.LastStreamID)
			}
		case *http2.DataFrame:
			body = append(body, f.Data()...)
			return f.StreamEnded()
		}
		return false
	})
	if !sawGoAway || string(body) != "done" {
		t.Errorf("drain: GOAWAY seen %v, body %q; want GOAWAY, then the stream finished with %q", sawGoAway, body, "done")
	}
	<-stopped
}

// TestH2Curl: curl (nghttp2) as the client, over h2.
func TestH2Curl(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl not installed (scripts/deps.sh installs it)")
	}
	r, _ := h1Relay(t, bulkUpstream(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	host, port := "h1.test", strconv.Itoa(r.HTTPSAddr().(*net.TCPAddr).Port)
	out, err := exec.CommandContext(ctx, "curl", "-sS", "--http2", "-k", "-w", " %{http_version} %{http_code}",
		"--resolve", host+":"+port+":127.0.0.1", "--data-binary", "hello h2",
		"https://"+host+":"+port+"/sha").CombinedOutput()
	sum := sha256.Sum256([]byte("hello h2"))
	want := fmt.Sprintf("8 %x 2 200", sum)
	if err != nil || string(out) != want {
		t.Fatalf("curl: %q (%v), want %q", out, err, want)
	}
}
