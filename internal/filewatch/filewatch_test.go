package filewatch

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestWatch(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "relay.yaml")
	if err := os.WriteFile(path, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := New(path)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	expect := func(what string, want bool) {
		t.Helper()
		wait := 3 * time.Second // the poller (not Linux) looks every 2 s
		if !want {
			wait = 300 * time.Millisecond
		}
		select {
		case <-w.C:
			if !want {
				t.Fatalf("%s: a change was reported", what)
			}
		case <-time.After(wait):
			if want {
				t.Fatalf("%s: no change reported", what)
			}
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "other"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	expect("another file written", false)
	if err := os.WriteFile(path, []byte("bb"), 0o644); err != nil {
		t.Fatal(err)
	}
	expect("file written", true)
	for len(w.C) > 0 {
		<-w.C
	}
	tmp := filepath.Join(dir, ".relay.yaml.tmp")
	if err := os.WriteFile(tmp, []byte("ccc"), 0o644); err != nil {
		t.Fatal(err)
	}
	for len(w.C) > 0 {
		<-w.C
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	expect("file replaced by rename", true)
	w.Close()
	w.Close()
	select {
	case _, ok := <-w.C:
		for ok {
			_, ok = <-w.C
		}
	case <-time.After(3 * time.Second):
		t.Fatal("C not closed after Close")
	}
}
