// Command loadgen is relay's benchmark tool: a TLS endpoint ("serve") and
// clients that measure bulk throughput, request/response latency, new
// connections per second and hold idle connections, against any TLS
// address (direct, through the relay, or through a peer proxy). Results are
// JSON on stdout. Everything stays on loopback; counts and durations are
// bounded by flags.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Protocol after the TLS handshake: the client sends one mode byte.
//
//	'U' upload:   client sends bytes then half-closes; server replies 8-byte count + 32-byte sha256
//	'D' download: client sends 8-byte n; server sends n bytes (pattern) and closes
//	'E' echo:     server echoes everything
//	'P' ping:     server replies "pong" and closes (connection-rate test)
func main() {
	if len(os.Args) < 2 {
		log.Fatal("usage: loadgen serve|bulk|rtt|conns|idle [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	if cmd == "bench" {
		benchMain(args)
		return
	}
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:9443", "TLS address")
	sni := fs.String("sni", "bench.test", "server name")
	size := fs.Int64("size", 256<<20, "bulk: bytes to move")
	dir := fs.String("dir", "up", "bulk: up (client to server) or down")
	n := fs.Int("n", 1000, "rtt: round trips; idle: connections")
	conc := fs.Int("c", 32, "conns: concurrency")
	dur := fs.Duration("d", 3*time.Second, "conns: duration")
	certOut := fs.String("cert-out", "", "serve: write the certificate PEM here")
	fs.Parse(args)
	switch cmd {
	case "serve":
		serve(*addr, *sni, *certOut)
	case "bulk":
		emit(bulk(*addr, *sni, *size, *dir))
	case "rtt":
		emit(rtt(*addr, *sni, *n))
	case "conns":
		emit(conns(*addr, *sni, *conc, *dur))
	case "idle":
		idle(*addr, *sni, *n)
	default:
		log.Fatalf("unknown command %q", cmd)
	}
}

func emit(v any) {
	json.NewEncoder(os.Stdout).Encode(v)
}

func selfSigned(name string) (tls.Certificate, []byte) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

var pattern = func() []byte {
	b := make([]byte, 256<<10)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}()

func serve(addr, name, certOut string) {
	cert, pemBytes := selfSigned(name)
	if certOut != "" {
		os.WriteFile(certOut, pemBytes, 0o644)
	}
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})
	fmt.Println("ready", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go handle(c.(*tls.Conn))
	}
}

func handle(c *tls.Conn) {
	defer c.Close()
	mode := make([]byte, 1)
	if _, err := io.ReadFull(c, mode); err != nil {
		return
	}
	switch mode[0] {
	case 'U':
		h := sha256.New()
		n, _ := io.Copy(h, c)
		out := binary.BigEndian.AppendUint64(nil, uint64(n))
		c.Write(h.Sum(out))
	case 'D':
		var b [8]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return
		}
		writeN(c, int64(binary.BigEndian.Uint64(b[:])))
		c.CloseWrite()
		io.Copy(io.Discard, c)
	case 'E':
		io.Copy(c, c)
	case 'P':
		c.Write([]byte("pong"))
		c.CloseWrite()
		io.Copy(io.Discard, c)
	}
}

func writeN(w io.Writer, n int64) (sum [32]byte, err error) {
	h := sha256.New()
	for n > 0 {
		chunk := pattern[:min(int64(len(pattern)), n)]
		if _, err = w.Write(chunk); err != nil {
			return
		}
		h.Write(chunk)
		n -= int64(len(chunk))
	}
	copy(sum[:], h.Sum(nil))
	return
}

func dial(addr, name string) (*tls.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(false)
	return tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
}

// BulkResult is one transfer. OK means every byte arrived intact.
type BulkResult struct {
	Dir     string  `json:"dir"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	Gbps    float64 `json:"gbit_s"`
	OK      bool    `json:"ok"`
}

func bulk(addr, name string, size int64, dir string) BulkResult {
	c, err := dial(addr, name)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	res := BulkResult{Dir: dir, Bytes: size}
	if dir == "up" {
		c.Write([]byte{'U'})
		want, err := writeN(c, size)
		if err != nil {
			log.Fatal(err)
		}
		c.CloseWrite()
		reply := make([]byte, 40)
		if _, err := io.ReadFull(c, reply); err != nil {
			log.Fatal(err)
		}
		res.OK = int64(binary.BigEndian.Uint64(reply)) == size && string(reply[8:]) == string(want[:])
	} else {
		c.Write(binary.BigEndian.AppendUint64([]byte{'D'}, uint64(size)))
		h := sha256.New()
		got, _ := io.Copy(h, c)
		want, _ := writeN(io.Discard, size)
		res.OK = got == size && string(h.Sum(nil)) == string(want[:])
	}
	res.Seconds = time.Since(start).Seconds()
	res.Gbps = float64(size) * 8 / res.Seconds / 1e9
	return res
}

// Latency is a distribution in microseconds.
type Latency struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_us"`
	P99 float64 `json:"p99_us"`
	OK  bool    `json:"ok"`
}

func percentiles(d []time.Duration) (p50, p99 float64) {
	if len(d) == 0 {
		return 0, 0
	}
	slices.Sort(d)
	us := func(x time.Duration) float64 { return float64(x.Nanoseconds()) / 1e3 }
	return us(d[len(d)/2]), us(d[len(d)*99/100])
}

func rtt(addr, name string, n int) Latency {
	c, err := dial(addr, name)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{'E'})
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	for i := 0; i < 50; i++ { // warm up
		c.Write(msg)
		io.ReadFull(c, buf)
	}
	ds := make([]time.Duration, 0, n)
	ok := true
	for i := 0; i < n; i++ {
		msg[0] = byte(i)
		t := time.Now()
		c.Write(msg)
		if _, err := io.ReadFull(c, buf); err != nil || buf[0] != byte(i) {
			ok = false
			break
		}
		ds = append(ds, time.Since(t))
	}
	r := Latency{N: len(ds), OK: ok && len(ds) == n}
	r.P50, r.P99 = percentiles(ds)
	return r
}

// ConnRate is new TLS connections per second (full handshake + one exchange).
type ConnRate struct {
	Conns  int64   `json:"conns"`
	PerSec float64 `json:"per_sec"`
	P50    float64 `json:"p50_us"`
	P99    float64 `json:"p99_us"`
	Errors int64   `json:"errors"`
	OK     bool    `json:"ok"`
}

func conns(addr, name string, conc int, d time.Duration) ConnRate {
	var count, errs atomic.Int64
	var mu sync.Mutex
	var all []time.Duration
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local []time.Duration
			buf := make([]byte, 4)
			for time.Now().Before(deadline) {
				t := time.Now()
				c, err := dial(addr, name)
				if err != nil {
					errs.Add(1)
					continue
				}
				c.Write([]byte{'P'})
				_, err = io.ReadFull(c, buf)
				c.Close()
				if err != nil || string(buf) != "pong" {
					errs.Add(1)
					continue
				}
				local = append(local, time.Since(t))
				count.Add(1)
			}
			mu.Lock()
			all = append(all, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	r := ConnRate{Conns: count.Load(), PerSec: float64(count.Load()) / d.Seconds(), Errors: errs.Load()}
	r.OK = r.Errors == 0 && r.Conns > 0
	r.P50, r.P99 = percentiles(all)
	return r
}

// idle opens n echo connections, proves each works once, prints "ready N"
// and holds them until stdin closes or a signal arrives.
func idle(addr, name string, n int) {
	var cs []*tls.Conn
	for i := 0; i < n; i++ {
		c, err := dial(addr, name)
		if err != nil {
			log.Fatalf("idle conn %d: %v", i, err)
		}
		c.Write([]byte{'E', 'x'})
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil {
			log.Fatalf("idle conn %d: %v", i, err)
		}
		cs = append(cs, c)
	}
	fmt.Println("ready", len(cs))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() { bufio.NewReader(os.Stdin).ReadString('\n'); close(done) }()
	select {
	case <-sig:
	case <-done:
	}
	for _, c := range cs {
		c.Close()
	}
}
