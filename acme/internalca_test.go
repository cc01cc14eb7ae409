package acme

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestInternalCAServesVerifiableLeaves(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := OpenInternalCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, RootKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("root key mode %v, want 0600", fi.Mode().Perm())
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", fi.Mode().Perm())
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: ca.GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.RootPEM())
	for _, name := range []string{"a.home.test", "b.home.test"} {
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: name, RootCAs: roots})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		c.Close()
	}

	// Reopening keeps the same root; concurrent handshakes share one leaf.
	ca2, err := OpenInternalCA(dir)
	if err != nil || string(ca2.RootPEM()) != string(ca.RootPEM()) {
		t.Fatalf("reopen changed the root (err %v)", err)
	}
	var wg sync.WaitGroup
	leaves := make([]*tls.Certificate, 8)
	for i := range leaves {
		wg.Add(1)
		go func() { defer wg.Done(); leaves[i], _ = ca2.Leaf("c.test") }()
	}
	wg.Wait()
	for _, l := range leaves[1:] {
		if l != leaves[0] {
			t.Fatal("concurrent requests issued more than one leaf")
		}
	}
	if time.Until(leaves[0].Leaf.NotAfter) < 6*24*time.Hour {
		t.Errorf("leaf lifetime too short: %v", leaves[0].Leaf.NotAfter)
	}
}

func TestInternalCAConcurrentCreateMakesOneRoot(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	var wg sync.WaitGroup
	roots := make([]string, 4)
	for i := range roots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ca, err := OpenInternalCA(dir)
			if err == nil {
				roots[i] = string(ca.RootPEM())
			}
		}()
	}
	wg.Wait()
	for _, r := range roots {
		if r == "" || r != roots[0] {
			t.Fatal("concurrent opens did not agree on one root")
		}
	}
}

func TestInternalCACorruptIsNeverOverwritten(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := OpenInternalCA(dir); err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, RootKeyFile)
	os.WriteFile(keyPath, []byte("garbage"), 0o600)
	_, err := OpenInternalCA(dir)
	if err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("corrupt key: %v, want an error naming %s", err, dir)
	}
	if b, _ := os.ReadFile(keyPath); string(b) != "garbage" {
		t.Fatal("corrupt key file was overwritten")
	}
	os.Remove(filepath.Join(dir, RootCertFile))
	if _, err := OpenInternalCA(dir); err == nil || !strings.Contains(err.Error(), "incomplete") {
		t.Fatalf("missing cert: %v, want 'incomplete'", err)
	}
}

func TestFileSourceReloadsAndKeepsOldOnBadFiles(t *testing.T) {
	dir := t.TempDir()
	ca, _ := OpenInternalCA(filepath.Join(dir, "ca"))
	writePair := func(name string) {
		c, _ := ca.Leaf(name)
		certPEM, keyPEM := pemPair(t, c)
		WriteFileAtomic(filepath.Join(dir, "x.crt"), certPEM, 0o644)
		WriteFileAtomic(filepath.Join(dir, "x.key"), keyPEM, 0o600)
	}
	writePair("one.test")
	fs, err := NewFileSource(filepath.Join(dir, "x.crt"), filepath.Join(dir, "x.key"))
	if err != nil {
		t.Fatal(err)
	}
	fs.checkEvery = 0
	cn := func() string {
		c, _ := fs.GetCertificate(nil)
		return c.Leaf.Subject.CommonName
	}
	if cn() != "one.test" {
		t.Fatal(cn())
	}
	time.Sleep(10 * time.Millisecond)
	writePair("two.test")
	if cn() != "two.test" {
		t.Fatalf("after change: %s", cn())
	}
	os.WriteFile(filepath.Join(dir, "x.crt"), []byte("half-written"), 0o644)
	if cn() != "two.test" {
		t.Fatalf("bad file replaced the working certificate: %s", cn())
	}
	if _, err := NewFileSource(filepath.Join(dir, "x.crt"), filepath.Join(dir, "x.key")); err == nil {
		t.Fatal("NewFileSource accepted a broken certificate")
	}
}
