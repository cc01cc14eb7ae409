//go:build linux

package bpf

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// TestHeldRepair: what Hold keeps survives its pins and a detached link;
// Repair pins the same maps again and attaches a new link on them.
func TestHeldRepair(t *testing.T) {
	inFreshNetns(t, func(pinDir string) {
		opts := Options{PinDir: pinDir, Ports: []Port{{443, SlotHTTPS}}, OwnerUID: 65534, OwnerGID: 65534, NetNS: "/proc/thread-self/ns/net"}
		if _, err := Apply(opts); err != nil {
			t.Errorf("apply: %v", err)
			return
		}
		defer Delete(pinDir)
		h, err := Hold(pinDir)
		if err != nil {
			t.Errorf("hold: %v", err)
			return
		}
		defer h.Close()
		if s, sp := h.Check(); s != nil || sp != nil {
			t.Errorf("fresh: %v %v", s, sp)
		}
		mapID := func() ebpf.MapID {
			m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinListeners), nil)
			if err != nil {
				t.Errorf("open listeners pin: %v", err)
				return 0
			}
			defer m.Close()
			info, _ := m.Info()
			id, _ := info.ID()
			return id
		}
		before := mapID()

		l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinLink), nil)
		if err != nil {
			t.Errorf("open link: %v", err)
			return
		}
		l.Detach()
		l.Close()
		if s, _ := h.Check(); !errors.Is(s, ErrDetached) {
			t.Errorf("after detach: %v, want ErrDetached", s)
		}
		if err := h.Repair("/proc/thread-self/ns/net"); err != nil {
			t.Errorf("repair detached: %v", err)
		}
		if s, _ := h.Check(); s != nil {
			t.Errorf("after re-attach: %v", s)
		}

		for _, n := range []string{pinListeners, pinLink, pinCounters} {
			os.Remove(filepath.Join(pinDir, n))
		}
		if s, _ := h.Check(); !errors.Is(s, ErrPinsGone) {
			t.Errorf("after removing pins: %v, want ErrPinsGone", s)
		}
		if err := h.Repair("/proc/thread-self/ns/net"); err != nil {
			t.Errorf("repair pins: %v", err)
		}
		if s, _ := h.Check(); s != nil {
			t.Errorf("after re-pin: %v", s)
		}
		if after := mapID(); after != before || after == 0 {
			t.Errorf("listeners map %d after repair, want the same map %d", after, before)
		}
		fi, err := os.Stat(filepath.Join(pinDir, pinListeners))
		if err != nil || fi.Mode().Perm() != 0o600 || fi.Sys().(*syscall.Stat_t).Uid != 65534 {
			t.Errorf("re-pinned listeners: %v %v, want nobody's, 0600", err, fi)
		}
		if st, err := Show(pinDir); err != nil || st.LinkID == 0 {
			t.Errorf("show after repair: %v %v", st, err)
		}
	})
}
