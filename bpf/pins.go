//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// pinned is one object to pin, with the owner and mode of its pin.
type pinned struct {
	name     string
	pin      func(path string) error
	uid, gid int
	mode     os.FileMode
}

// pinAll pins each object under dir in order (put the one whose presence
// means "complete" last) and sets its owner and mode.
func pinAll(dir string, pins []pinned) error {
	for _, p := range pins {
		path := filepath.Join(dir, p.name)
		if err := p.pin(path); err != nil {
			return fmt.Errorf("pin %s: %w", p.name, err)
		}
		if err := os.Chown(path, p.uid, p.gid); err != nil {
			return fmt.Errorf("chown pin %s: %w", p.name, err)
		}
		if err := os.Chmod(path, p.mode); err != nil {
			return fmt.Errorf("chmod pin %s: %w", p.name, err)
		}
	}
	return nil
}

// openPinned opens the named map pins in dir, for MapReplacements: a
// re-apply loads new programs onto the maps already pinned, so what they
// hold (registered sockets, counters) stays. closeAll releases them.
func openPinned(dir string, names ...string) (maps map[string]*ebpf.Map, closeAll func(), err error) {
	maps = map[string]*ebpf.Map{}
	closeAll = func() {
		for _, m := range maps {
			m.Close()
		}
	}
	for _, name := range names {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("open pinned %s (remove %s to start over): %w", name, dir, err)
		}
		maps[name] = m
	}
	return maps, closeAll, nil
}

// removePins removes the named pins from dir; absent ones are fine.
func removePins(dir string, names []string) error {
	var errs []error
	for _, name := range names {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
