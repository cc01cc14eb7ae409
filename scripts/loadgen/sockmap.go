package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/relay-gw/relay/bpf"
	"golang.org/x/sys/unix"
)

// loadSockmap loads the sockmap splice into a private bpffs under dir, as
// `relayctl rules apply` would with splice: sockmap but steering no port,
// so the bench touches nothing else on the machine. The returned func
// removes it.
func loadSockmap(dir string) (func(), error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("needs root to load BPF programs")
	}
	if err := bpf.SpliceSupported(); err != nil {
		return nil, err
	}
	fs := filepath.Join(dir, "bpffs")
	if err := os.MkdirAll(fs, 0o755); err != nil {
		return nil, err
	}
	if err := unix.Mount("bpf", fs, "bpf", 0, "mode=0755"); err != nil {
		return nil, fmt.Errorf("mount bpffs: %w", err)
	}
	pins := filepath.Join(fs, "relay")
	if _, err := bpf.Apply(bpf.Options{PinDir: pins, Splice: true, OwnerUID: os.Getuid(), OwnerGID: os.Getgid()}); err != nil {
		unix.Unmount(fs, unix.MNT_DETACH)
		return nil, err
	}
	return func() {
		bpf.Delete(pins)
		unix.Unmount(fs, unix.MNT_DETACH)
	}, nil
}
