package relay

import (
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"golang.org/x/net/http2"
)

// TestClientStopsReading: a terminate client that stops reading a large
// answer, or (h2) grants no flow-control window, is let go after
// limits.idle_timeout, and with it the upstream connection; before, it
// held both for ever. One that leaves mid-answer ends the upstream
// connection at once (before, the relay read the rest of the body).
func TestClientStopsReading(t *testing.T) {
	const size = 1 << 30 // more than every buffer on the way holds
	gone := make(chan struct{}, 4)
	addr := rawHTTPUpstream(t, func(_ int, c net.Conn, req *http.Request) bool {
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", size)
		buf := make([]byte, 64<<10)
		for n := 0; n < size; n += len(buf) {
			if _, err := c.Write(buf); err != nil {
				gone <- struct{}{}
				return false
			}
		}
		return false
	})
	r, dial := h1Relay(t, "http://"+addr, func(c *config.Config) { c.Limits.IdleTimeout = config.Duration(time.Second) })
	waitGone := func(t *testing.T) {
		t.Helper()
		select {
		case <-gone:
		case <-time.After(20 * time.Second):
			t.Fatal("the upstream connection is still held 20 s after the client stopped reading (idle timeout 1 s)")
		}
	}

	t.Run("h1", func(t *testing.T) {
		c, _ := dial()
		fmt.Fprintf(c, "GET /big HTTP/1.1\r\nHost: h1.test\r\n\r\n")
		waitGone(t) // and nothing read
	})
	t.Run("h1 client leaves", func(t *testing.T) {
		// The rest of the body must not be fetched for nobody.
		c, br := dial()
		fmt.Fprintf(c, "GET /big HTTP/1.1\r\nHost: h1.test\r\n\r\n")
		if _, err := http.ReadResponse(br, nil); err != nil {
			t.Fatal(err)
		}
		c.Close()
		waitGone(t)
	})
	t.Run("h2 socket", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
		h.fr.WriteWindowUpdate(0, 1<<31-1-65535)
		h.headers(1, true, ":path", "/big")
		waitGone(t) // and nothing read
	})
	t.Run("h2 window", func(t *testing.T) {
		h := dialH2Raw(t, r)
		h.headers(1, true, ":path", "/big")
		// Reads everything, grants no window beyond the first 64 KB.
		h.until("RST_STREAM on stream 1", func(f http2.Frame) bool {
			rst, ok := f.(*http2.RSTStreamFrame)
			if ok && rst.ErrCode != http2.ErrCodeCancel {
				t.Errorf("stream reset with %v, want CANCEL", rst.ErrCode)
			}
			return ok && rst.StreamID == 1
		})
		waitGone(t)
	})
}
