// Command demo-upstream is the stand-in for the services behind the gateway
// in `make demo` and the benchmarks: a TLS server (what passthrough routes
// reach, with its own self-signed CA) and a plain HTTP server (what
// terminate routes proxy to). It is not part of the product.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	tlsAddr := flag.String("tls", "", "serve HTTPS here (passthrough target)")
	httpAddr := flag.String("http", "", "serve plain HTTP here (terminate target)")
	names := flag.String("names", "localhost", "comma-separated DNS names for the TLS certificate")
	caOut := flag.String("ca-out", "", "write the upstream's CA certificate (PEM) here")
	label := flag.String("label", "upstream", "name shown in responses")
	flag.Parse()
	if *tlsAddr == "" && *httpAddr == "" {
		log.Fatal("demo-upstream: give -tls and/or -http")
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		via := "plain HTTP (TLS ended at the relay)"
		if r.TLS != nil {
			via = fmt.Sprintf("TLS end to end (SNI %s)", r.TLS.ServerName)
		}
		fmt.Fprintf(w, "hello from %s: %s %s, %s\n", *label, r.Method, r.Host+r.URL.RequestURI(), via)
		for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"} {
			if v := r.Header.Get(h); v != "" {
				fmt.Fprintf(w, "  %s: %s\n", h, v)
			}
		}
	})
	errc := make(chan error, 2)
	if *httpAddr != "" {
		go func() { errc <- http.ListenAndServe(*httpAddr, handler) }()
	}
	if *tlsAddr != "" {
		cert, caPEM := selfSigned(strings.Split(*names, ","))
		if *caOut != "" {
			if err := os.WriteFile(*caOut, caPEM, 0o644); err != nil {
				log.Fatal(err)
			}
		}
		ln, err := net.Listen("tcp", *tlsAddr)
		if err != nil {
			log.Fatal(err)
		}
		srv := &http.Server{Handler: handler, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
		go func() { errc <- srv.ServeTLS(ln, "", "") }()
	}
	log.Fatal(<-errc)
}

// selfSigned returns a leaf for names and the PEM of the CA that signed it.
func selfSigned(names []string) (tls.Certificate, []byte) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "demo upstream CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(30 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		log.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(30 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		log.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
}
