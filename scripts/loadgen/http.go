package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// getOn sends one HTTP/1.1 GET /small on an open connection and checks the
// response; the connection stays open (keep-alive).
func getOn(c *tls.Conn, host string) error {
	if _, err := fmt.Fprintf(c, "GET /small HTTP/1.1\r\nHost: %s\r\n\r\n", host); err != nil {
		return fmt.Errorf("send request: %w", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	defer resp.Body.Close()
	return checkSmall(resp)
}

func checkSmall(resp *http.Response) error {
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, smallBody) {
		return fmt.Errorf("GET /small: status %d, %d bytes: not the expected body", resp.StatusCode, len(body))
	}
	return nil
}

// client is an HTTPS client that sends every request for name to addr,
// speaking only proto ("h1" or "h2"), with up to conc keep-alive
// connections.
func client(addr, name, proto string, conc int) *http.Client {
	d := dialer()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		TLSClientConfig:     &tls.Config{ServerName: name, InsecureSkipVerify: true},
		MaxIdleConnsPerHost: conc,
		MaxConnsPerHost:     conc,
		IdleConnTimeout:     time.Minute,
	}
	var p http.Protocols
	if proto == "h2" {
		p.SetHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr.Protocols = &p
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// getLoad measures small HTTPS GETs per second over keep-alive
// connections: conc workers each loop on a request. With h1 that is conc
// connections; with h2 the requests share one connection as concurrent
// streams (a browser's behaviour).
func getLoad(addr, name, proto string, conc int, d time.Duration) Rate {
	c := client(addr, name, proto, conc)
	defer c.CloseIdleConnections()
	url := "https://" + name + "/small"
	get := func(int) error {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if want := map[string]int{"h1": 1, "h2": 2}[proto]; resp.ProtoMajor != want {
			return fmt.Errorf("got %s, want %s", resp.Proto, proto)
		}
		return checkSmall(resp)
	}
	// One request first, so h2 workers find the connection and share it
	// instead of racing to dial their own.
	if err := get(0); err != nil {
		return Rate{Errors: 1, FirstErr: err.Error()}
	}
	return load(conc, d, get)
}
