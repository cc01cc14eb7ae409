package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"github.com/relay-gw/relay/relay"
)

// TestSelftestProtocolRoutes: the selftest probes ssh, openvpn and silence
// routes through a running relay (in-process, on loopback).
func TestSelftestProtocolRoutes(t *testing.T) {
	banner := func(greeting string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					io.WriteString(c, greeting)
					c.SetReadDeadline(time.Now().Add(5 * time.Second))
					io.Copy(io.Discard, c)
				}()
			}
		}()
		return ln.Addr().String()
	}
	https, metrics := freePort(t), freePort(t)
	cfg := &config.Config{
		StateDir: t.TempDir(), UnknownSNI: "reject",
		Listen: config.Listen{HTTPS: fmt.Sprintf("127.0.0.1:%d", https), HTTP: "off", Metrics: fmt.Sprintf("127.0.0.1:%d", metrics)},
		Routes: []config.Route{
			{Protocol: "ssh", Passthrough: config.Upstreams{banner("SSH-2.0-fake\r\n")}},
			{Protocol: "openvpn", Passthrough: config.Upstreams{banner("")}},
			{Silence: config.Duration(300 * time.Millisecond), Passthrough: config.Upstreams{banner("220 fake smtp\r\n")}},
		},
	}
	cfg.ApplyDefaults()
	srv, err := relay.New(relay.Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", metrics))

	st := &selftest{cfg: cfg, target: "127.0.0.1", httpsP: strconv.Itoa(https), httpP: "80",
		dial: func(addr string) (net.Conn, error) { return net.DialTimeout("tcp", addr, 5*time.Second) }}
	for i := range cfg.Routes {
		p := st.probeProtocol(&cfg.Routes[i])
		for _, c := range p.Checks {
			if !c.OK {
				t.Errorf("%s: %s failed: %s (fix: %s)", p.Route, c.Name, c.Detail, c.Fix)
			}
		}
		if want := map[int]int{0: 3, 1: 2, 2: 3}[i]; len(p.Checks) != want {
			t.Errorf("%s: %d checks, want %d: %+v", p.Route, len(p.Checks), want, p.Checks)
		}
	}
}
