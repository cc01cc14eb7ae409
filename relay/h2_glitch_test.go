package relay

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Flooder writes one flood on its own Framer (the reader's acks must
// not interleave with it).
type h2Flooder struct {
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func (w *h2Flooder) headers(id uint32, end bool, fields ...string) error {
	w.hbuf.Reset()
	base := map[string]string{":method": "GET", ":scheme": "https", ":authority": "h1.test", ":path": "/bytes?n=5"}
	for i := 0; i < len(fields); i += 2 {
		base[fields[i]] = fields[i+1]
	}
	for _, k := range []string{":method", ":scheme", ":authority", ":path"} {
		w.enc.WriteField(hpack.HeaderField{Name: k, Value: base[k]})
		delete(base, k)
	}
	for k, v := range base {
		w.enc.WriteField(hpack.HeaderField{Name: k, Value: v})
	}
	return w.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: w.hbuf.Bytes(), EndStream: end, EndHeaders: true})
}

// h2Floods are the abusive patterns the glitch budget cuts: each writes
// its frames until the connection fails (bounded: 100,000 rounds).
var h2Floods = map[string]func(w *h2Flooder, i int) error{
	"rapid reset": func(w *h2Flooder, i int) error {
		id := uint32(2*i + 1)
		if err := w.headers(id, true); err != nil {
			return err
		}
		return w.fr.WriteRSTStream(id, http2.ErrCodeCancel)
	},
	"empty data": func(w *h2Flooder, i int) error {
		if i == 0 {
			w.headers(1, false, ":method", "POST", ":path", "/sha")
		}
		return w.fr.WriteData(1, false, nil)
	},
	"ping":     func(w *h2Flooder, i int) error { return w.fr.WritePing(false, [8]byte{byte(i)}) },
	"settings": func(w *h2Flooder, i int) error { return w.fr.WriteSettings() },
	"window update 0": func(w *h2Flooder, i int) error {
		if i == 0 {
			w.headers(1, true, ":path", "/slow")
		}
		return w.fr.WriteWindowUpdate(1, 0)
	},
	"empty continuation": func(w *h2Flooder, i int) error {
		if i == 0 {
			if err := w.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndStream: true}); err != nil {
				return err
			}
		}
		return w.fr.WriteContinuation(1, false, nil)
	},
	"header blocks over the limit": func(w *h2Flooder, i int) error {
		// ~1.2 MB decoded (over h2MaxHeaderList) from ~600 bytes sent: one
		// 4 KB field, in the HPACK table after the first block, repeated
		// by index; split over HEADERS and CONTINUATION.
		w.hbuf.Reset()
		for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", "h1.test"}, {":path", "/"}} {
			w.enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		big := hpack.HeaderField{Name: "x-big", Value: strings.Repeat("b", 4000)}
		for range 300 {
			w.enc.WriteField(big)
		}
		b := w.hbuf.Bytes()
		id := uint32(2*i + 1)
		if err := w.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b[:len(b)/2], EndStream: true}); err != nil {
			return err
		}
		return w.fr.WriteContinuation(id, true, b[len(b)/2:])
	},
	"data on closed streams": func(w *h2Flooder, i int) error {
		if i == 0 {
			w.headers(1, false, ":method", "POST", ":path", "/sha", "content-length", "1")
			w.fr.WriteData(1, true, []byte("x"))
			time.Sleep(100 * time.Millisecond) // answered: closed
		}
		return w.fr.WriteData(1, false, []byte("x"))
	},
}

// flood runs pattern on a new connection; it returns the GOAWAY's code
// (or 0xffff when the connection ended without one).
func flood(t *testing.T, r *testRelay, pattern func(*h2Flooder, int) error) http2.ErrCode {
	c, err := r.dialTLS(t, "h1.test", r.ca.pool, "h2")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	w := &h2Flooder{fr: http2.NewFramer(c, nil)}
	w.fr.AllowIllegalWrites = true
	w.enc = hpack.NewEncoder(&w.hbuf)
	io.WriteString(c, http2.ClientPreface)
	w.fr.WriteSettings()
	w.fr.WriteSettingsAck() // for the relay's, unread
	go func() {
		for i := range 100000 {
			if pattern(w, i) != nil {
				return
			}
		}
	}()
	rd := http2.NewFramer(nil, c)
	for {
		f, err := rd.ReadFrame()
		if err != nil {
			return 0xffff
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			return ga.ErrCode
		}
	}
}

// TestH2GlitchFloodsAreCut: every flood pattern ends in GOAWAY
// ENHANCE_YOUR_CALM and a closed connection, counted, while another
// client's requests are served.
func TestH2GlitchFloodsAreCut(t *testing.T) {
	r, _ := h1Relay(t, bulkUpstream(t))
	for name, pattern := range h2Floods {
		t.Run(name, func(t *testing.T) {
			if code := flood(t, r, pattern); code != http2.ErrCodeEnhanceYourCalm {
				t.Errorf("flood ended with GOAWAY %v, want ENHANCE_YOUR_CALM", code)
			}
			other := dialH2Raw(t, r)
			other.headers(1, true)
			if status, _ := other.expectAnswer(1); status != "200" {
				t.Fatalf("another client after the flood: %s", status)
			}
		})
	}
	m := r.metricsText(t)
	if v := metricValue(m, `relay_limit_rejections_total{limit="h2_glitches"}`); v != float64(len(h2Floods)) {
		t.Errorf(`relay_limit_rejections_total{limit="h2_glitches"} = %v, want %d`, v, len(h2Floods))
	}
	for _, kind := range []string{"reset", "empty_frame", "ping", "settings", "window_update_zero", "closed_stream", "header_too_large"} {
		want := float64(h2GlitchBudget / 2)
		if kind == "header_too_large" { // each weighs h2HeaderGlitches
			want = float64(h2GlitchBudget / h2HeaderGlitches)
		}
		if v := metricValue(m, `relay_h2_glitches_total{kind="`+kind+`",route="h1.test"}`); v < want {
			t.Errorf("relay_h2_glitches_total kind %s = %v", kind, v)
		}
	}
}

// TestH2GlitchBudgetSparesBusyClients: Go's h2 client with many
// concurrent requests, a third of them canceled midway, and curl with
// many parallel requests over one connection are never cut.
func TestH2GlitchBudgetSparesBusyClients(t *testing.T) {
	up := bulkUpstream(t)
	r, _ := h1Relay(t, up)
	tr := h2Transport(r)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for i := range 600 {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			path := "/bytes?n=100000"
			if i%3 == 0 {
				path = "/slow"
				time.AfterFunc(time.Duration(rand.IntN(100))*time.Millisecond, cancel)
			}
			req, _ := http.NewRequestWithContext(ctx, "GET", "https://h1.test"+path, nil)
			resp, err := client.Do(req)
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			if err != nil && ctx.Err() == nil {
				mu.Lock()
				failed++
				mu.Unlock()
				t.Logf("request %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if failed > 0 {
		t.Errorf("%d requests not canceled by the client failed", failed)
	}
	if _, err := exec.LookPath("curl"); err == nil {
		host, port := "h1.test", strconv.Itoa(r.HTTPSAddr().(*net.TCPAddr).Port)
		args := []string{"-sS", "--http2", "-k", "-Z", "--parallel-max", "100", "--resolve", host + ":" + port + ":127.0.0.1", "-w", "%{http_code}\n", "-o", "/dev/null"}
		for i := range 300 {
			args = append(args, fmt.Sprintf("https://%s:%s/bytes?n=%d", host, port, 1000+i))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "curl", args...).CombinedOutput()
		if n := strings.Count(string(out), "200\n"); err != nil || n != 300 {
			t.Errorf("curl -Z: %d of 300 answered 200 (%v)\n%s", n, err, out)
		}
	}
	if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="h2_glitches"}`); v > 0 {
		t.Errorf("h2_glitches rejections %v, want 0", v)
	}
}
