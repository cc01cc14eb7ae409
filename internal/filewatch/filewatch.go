// Package filewatch reports changes of one file. It watches the file's
// directory, not the file, because editors and config managers replace
// files by rename.
//
// On Linux it reads inotify events itself, decoding each field from the
// byte buffer: fsnotify v1.9/v1.10 casts a byte array on its stack to
// *unix.InotifyEvent, an unaligned 32-bit load that is SIGBUS on MIPS
// (seen under qemu-user for mips and mipsle; a real kernel may emulate the
// load, slowly, or may not). Elsewhere it polls the file's size and mtime.
//
//	w, err := filewatch.New("/etc/relay/relay.yaml")
//	if err != nil { ... } // reload with SIGHUP only
//	defer w.Close()
//	for range w.C { reload() } // C is closed when the watch ends
package filewatch

import (
	"path/filepath"
	"sync"
)

// Watch sends on C (buffered, coalescing) when the file may have changed.
type Watch struct {
	C    <-chan struct{}
	stop func()
	once sync.Once
}

// New watches path.
func New(path string) (*Watch, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	c := make(chan struct{}, 1)
	stop, err := start(abs, c)
	if err != nil {
		return nil, err
	}
	return &Watch{C: c, stop: stop}, nil
}

// Close ends the watch; C is closed soon after.
func (w *Watch) Close() { w.once.Do(w.stop) }

func notify(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
