package filewatch

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

const mask = unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM

func start(abs string, c chan struct{}) (func(), error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify_init1: %w", err)
	}
	dir, base := filepath.Dir(abs), filepath.Base(abs)
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	// A non-blocking fd goes to Go's poller: Read parks the goroutine,
	// Close wakes it.
	f := os.NewFile(uintptr(fd), "inotify")
	go func() {
		defer close(c)
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			if match(buf[:n], base) {
				notify(c)
			}
		}
	}()
	return func() { f.Close() }, nil
}

// match reports whether events in b concern the file base (or were lost
// to an overflow). Fields are decoded, never cast: b need not be aligned.
func match(b []byte, base string) bool {
	const hdr = unix.SizeofInotifyEvent // wd, mask, cookie, len: 4 bytes each
	hit := false
	for len(b) >= hdr {
		m := binary.NativeEndian.Uint32(b[4:8])
		n := int(binary.NativeEndian.Uint32(b[12:16]))
		if n > len(b)-hdr {
			return true // torn: assume a change
		}
		name := b[hdr : hdr+n]
		for len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		if m&unix.IN_Q_OVERFLOW != 0 || string(name) == base {
			hit = true
		}
		b = b[hdr+n:]
	}
	return hit
}
