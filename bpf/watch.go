//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Errors of Held.Check, wrapped with the pins or link concerned.
var (
	// ErrPinsGone: pins are missing (bpffs unmounted, the directory removed).
	ErrPinsGone = errors.New("pins gone")
	// ErrDetached: the sk_lookup link is pinned but no longer attached to
	// the network namespace (bpftool link detach, the namespace recreated).
	ErrDetached = errors.New("sk_lookup link detached")
	// ErrVerdictGone: the sockmap splice verdict is no longer attached to
	// its SOCKHASH.
	ErrVerdictGone = errors.New("sockmap verdict detached")
)

// heldObj is one pinned object whose fd Held keeps, with its pin's owner
// and mode, so that it can be pinned again as it was.
type heldObj struct {
	name     string
	m        *ebpf.Map
	l        link.Link
	uid, gid int
	mode     os.FileMode
}

func (o *heldObj) close() {
	if o.m != nil {
		o.m.Close()
	}
	if o.l != nil {
		o.l.Close()
	}
}

func (o *heldObj) repin(dir string) error {
	path := filepath.Join(dir, o.name)
	var err error
	// Unpin forgets the stale path (its file is gone), or Pin would think
	// the object pinned there already.
	if o.m != nil {
		o.m.Unpin()
		err = o.m.Pin(path)
	} else {
		o.l.Unpin()
		err = o.l.Pin(path)
	}
	if err != nil {
		return fmt.Errorf("pin %s again: %w", o.name, err)
	}
	if err := os.Chown(path, o.uid, o.gid); err != nil {
		return fmt.Errorf("chown pin %s: %w", o.name, err)
	}
	return os.Chmod(path, o.mode)
}

// Held keeps file descriptors of everything pinned in a pin directory:
// the objects then outlive their pins (a bpffs unmounted under a running
// watcher keeps the sk_lookup link attached and the relay's registered
// listeners in their map), and Repair can pin the same objects again.
type Held struct {
	dir  string
	objs []*heldObj // in pin order: the link last
}

// linkPins are the pins that hold links; the others hold maps.
var linkPins = []string{pinLink, pinAcctLink}

// steerPins are the pins of sk_lookup steering proper (accounting is best effort).
var steerPins = []string{pinListeners, pinPorts, pinCounters, pinLink}

// Hold opens every pin present in pinDir. ErrNotLoaded when the steering
// link is not pinned there.
func Hold(pinDir string) (*Held, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	h := &Held{dir: pinDir}
	names := slices.Concat([]string{pinListeners, pinPorts, pinCounters}, splicePins, []string{pinAcctPorts, pinAcct, pinAcctConfig, pinAcctLink, pinLink})
	for _, name := range names {
		path := filepath.Join(pinDir, name)
		fi, err := os.Stat(path)
		if errors.Is(err, os.ErrNotExist) {
			if name == pinLink {
				h.Close()
				return nil, ErrNotLoaded
			}
			continue
		}
		if err != nil {
			h.Close()
			return nil, fmt.Errorf("stat pin %s: %w", name, err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		o := &heldObj{name: name, uid: int(st.Uid), gid: int(st.Gid), mode: fi.Mode().Perm()}
		if slices.Contains(linkPins, name) {
			o.l, err = link.LoadPinnedLink(path, nil)
		} else {
			o.m, err = ebpf.LoadPinnedMap(path, nil)
		}
		if err != nil {
			h.Close()
			return nil, fmt.Errorf("open pin %s: %w", name, err)
		}
		h.objs = append(h.objs, o)
	}
	return h, nil
}

// Close releases the descriptors (pinned objects stay).
func (h *Held) Close() {
	for _, o := range h.objs {
		o.close()
	}
	h.objs = nil
}

func (h *Held) get(name string) *heldObj {
	for _, o := range h.objs {
		if o.name == name {
			return o
		}
	}
	return nil
}

// HasSplice reports whether the sockmap splice was loaded when held.
func (h *Held) HasSplice() bool { return h.get(pinSpliceSocks) != nil }

func (h *Held) missing(names []string) []string {
	var out []string
	for _, n := range names {
		if h.get(n) == nil {
			continue
		}
		if _, err := os.Lstat(filepath.Join(h.dir, n)); err != nil {
			out = append(out, n)
		}
	}
	return out
}

// Check reports what is wrong with the held steering (nil: whole) and
// with the sockmap splice (nil also when it is not loaded). It costs a
// few stat calls and two bpf syscalls, no loading.
func (h *Held) Check() (steer, splice error) {
	var errs []error
	if m := h.missing(steerPins); len(m) > 0 {
		errs = append(errs, fmt.Errorf("%w: %v from %s", ErrPinsGone, m, h.dir))
	}
	if l := h.get(pinLink); l != nil {
		info, err := l.l.Info()
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("read sk_lookup link info: %w", err))
		case info.NetNs() != nil && info.NetNs().NetnsInode == 0:
			errs = append(errs, ErrDetached)
		}
	}
	steer = errors.Join(errs...)
	if !h.HasSplice() {
		return steer, nil
	}
	errs = nil
	if m := h.missing(splicePins); len(m) > 0 {
		errs = append(errs, fmt.Errorf("%w: %v from %s", ErrPinsGone, m, h.dir))
	}
	if ok, err := h.verdictAttached(); err == nil && !ok {
		errs = append(errs, ErrVerdictGone)
	}
	return steer, errors.Join(errs...)
}

func (h *Held) verdictAttached() (bool, error) {
	res, err := link.QueryPrograms(link.QueryOptions{Target: h.get(pinSpliceSocks).m.FD(), Attach: ebpf.AttachSkSKBStreamVerdict})
	if err != nil {
		return false, err // old kernel: no query on sockmaps; pins are all we check
	}
	return len(res.Programs) > 0, nil
}

// Repair puts back what Check found missing: the pins of the held
// objects (mounting bpffs first if needed), a new sk_lookup link on netns
// (default this process's) for a detached one, the splice verdict. The
// objects are the same, so registered sockets and counters stay.
func (h *Held) Repair(netns string) error {
	if netns == "" {
		netns = "/proc/self/ns/net"
	}
	if l := h.get(pinLink); l != nil {
		if info, err := l.l.Info(); err == nil && info.NetNs() != nil && info.NetNs().NetnsInode == 0 {
			if err := h.relink(netns); err != nil {
				return err
			}
		}
	}
	if m := h.missing(namesOf(h.objs)); len(m) > 0 {
		if err := ensureBPFFS(h.dir); err != nil {
			return err
		}
		if err := os.MkdirAll(h.dir, 0o755); err != nil {
			return fmt.Errorf("create pin dir: %w", err)
		}
		os.Chmod(h.dir, 0o755)
		for _, o := range h.objs { // link last: its pin means "complete"
			if slices.Contains(m, o.name) && o.name != pinLink {
				if err := o.repin(h.dir); err != nil {
					return err
				}
			}
		}
		if slices.Contains(m, pinLink) {
			if err := h.get(pinLink).repin(h.dir); err != nil {
				return err
			}
		}
	}
	if h.HasSplice() {
		if ok, err := h.verdictAttached(); err == nil && !ok {
			if err := h.reattachVerdict(); err != nil {
				return err
			}
		}
	}
	return nil
}

func namesOf(objs []*heldObj) []string {
	var out []string
	for _, o := range objs {
		out = append(out, o.name)
	}
	return out
}

// relink loads the steering program onto the held maps, attaches it to
// netns and pins the new link in place of the detached one.
func (h *Held) relink(netns string) error {
	spec, err := loadSteer()
	if err != nil {
		return fmt.Errorf("load BPF object: %w", err)
	}
	maps := map[string]*ebpf.Map{}
	for _, n := range []string{pinListeners, pinPorts, pinCounters} {
		o := h.get(n)
		if o == nil {
			return fmt.Errorf("re-attach sk_lookup: map %s not held", n)
		}
		maps[n] = o.m
	}
	var objs steerObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return fmt.Errorf("load sk_lookup program: %w", err)
	}
	defer objs.Close()
	ns, err := os.Open(netns)
	if err != nil {
		return fmt.Errorf("open network namespace: %w", err)
	}
	defer ns.Close()
	var nl link.Link
	nl, err = link.AttachNetNs(int(ns.Fd()), objs.Steer)
	if err != nil {
		return fmt.Errorf("attach sk_lookup to the network namespace: %w", err)
	}
	old := h.get(pinLink)
	path := filepath.Join(h.dir, pinLink)
	if _, err := os.Stat(filepath.Dir(path)); err == nil {
		tmp := path + "_new"
		os.Remove(tmp)
		if err := nl.Pin(tmp); err != nil {
			nl.Close()
			return fmt.Errorf("pin new sk_lookup link: %w", err)
		}
		if err := os.Rename(tmp, path); err != nil {
			nl.Unpin()
			nl.Close()
			return fmt.Errorf("pin new sk_lookup link: %w", err)
		}
		// The link now lives at path; tell the handle, then restore owner and mode.
		nl.Close()
		if nl, err = link.LoadPinnedLink(path, nil); err != nil {
			return fmt.Errorf("open new sk_lookup link: %w", err)
		}
		os.Chown(path, old.uid, old.gid)
		os.Chmod(path, old.mode)
	}
	old.l.Close()
	old.l = nl
	return nil
}

func (h *Held) reattachVerdict() error {
	spec, err := loadSplice()
	if err != nil {
		return fmt.Errorf("load BPF object: %w", err)
	}
	maps := map[string]*ebpf.Map{}
	for _, n := range splicePins {
		if o := h.get(n); o != nil {
			maps[n] = o.m
		}
	}
	var objs spliceObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return fmt.Errorf("load sockmap splice verdict: %w", err)
	}
	defer objs.Close()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  h.get(pinSpliceSocks).m.FD(),
		Program: objs.SpliceVerdict,
		Attach:  ebpf.AttachSkSKBStreamVerdict,
	}); err != nil {
		return fmt.Errorf("attach sockmap splice verdict: %w", err)
	}
	return nil
}
