// Command loadgen is relay's benchmark tool: the upstream endpoints
// ("serve": a TLS sink/source/echo server, a plain HTTP server and a Go
// HTTPS server), clients that measure bulk throughput, request/response
// latency, new connections per second and HTTPS GETs per second, a holder
// of idle connections, and "bench", which runs every path (direct, the
// relay, the peer proxies) in one run. Results are JSON. Everything stays
// on loopback; counts and durations are bounded by flags.
//
// Typical use is `make bench` (scripts/bench.sh); by hand:
//
//	loadgen serve -addr 127.0.0.1:9443 -http 127.0.0.1:9080 &
//	loadgen bulk -addr 127.0.0.1:8443 -sni bench.test -size 1073741824 -dir down
//	loadgen get -addr 127.0.0.1:8443 -sni term.test -proto h2 -d 3s
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
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Protocol of the TLS endpoint after the handshake: the client sends one
// mode byte.
//
//	'U' upload:   client sends bytes then half-closes; server replies 8-byte count + 32-byte sha256
//	'D' download: client sends 8-byte n; server sends n bytes (pattern) and half-closes
//	'E' echo:     server echoes everything
//	'P' ping:     server replies "pong" and half-closes (connection-rate test)
func main() {
	log.SetFlags(0)
	log.SetPrefix("loadgen: ")
	if len(os.Args) < 2 {
		log.Fatal("usage: loadgen serve|bulk|rtt|conns|get|idle|bench|soak [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	if cmd == "bench" {
		benchMain(args)
		return
	}
	if cmd == "soak" {
		soakMain(args)
		return
	}
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:9443", "TLS address (serve: listen; others: connect)")
	sni := fs.String("sni", "bench.test", "server name")
	size := fs.Int64("size", 256<<20, "bulk: bytes to move")
	dir := fs.String("dir", "up", "bulk: up (client to server) or down")
	n := fs.Int("n", 1000, "rtt: round trips; idle: connections")
	conc := fs.Int("c", 32, "conns, get: concurrency")
	dur := fs.Duration("d", 3*time.Second, "conns, get: duration")
	proto := fs.String("proto", "h1", "get: h1 or h2")
	httpMode := fs.Bool("http", false, "idle: one HTTP/1.1 GET per connection (terminating proxies) instead of the echo protocol")
	httpAddr := fs.String("http-addr", "", "serve: also serve plain HTTP here (terminate upstream)")
	httpsAddr := fs.String("https-addr", "", "serve: also serve HTTPS (h1+h2, Go TLS) here (termination baseline)")
	certDir := fs.String("cert-dir", "", "serve: write cert.pem, key.pem and cert+key.pem here (for the peers' TLS)")
	fs.Parse(args)
	var err error
	switch cmd {
	case "serve":
		err = serve(*addr, *httpAddr, *httpsAddr, *certDir)
	case "bulk":
		var r BulkResult
		if r, err = bulk(*addr, *sni, *size, *dir); err == nil {
			emit(r)
		}
	case "rtt":
		var r Latency
		if r, err = rtt(*addr, *sni, *n); err == nil {
			emit(r)
		}
	case "conns":
		emit(conns(*addr, *sni, *conc, *dur))
	case "get":
		emit(getLoad(*addr, *sni, *proto, *conc, *dur))
	case "idle":
		err = idle(*addr, *sni, *n, *httpMode)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		log.Fatal(err)
	}
}

func emit(v any) {
	json.NewEncoder(os.Stdout).Encode(v)
}

// benchNames are the names in the endpoint's certificate: bench.test for
// passthrough routes, term.test for terminating ones.
var benchNames = []string{"bench.test", "term.test"}

func selfSigned(names []string) (cert tls.Certificate, certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cert, nil, nil, fmt.Errorf("generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return cert, nil, nil, fmt.Errorf("create certificate: %w", err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return cert, nil, nil, fmt.Errorf("marshal key: %w", err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, certPEM, keyPEM, nil
}

var pattern = func() []byte {
	b := make([]byte, 256<<10)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}()

// smallBody is what GET /small returns: small, fixed, checked by clients.
var smallBody = []byte("relay bench: a small response body, the same for every request and every path, 128 bytes long, checked by the client.......\n")

func listen(addr string) (net.Listener, error) {
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), "tcp", addr)
}

// serve runs the upstream endpoints until killed and prints one line,
// "ready", when all of them listen.
func serve(addr, httpAddr, httpsAddr, certDir string) error {
	cert, certPEM, keyPEM, err := selfSigned(benchNames)
	if err != nil {
		return err
	}
	if certDir != "" {
		for name, b := range map[string][]byte{"cert.pem": certPEM, "key.pem": keyPEM, "cert+key.pem": append(slices.Clone(certPEM), keyPEM...)} {
			if err := os.WriteFile(filepath.Join(certDir, name), b, 0o600); err != nil {
				return fmt.Errorf("write %s: %w", name, err)
			}
		}
	}
	tcfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	ln, err := listen(addr)
	if err != nil {
		return fmt.Errorf("listen tls endpoint: %w", err)
	}
	errc := make(chan error, 3)
	go func() {
		tln := tls.NewListener(ln, tcfg)
		for {
			c, err := tln.Accept()
			if err != nil {
				errc <- fmt.Errorf("accept: %w", err)
				return
			}
			go handle(c.(*tls.Conn))
		}
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(smallBody)
	})
	if httpAddr != "" {
		hl, err := listen(httpAddr)
		if err != nil {
			return fmt.Errorf("listen http: %w", err)
		}
		go func() { errc <- (&http.Server{Handler: mux}).Serve(hl) }()
	}
	if httpsAddr != "" {
		hl, err := listen(httpsAddr)
		if err != nil {
			return fmt.Errorf("listen https: %w", err)
		}
		srv := &http.Server{Handler: mux, TLSConfig: tcfg.Clone()}
		go func() { errc <- srv.ServeTLS(hl, "", "") }()
	}
	fmt.Println("ready")
	return <-errc
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

func dialer() *net.Dialer {
	d := &net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(false)
	return d
}

// dial opens a TLS connection with the client's defaults (as a browser
// would: Go offers X25519MLKEM768 and X25519 key shares). Certificates are
// not verified: what is checked is the bytes that arrive.
func dial(addr, name string) (*tls.Conn, error) {
	c, err := tls.DialWithDialer(dialer(), "tcp", addr, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	if err != nil {
		return nil, fmt.Errorf("dial %s (%s): %w", addr, name, err)
	}
	return c, nil
}

// BulkResult is one transfer. OK means every byte arrived intact.
type BulkResult struct {
	Dir     string  `json:"dir"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	Gbps    float64 `json:"gbit_s"`
	OK      bool    `json:"ok"`
}

func bulk(addr, name string, size int64, dir string) (BulkResult, error) {
	res := BulkResult{Dir: dir, Bytes: size}
	c, err := dial(addr, name)
	if err != nil {
		return res, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Minute))
	start := time.Now()
	if dir == "up" {
		c.Write([]byte{'U'})
		want, err := writeN(c, size)
		if err != nil {
			return res, fmt.Errorf("upload: %w", err)
		}
		c.CloseWrite()
		reply := make([]byte, 40)
		if _, err := io.ReadFull(c, reply); err != nil {
			return res, fmt.Errorf("read upload digest: %w", err)
		}
		res.OK = int64(binary.BigEndian.Uint64(reply)) == size && string(reply[8:]) == string(want[:])
	} else {
		c.Write(binary.BigEndian.AppendUint64([]byte{'D'}, uint64(size)))
		h := sha256.New()
		got, err := io.Copy(h, c)
		if err != nil {
			return res, fmt.Errorf("download: %w", err)
		}
		want, _ := writeN(io.Discard, size)
		res.OK = got == size && string(h.Sum(nil)) == string(want[:])
	}
	res.Seconds = time.Since(start).Seconds()
	res.Gbps = float64(size) * 8 / res.Seconds / 1e9
	return res, nil
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

// rtt measures 64-byte request/response round trips on one open connection.
func rtt(addr, name string, n int) (Latency, error) {
	c, err := dial(addr, name)
	if err != nil {
		return Latency{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	c.Write([]byte{'E'})
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	for i := 0; i < 50; i++ { // warm up
		c.Write(msg)
		io.ReadFull(c, buf)
	}
	ds := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		msg[0], msg[63] = byte(i), byte(i>>8)
		t := time.Now()
		c.Write(msg)
		if _, err := io.ReadFull(c, buf); err != nil {
			return Latency{N: len(ds)}, fmt.Errorf("echo: %w", err)
		}
		if string(buf) != string(msg) {
			return Latency{N: len(ds)}, errors.New("echo returned other bytes")
		}
		ds = append(ds, time.Since(t))
	}
	r := Latency{N: len(ds), OK: true}
	r.P50, r.P99 = percentiles(ds)
	return r, nil
}

// Rate is requests (or new connections) per second over a fixed duration,
// with per-request latency percentiles.
type Rate struct {
	Count    int64   `json:"count"`
	PerSec   float64 `json:"per_sec"`
	P50      float64 `json:"p50_us"`
	P99      float64 `json:"p99_us"`
	Errors   int64   `json:"errors"`
	FirstErr string  `json:"first_error,omitempty"`
	OK       bool    `json:"ok"`
}

// load runs op from conc goroutines for d and collects latencies.
func load(conc int, d time.Duration, op func(worker int) error) Rate {
	var count, errs atomic.Int64
	var mu sync.Mutex
	var all []time.Duration
	var first string
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local []time.Duration
			for time.Now().Before(deadline) {
				t := time.Now()
				if err := op(i); err != nil {
					if errs.Add(1) == 1 {
						mu.Lock()
						first = err.Error()
						mu.Unlock()
					}
					time.Sleep(time.Millisecond)
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
	el := time.Since(start)
	r := Rate{Count: count.Load(), PerSec: float64(count.Load()) / el.Seconds(), Errors: errs.Load(), FirstErr: first}
	r.OK = r.Errors == 0 && r.Count > 0
	r.P50, r.P99 = percentiles(all)
	return r
}

// conns measures new TLS connections per second: full handshake, one
// small exchange, close.
func conns(addr, name string, conc int, d time.Duration) Rate {
	return load(conc, d, func(int) error {
		c, err := dial(addr, name)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4)
		c.Write([]byte{'P'})
		if _, err = io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("ping: %w", err)
		}
		if string(buf) != "pong" {
			return errors.New("ping: wrong reply")
		}
		return nil
	})
}

// idle opens n connections, proves each works once, prints "ready N" and
// holds them until stdin closes or a signal arrives.
func idle(addr, name string, n int, httpMode bool) error {
	var cs []*tls.Conn
	for i := 0; i < n; i++ {
		c, err := dial(addr, name)
		if err != nil {
			return fmt.Errorf("idle conn %d: %w", i, err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if httpMode {
			err = getOn(c, name)
		} else {
			c.Write([]byte{'E', 'x'})
			b := make([]byte, 1)
			_, err = io.ReadFull(c, b)
		}
		if err != nil {
			return fmt.Errorf("idle conn %d: %w", i, err)
		}
		c.SetDeadline(time.Time{})
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
	return nil
}
