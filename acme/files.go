package acme

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// FileSource serves a certificate/key pair from files and picks up changes
// (certbot, step, a deploy hook) without a restart. A new pair that does
// not load is logged and the old one keeps serving.
type FileSource struct {
	certFile, keyFile string
	checkEvery        time.Duration

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   string // mtimes and sizes of both files when loaded
	checked time.Time
}

// NewFileSource loads the pair, failing if it does not load now.
func NewFileSource(certFile, keyFile string) (*FileSource, error) {
	f := &FileSource{certFile: certFile, keyFile: keyFile, checkEvery: 2 * time.Second}
	c, stamp, err := f.load()
	if err != nil {
		return nil, err
	}
	f.cert, f.stamp, f.checked = c, stamp, time.Now()
	return f, nil
}

func (f *FileSource) stampNow() string {
	var s string
	for _, p := range []string{f.certFile, f.keyFile} {
		if fi, err := os.Stat(p); err == nil {
			s += fmt.Sprintf("%d/%d;", fi.ModTime().UnixNano(), fi.Size())
		}
	}
	return s
}

func (f *FileSource) load() (*tls.Certificate, string, error) {
	stamp := f.stampNow()
	c, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		return nil, "", fmt.Errorf("load certificate %s with key %s: %w", f.certFile, f.keyFile, err)
	}
	if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
		return nil, "", fmt.Errorf("parse certificate %s: %w", f.certFile, err)
	}
	return &c, stamp, nil
}

// GetCertificate returns the current pair, reloading it first when the
// files changed (checked at most every couple of seconds: a stat, no I/O
// on the hot path otherwise).
func (f *FileSource) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if time.Since(f.checked) >= f.checkEvery {
		f.checked = time.Now()
		if st := f.stampNow(); st != f.stamp {
			c, stamp, err := f.load()
			if err != nil {
				// Half-written during a deploy, or broken: keep serving the
				// old pair; the next check retries.
				slog.Warn("certificate files changed but do not load; keeping the previous certificate", "cert", filepath.Clean(f.certFile), "err", err)
			} else {
				f.cert, f.stamp = c, stamp
				slog.Info("certificate reloaded", "cert", f.certFile, "not_after", c.Leaf.NotAfter)
			}
		}
	}
	return f.cert, nil
}

// WriteFileAtomic writes data to path via a temporary file in the same
// directory, fsync and rename, so readers see the old or the new content,
// never a mix.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Leaf returns the certificate being served (for metrics).
func (f *FileSource) Leaf() *x509.Certificate {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cert.Leaf
}
