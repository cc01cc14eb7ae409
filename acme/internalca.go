package acme

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Internal CA files inside its directory (state_dir/ca).
const (
	RootCertFile = "root.pem"
	RootKeyFile  = "root.key"
	lockFile     = ".lock"
)

// Lifetimes: leaves are short so a leaked key matters little; they are
// re-issued from memory when a third of their life is left.
const (
	rootLifetime = 10 * 365 * 24 * time.Hour
	leafLifetime = 7 * 24 * time.Hour
)

// InternalCA is a local CA kept in a directory: a P-256 root created once
// (key 0600), and leaves issued on demand per name, cached in memory.
// Clients trust it by installing RootPath's certificate.
type InternalCA struct {
	dir  string
	root *x509.Certificate
	key  crypto.Signer
	pem  []byte

	mu       sync.Mutex
	leaves   map[string]*tls.Certificate
	inflight map[string]*sync.WaitGroup
}

// OpenInternalCA opens the CA in dir, creating it (dir 0700, root key
// 0600) on first use. Two processes opening a fresh dir at once create one
// root: creation holds an flock. A corrupt file is an error naming it;
// it is never overwritten.
func OpenInternalCA(dir string) (*InternalCA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create internal CA dir: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	certPath, keyPath := filepath.Join(dir, RootCertFile), filepath.Join(dir, RootKeyFile)
	_, errC := os.Stat(certPath)
	_, errK := os.Stat(keyPath)
	switch {
	case errors.Is(errC, os.ErrNotExist) && errors.Is(errK, os.ErrNotExist):
		if err := createRoot(certPath, keyPath); err != nil {
			return nil, err
		}
	case errors.Is(errC, os.ErrNotExist) || errors.Is(errK, os.ErrNotExist):
		return nil, fmt.Errorf("internal CA in %s is incomplete (one of %s, %s is missing); restore it from a backup, or remove both files to create a new CA (clients must then trust the new root)", dir, RootCertFile, RootKeyFile)
	}
	ca := &InternalCA{dir: dir, leaves: map[string]*tls.Certificate{}, inflight: map[string]*sync.WaitGroup{}}
	if ca.pem, err = os.ReadFile(certPath); err != nil {
		return nil, fmt.Errorf("read internal CA root: %w", err)
	}
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, fmt.Errorf("internal CA %s: %w; restore the files or remove both to create a new CA", dir, err)
	}
	if ca.root, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
		return nil, fmt.Errorf("internal CA %s: %w", certPath, err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok || !ca.root.IsCA {
		return nil, fmt.Errorf("internal CA %s: not a CA certificate with a signing key", certPath)
	}
	ca.key = signer
	return ca, nil
}

// lockDir takes an exclusive flock on dir/.lock.
func lockDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

func createRoot(certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate CA key: %w", err)
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(),
		Subject:               pkix.Name{CommonName: "relay internal CA (" + host + ")", Organization: []string{"relay"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(rootLifetime),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("create CA certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal CA key: %w", err)
	}
	// Key first: a crash between the two leaves "incomplete", which is
	// reported, never a certificate without its key silently replaced.
	if err := WriteFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return WriteFileAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func randSerial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// RootPEM returns the root certificate in PEM, for clients to trust.
func (ca *InternalCA) RootPEM() []byte { return ca.pem }

// RootPath returns the root certificate's file.
func (ca *InternalCA) RootPath() string { return filepath.Join(ca.dir, RootCertFile) }

// GetCertificate returns a leaf for the SNI name, issuing it on first use
// or when a third of its life is left. Issuance is local CPU work
// (one ECDSA signature), so it is fine during a handshake; concurrent
// handshakes for one name share one issuance.
func (ca *InternalCA) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := hello.ServerName
	if name == "" {
		return nil, errors.New("internal CA: client sent no server name (SNI)")
	}
	return ca.Leaf(name)
}

// Leaf returns the cached leaf for name, issuing one if needed.
func (ca *InternalCA) Leaf(name string) (*tls.Certificate, error) {
	for {
		ca.mu.Lock()
		if c := ca.leaves[name]; c != nil && time.Until(c.Leaf.NotAfter) > leafLifetime/3 {
			ca.mu.Unlock()
			return c, nil
		}
		if wg := ca.inflight[name]; wg != nil {
			ca.mu.Unlock()
			wg.Wait()
			continue
		}
		wg := &sync.WaitGroup{}
		wg.Add(1)
		ca.inflight[name] = wg
		ca.mu.Unlock()

		c, err := ca.issue(name)
		ca.mu.Lock()
		if err == nil {
			ca.leaves[name] = c
		}
		delete(ca.inflight, name)
		ca.mu.Unlock()
		wg.Done()
		return c, err
	}
}

func (ca *InternalCA) issue(name string) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate leaf key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(leafLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.root, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issue leaf for %s: %w", name, err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der, ca.root.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// Leaves returns the leaf certificates issued so far (for metrics).
func (ca *InternalCA) Leaves() []*x509.Certificate {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	out := make([]*x509.Certificate, 0, len(ca.leaves))
	for _, c := range ca.leaves {
		out = append(out, c.Leaf)
	}
	return out
}
