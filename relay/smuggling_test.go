package relay

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// countingUpstream records each request it sees and whether its body
// was read whole, and what it was.
type countingUpstream struct {
	mu     sync.Mutex
	n      int
	bodies []string
}

func (u *countingUpstream) start(t *testing.T) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.n++
		u.mu.Unlock()
		b, err := io.ReadAll(r.Body)
		u.mu.Lock()
		if err == nil {
			u.bodies = append(u.bodies, string(b))
		}
		u.mu.Unlock()
		io.WriteString(w, "ok")
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func (u *countingUpstream) seen() (int, []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n, append([]string(nil), u.bodies...)
}

// TestH1Smuggling: request heads an upstream could frame otherwise than
// the relay are refused with 400 and counted; the upstream never sees a request the client
// did not send, nor a body other than the client's.
func TestH1Smuggling(t *testing.T) {
	cases := map[string]string{
		"content-length and transfer-encoding": "POST / HTTP/1.1\r\nHost: h1.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: h1.test\r\n\r\n",
		"two content-lengths":                  "POST / HTTP/1.1\r\nHost: h1.test\r\nContent-Length: 4\r\nContent-Length: 30\r\n\r\nbodyGET /x HTTP/1.1\r\nHost: h1.test\r\n\r\n",
		"xchunked":                             "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: xchunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
		"chunked, identity":                    "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
		"space before colon":                   "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\nbody",
		"tab before colon":                     "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding\t: chunked\r\nContent-Length: 4\r\n\r\nbody",
		"obs-fold":                             "POST / HTTP/1.1\r\nHost: h1.test\r\nContent-Length: 4\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\nbody",
		"bare LF":                              "POST / HTTP/1.1\nHost: h1.test\nContent-Length: 4\n\nbody",
		"bare LF in a header":                  "POST / HTTP/1.1\r\nHost: h1.test\r\nX-A: a\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\nbody",
		"NUL in a value":                       "GET / HTTP/1.1\r\nHost: h1.test\r\nX-A: a\x00b\r\n\r\n",
		"CR in a value":                        "GET / HTTP/1.1\r\nHost: h1.test\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n",
		"absolute-form":                        "GET http://other.test/ HTTP/1.1\r\nHost: h1.test\r\n\r\n",
		"two hosts":                            "GET / HTTP/1.1\r\nHost: h1.test\r\nHost: other.test\r\n\r\n",
		"bad chunk size":                       "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\n\r\n0x4\r\nbody\r\n0\r\n\r\n",
		"negative chunk size":                  "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\n\r\n-4\r\nbody\r\n0\r\n\r\n",
		"huge chunk size":                      "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000000\r\nbody\r\n0\r\n\r\n",
		"chunk extension with bare LF":         "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\nbody\r\n0\r\n\r\n",
	}
	for name, raw := range cases {
		t.Run(name, func(t *testing.T) {
			up := &countingUpstream{}
			r, dial := h1Relay(t, up.start(t))
			c, br := dial()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(c, raw)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != 400 {
				t.Errorf("status %d, want 400", resp.StatusCode)
			}
			if _, err := http.ReadResponse(br, nil); err == nil {
				t.Errorf("a second answer: the rest was read as a request")
			}
			time.Sleep(50 * time.Millisecond) // a request on its way to the upstream arrives
			n, bodies := up.seen()
			if n > 1 {
				t.Errorf("upstream saw %d requests", n)
			}
			for _, b := range bodies {
				t.Errorf("upstream read a whole body %q", b)
			}
			m := r.metricsText(t)
			var total float64
			for _, reason := range []string{"smuggling", "malformed", "body"} {
				if v := metricValue(m, `relay_http_bad_requests_total{reason="`+reason+`",route="h1.test"}`); v > 0 {
					total += v
				}
			}
			if total != 1 {
				t.Errorf("relay_http_bad_requests_total: %v, want 1", total)
			}
		})
	}
	up := &countingUpstream{}
	r, dial := h1Relay(t, up.start(t))
	// Transfer codings other than a lone chunked are smuggling (not
	// net/http's 501): the upstream sees nothing.
	for _, te := range []string{"xchunked", "chunked, identity", "identity", "gzip, chunked", "chunked\r\nTransfer-Encoding: chunked"} {
		c, br := dial()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: "+te+"\r\n\r\n4\r\nbody\r\n0\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("TE %q: no answer: %v", te, err)
		}
		resp.Body.Close()
		c.Close()
		if resp.StatusCode != 400 {
			t.Errorf("TE %q: status %d, want 400", te, resp.StatusCode)
		}
	}
	if n, _ := up.seen(); n != 0 {
		t.Errorf("upstream saw %d requests with a bad Transfer-Encoding", n)
	}
	if v := metricValue(r.metricsText(t), `relay_http_bad_requests_total{reason="smuggling",route="h1.test"}`); v != 5 {
		t.Errorf("relay_http_bad_requests_total{reason=smuggling}: %v, want 5", v)
	}
	// A good request on a fresh connection still goes.
	c, br := dial()
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: h1.test\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nbody\r\n0\r\n\r\n")
	if resp, body := readResp(t, br, "POST"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("good chunked request: %d %q", resp.StatusCode, body)
	}
}

// TestH2DowngradeSmuggling: h2 requests that would be framed otherwise
// as HTTP/1.1 to the upstream are reset (PROTOCOL_ERROR) and counted; the
// upstream sees no body other than the client's.
func TestH2DowngradeSmuggling(t *testing.T) {
	up := &countingUpstream{}
	r, _ := h1Relay(t, up.start(t))
	type tc struct {
		fields []string
		data   string // DATA with END_STREAM after HEADERS when set
	}
	cases := map[string]tc{
		"content-length longer":  {[]string{":method", "POST", "content-length", "10"}, "body"},
		"content-length shorter": {[]string{":method", "POST", "content-length", "2"}, "body"},
		"connection":             {[]string{"connection", "close"}, ""},
		"transfer-encoding":      {[]string{":method", "POST", "transfer-encoding", "chunked"}, "4\r\nbody\r\n0\r\n\r\n"},
		"keep-alive":             {[]string{"keep-alive", "1"}, ""},
		"upgrade":                {[]string{"upgrade", "websocket"}, ""},
		"te gzip":                {[]string{"te", "gzip"}, ""},
		"CR in a value":          {[]string{"x-a", "a\rb"}, ""},
		"LF in a value":          {[]string{"x-a", "a\r\nTransfer-Encoding: chunked"}, ""},
		"NUL in a value":         {[]string{"x-a", "a\x00b"}, ""},
		"upper-case name":        {[]string{"X-A", "a"}, ""},
		"unknown pseudo-header":  {[]string{":foo", "a"}, ""},
		"pseudo after regular":   {[]string{"x-a", "a", ":status", "200"}, ""},
	}
	id := uint32(1)
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			h := dialH2Raw(t, r)
			h.headers(id, c.data == "", append([]string{":path", "/"}, c.fields...)...)
			if c.data != "" {
				h.fr.WriteData(id, true, []byte(c.data))
			}
			h.until("RST_STREAM PROTOCOL_ERROR", isReset(id, http2.ErrCodeProtocol))
		})
	}
	_, bodies := up.seen()
	for _, b := range bodies {
		if b != "" {
			t.Errorf("upstream read a whole body %q", b)
		}
	}
	if v := metricValue(r.metricsText(t), `relay_http_bad_requests_total{reason="h2",route="h1.test"}`); v < float64(len(cases)) {
		t.Errorf(`relay_http_bad_requests_total{reason="h2"} = %v, want %d`, v, len(cases))
	}
}
