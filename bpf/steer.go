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
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// DefaultPinDir is where `rules apply` pins the steering state.
const DefaultPinDir = "/sys/fs/bpf/relay"

// Pin names inside the pin directory. The listeners map is the relay
// user's (0600): whoever can write it owns the steered ports of the whole
// network namespace. The link is root's.
const (
	pinListeners = "listeners"
	pinPorts     = "ports"
	pinCounters  = "counters"
	pinLink      = "link"
)

// Listener slots in the SOCKMAP.
const (
	SlotHTTPS uint32 = 0
	SlotHTTP  uint32 = 1
)

// ErrNotLoaded is returned when no steering is pinned in the directory.
var ErrNotLoaded = errors.New("BPF steering is not loaded (run `relayctl rules apply` with steer.bpf: auto or on)")

// Port is one steered destination port and the listener slot it goes to.
type Port struct {
	Port uint16
	Slot uint32
}

// Options for Apply.
type Options struct {
	PinDir   string // default DefaultPinDir
	Ports    []Port // e.g. {443, SlotHTTPS}, {80, SlotHTTP}
	OwnerUID int    // owner of the listeners pin (the relay user)
	OwnerGID int
	// NetNS is the network namespace to attach to; default this process's.
	NetNS string
	// Splice also loads the sockmap splice (`splice: sockmap`); without
	// it any loaded splice is removed.
	Splice bool
	// AcctPorts are the local ports whose accepted connections the kernel
	// accounts (sock_ops on Cgroup): the steered ports and the relay's
	// listen ports. Accounting is best effort: a failure is a warning.
	AcctPorts []uint16
	Cgroup    string // cgroup v2 directory to attach to; default its root
}

// Status is what is loaded.
type Status struct {
	PinDir  string         `json:"pin_dir"`
	LinkID  uint32         `json:"link_id"`
	ProgID  uint32         `json:"prog_id"`
	Ports   []PortCounters `json:"ports"`
	Updated bool           `json:"updated,omitempty"` // Apply replaced an existing program
	// Splice is the sockmap splice, when loaded.
	Splice *SpliceStatus `json:"splice,omitempty"`
	// Accounting is the kernel's per-port connection accounting, when loaded.
	Accounting []PortAccount `json:"accounting,omitempty"`
	// Warnings are parts that could not be loaded (steering itself works).
	Warnings []string `json:"warnings,omitempty"`
}

// SpliceStatus is the loaded sockmap splice and its kernel byte counters.
type SpliceStatus struct {
	UpstreamBytes   uint64 `json:"upstream_bytes"`
	DownstreamBytes uint64 `json:"downstream_bytes"`
}

// PortCounters are the sk_lookup counters of one port, summed over CPUs.
type PortCounters struct {
	Port        uint16 `json:"port"`
	Slot        uint32 `json:"slot"`
	Steered     uint64 `json:"steered"`
	NoSocket    uint64 `json:"no_socket"`
	AssignError uint64 `json:"assign_error"`
}

// Supported reports whether this kernel can run the steering program
// (sk_lookup programs, SOCKMAP), naming what is missing.
func Supported() error {
	if err := features.HaveProgramType(ebpf.SkLookup); err != nil {
		return fmt.Errorf("kernel lacks sk_lookup BPF programs (Linux 5.9+): %w", err)
	}
	if err := features.HaveMapType(ebpf.SockMap); err != nil {
		return fmt.Errorf("kernel lacks BPF SOCKMAP: %w", err)
	}
	return nil
}

// ensureBPFFS mounts a bpf filesystem at the parent of dir if none is there.
func ensureBPFFS(dir string) error {
	parent := filepath.Dir(dir)
	var st unix.Statfs_t
	if err := unix.Statfs(parent, &st); err == nil && uint32(st.Type) == uint32(unix.BPF_FS_MAGIC) {
		return nil
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", parent, err)
	}
	if err := unix.Mount("bpf", parent, "bpf", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w (mount it with `mount -t bpf bpf %s`)", parent, err, parent)
	}
	return nil
}

// Apply loads the sk_lookup program, attaches it to the network namespace
// and pins maps and link under opts.PinDir. Applying again keeps the maps
// (so a running relay's registered listeners stay) and swaps the program
// in place with a link update: steering never stops.
func Apply(opts Options) (*Status, error) {
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	if opts.NetNS == "" {
		opts.NetNS = "/proc/self/ns/net"
	}
	if err := ensureBPFFS(opts.PinDir); err != nil {
		return nil, err
	}
	spec, err := loadSteer()
	if err != nil {
		return nil, fmt.Errorf("load BPF object: %w", err)
	}
	if _, err := os.Stat(filepath.Join(opts.PinDir, pinLink)); err == nil {
		return update(opts, spec)
	}
	return install(opts, spec)
}

// install pins everything into a temporary directory on the bpffs, sets
// owners, and renames it into place: the pin directory is either absent
// or complete.
func install(opts Options, spec *ebpf.CollectionSpec) (*Status, error) {
	var objs steerObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("load sk_lookup program: %w", err)
	}
	defer objs.Close()
	if err := fillPorts(objs.Ports, opts.Ports); err != nil {
		return nil, err
	}
	ns, err := os.Open(opts.NetNS)
	if err != nil {
		return nil, fmt.Errorf("open network namespace: %w", err)
	}
	defer ns.Close()
	l, err := link.AttachNetNs(int(ns.Fd()), objs.Steer)
	if err != nil {
		return nil, fmt.Errorf("attach sk_lookup to the network namespace: %w", err)
	}
	defer l.Close()

	// bpffs names may not contain dots.
	tmp, err := os.MkdirTemp(filepath.Dir(opts.PinDir), filepath.Base(opts.PinDir)+"-tmp")
	if err != nil {
		return nil, fmt.Errorf("create pin dir: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	os.Chmod(tmp, 0o755)
	if err := pinAll(tmp, []pinned{
		{pinListeners, objs.Listeners.Pin, opts.OwnerUID, opts.OwnerGID, 0o600},
		{pinPorts, objs.Ports.Pin, 0, 0, 0o644},
		{pinCounters, objs.Counters.Pin, 0, 0, 0o644},
		{pinLink, l.Pin, 0, 0, 0o600},
	}); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, opts.PinDir); err != nil {
		return nil, fmt.Errorf("move pins into %s: %w", opts.PinDir, err)
	}
	ok = true
	if err := applySplice(opts.PinDir, opts.Splice, opts.OwnerUID, opts.OwnerGID); err != nil {
		return nil, err
	}
	warn := applyAccountOpts(opts)
	st, err := Show(opts.PinDir)
	if st != nil {
		st.Warnings = warn
	}
	return st, err
}

// update swaps the program of the pinned link and refreshes the ports.
func update(opts Options, spec *ebpf.CollectionSpec) (*Status, error) {
	maps, closeAll, err := openPinned(opts.PinDir, pinListeners, pinPorts, pinCounters)
	if err != nil {
		return nil, err
	}
	defer closeAll()
	var objs steerObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return nil, fmt.Errorf("load sk_lookup program: %w", err)
	}
	defer objs.Close()
	l, err := link.LoadPinnedLink(filepath.Join(opts.PinDir, pinLink), nil)
	if err != nil {
		return nil, fmt.Errorf("open pinned link: %w", err)
	}
	defer l.Close()
	if err := l.Update(objs.Steer); err != nil {
		return nil, fmt.Errorf("update sk_lookup program: %w", err)
	}
	if err := fillPorts(maps[pinPorts], opts.Ports); err != nil {
		return nil, err
	}
	// Ownership may have changed with the config's user.
	lp := filepath.Join(opts.PinDir, pinListeners)
	if err := os.Chown(lp, opts.OwnerUID, opts.OwnerGID); err != nil {
		return nil, fmt.Errorf("chown pin %s: %w", pinListeners, err)
	}
	if err := applySplice(opts.PinDir, opts.Splice, opts.OwnerUID, opts.OwnerGID); err != nil {
		return nil, err
	}
	warn := applyAccountOpts(opts)
	st, err := Show(opts.PinDir)
	if st != nil {
		st.Updated, st.Warnings = true, warn
	}
	return st, err
}

// applyAccountOpts loads or removes the accounting per opts; a failure
// is returned as a warning: steering works without it.
func applyAccountOpts(opts Options) []string {
	if len(opts.AcctPorts) == 0 {
		if err := removePins(opts.PinDir, acctPins); err != nil {
			return []string{"remove kernel connection accounting: " + err.Error()}
		}
		return nil
	}
	if err := applyAccount(opts.PinDir, opts.NetNS, opts.Cgroup, opts.AcctPorts); err != nil {
		removePins(opts.PinDir, acctPins)
		return []string{"kernel connection accounting (sock_ops) not loaded, the relay's own counters still work: " + err.Error()}
	}
	return nil
}

// fillPorts makes the ports map hold exactly want.
func fillPorts(m *ebpf.Map, want []Port) error {
	wanted := map[uint16]steerPortTarget{}
	for i, p := range want {
		wanted[p.Port] = steerPortTarget{Slot: p.Slot, Index: uint32(i)}
	}
	var k uint16
	var v steerPortTarget
	var stale []uint16
	it := m.Iterate()
	for it.Next(&k, &v) {
		if w, ok := wanted[k]; !ok || w != v {
			stale = append(stale, k)
		}
	}
	for _, k := range stale {
		if _, ok := wanted[k]; !ok {
			m.Delete(k)
		}
	}
	for p, t := range wanted {
		if err := m.Put(p, t); err != nil {
			return fmt.Errorf("set port %d: %w", p, err)
		}
	}
	return nil
}

// Delete detaches the program and removes every pin. Nothing loaded is
// not an error.
func Delete(pinDir string) error {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	if l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinLink), nil); err == nil {
		errs = append(errs, l.Unpin(), l.Close())
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("open pinned link: %w", err))
	}
	errs = append(errs, removePins(pinDir, slices.Concat([]string{pinListeners, pinPorts, pinCounters}, splicePins, acctPins)))
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Show reports the loaded state and counters (as root).
func Show(pinDir string) (*Status, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinLink), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNotLoaded
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned link: %w", err)
	}
	defer l.Close()
	st := &Status{PinDir: pinDir}
	if info, err := l.Info(); err == nil {
		st.LinkID, st.ProgID = uint32(info.ID), uint32(info.Program)
	}
	if up, down, err := ReadSplicedBytes(pinDir); err == nil {
		st.Splice = &SpliceStatus{UpstreamBytes: up, DownstreamBytes: down}
	} else if !errors.Is(err, ErrSpliceNotLoaded) {
		return st, err
	}
	if acct, err := ReadAccounting(pinDir); err == nil {
		st.Accounting = acct
	}
	c, err := openCounters(pinDir)
	if err != nil {
		return st, err
	}
	defer c.close()
	st.Ports, err = c.read()
	return st, err
}

// counterMaps are the read-only maps counters come from.
type counterMaps struct{ ports, counters *ebpf.Map }

func openCounters(pinDir string) (*counterMaps, error) {
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	p, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinPorts), ro)
	if err != nil {
		return nil, fmt.Errorf("open pinned ports: %w", err)
	}
	c, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinCounters), ro)
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("open pinned counters: %w", err)
	}
	return &counterMaps{p, c}, nil
}

func (c *counterMaps) close() { c.ports.Close(); c.counters.Close() }

func (c *counterMaps) read() ([]PortCounters, error) {
	var out []PortCounters
	var k uint16
	var t steerPortTarget
	it := c.ports.Iterate()
	for it.Next(&k, &t) {
		pc := PortCounters{Port: k, Slot: t.Slot}
		var per []steerCounters
		if err := c.counters.Lookup(t.Index, &per); err != nil {
			return nil, fmt.Errorf("read counters of port %d: %w", k, err)
		}
		for _, v := range per {
			pc.Steered += v.Steered
			pc.NoSocket += v.NoSocket
			pc.AssignError += v.AssignError
		}
		out = append(out, pc)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate ports: %w", err)
	}
	slices.SortFunc(out, func(a, b PortCounters) int { return int(a.Port) - int(b.Port) })
	return out, nil
}

// Steering is the relay's (unprivileged) handle on pinned steering: it
// registers listening sockets and reads counters. File permissions on the
// pins are all it needs.
type Steering struct {
	listeners *ebpf.Map
	counters  *counterMaps
	pinDir    string
}

// Open opens the pins in pinDir. ErrNotLoaded when there are none.
func Open(pinDir string) (*Steering, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	l, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinListeners), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNotLoaded
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned listeners map %s (is it owned by this user? `rules apply` chowns it to the config's user): %w", filepath.Join(pinDir, pinListeners), err)
	}
	c, err := openCounters(pinDir)
	if err != nil {
		l.Close()
		return nil, err
	}
	return &Steering{listeners: l, counters: c, pinDir: pinDir}, nil
}

// Register puts a listening TCP socket into slot. The socket must be
// plain TCP (not MPTCP) and should be dual-stack ([::]) to take IPv4 and
// IPv6 connections.
func (s *Steering) Register(slot uint32, conn syscall.Conn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) {
		uerr = s.listeners.Put(slot, uint64(fd))
	}); err != nil {
		return err
	}
	if uerr != nil {
		return fmt.Errorf("register listener in slot %d: %w", slot, uerr)
	}
	return nil
}

// Counters reads the per-port counters, summed over CPUs.
func (s *Steering) Counters() ([]PortCounters, error) { return s.counters.read() }

// Close releases the maps (registered sockets stay until they close).
func (s *Steering) Close() error {
	s.counters.close()
	return s.listeners.Close()
}
