//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Pins of the kernel connection accounting: counters are world-readable,
// the link root's.
const (
	pinAcctLink   = "acct_link"
	pinAcctPorts  = "acct_ports"
	pinAcct       = "acct"
	pinAcctConfig = "acct_config"
)

var acctPins = []string{pinAcctLink, pinAcctPorts, pinAcct, pinAcctConfig}

// cgroup2Root finds where the cgroup v2 hierarchy is mounted:
// /sys/fs/cgroup on unified systems, /sys/fs/cgroup/unified on hybrid
// ones. The accounting program attaches at its root, so it sees the relay
// wherever systemd or a shell put it; it filters by network namespace and
// port.
func cgroup2Root() (string, error) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy mounted (mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified`)")
}

// PortAccount is what the kernel counted for one port, summed over CPUs.
type PortAccount struct {
	Port     uint16 `json:"port"`
	Accepted uint64 `json:"accepted"`
	Closed   uint64 `json:"closed"`
	BytesIn  uint64 `json:"bytes_in"`  // from clients, closed connections
	BytesOut uint64 `json:"bytes_out"` // to clients (acknowledged), closed connections
}

// netnsCookie is the cookie of the network namespace at path, which must
// be the calling thread's (rules apply runs inside it).
func netnsCookie(path string) (uint64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var want, have unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		return 0, err
	}
	if err := unix.Stat("/proc/thread-self/ns/net", &have); err != nil {
		return 0, err
	}
	if want.Ino != have.Ino || want.Dev != have.Dev {
		return 0, fmt.Errorf("network namespace %s is not this process's: run rules apply inside it (nsenter --net=...)", path)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE (Linux 5.14+): %w", err)
	}
	return c, nil
}

// applyAccount loads (or updates in place) the sock_ops accounting for
// ports in the network namespace netns, attached to cgroup.
func applyAccount(pinDir, netns, cgroup string, ports []uint16) error {
	if cgroup == "" {
		var err error
		if cgroup, err = cgroup2Root(); err != nil {
			return err
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cgroup, &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("no cgroup v2 hierarchy at %s (mount it with `mount -t cgroup2 none %s`)", cgroup, cgroup)
	}
	cookie, err := netnsCookie(netns)
	if err != nil {
		return err
	}
	spec, err := loadAccount()
	if err != nil {
		return fmt.Errorf("load BPF object: %w", err)
	}
	var maps map[string]*ebpf.Map
	existing := false
	if _, err := os.Stat(filepath.Join(pinDir, pinAcctLink)); err == nil {
		existing = true
		var closeAll func()
		if maps, closeAll, err = openPinned(pinDir, pinAcctPorts, pinAcct, pinAcctConfig); err != nil {
			return err
		}
		defer closeAll()
	}
	var objs accountObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return fmt.Errorf("load sock_ops accounting: %w", err)
	}
	defer objs.Close()
	if err := objs.AcctConfig.Put(uint32(0), accountAcctConfig{NetnsCookie: cookie}); err != nil {
		return fmt.Errorf("set accounting netns: %w", err)
	}
	if err := fillAcctPorts(objs.AcctPorts, objs.Acct, ports); err != nil {
		return err
	}
	if existing {
		l, err := link.LoadPinnedLink(filepath.Join(pinDir, pinAcctLink), nil)
		if err != nil {
			return fmt.Errorf("open pinned accounting link: %w", err)
		}
		defer l.Close()
		if err := l.Update(objs.Account); err != nil {
			return fmt.Errorf("update sock_ops accounting: %w", err)
		}
		return nil
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: ebpf.AttachCGroupSockOps, Program: objs.Account})
	if err != nil {
		return fmt.Errorf("attach sock_ops accounting to %s: %w", cgroup, err)
	}
	defer l.Close()
	err = pinAll(pinDir, []pinned{
		{pinAcctPorts, objs.AcctPorts.Pin, 0, 0, 0o644},
		{pinAcct, objs.Acct.Pin, 0, 0, 0o644},
		{pinAcctConfig, objs.AcctConfig.Pin, 0, 0, 0o644},
		{pinAcctLink, l.Pin, 0, 0, 0o600}, // last: its presence means complete
	})
	if err != nil {
		removePins(pinDir, acctPins)
	}
	return err
}

// fillAcctPorts makes the map hold exactly ports, keeping the counter
// index of ports that stay (their counts survive a re-apply).
func fillAcctPorts(m, counters *ebpf.Map, ports []uint16) error {
	have := map[uint16]uint32{}
	var k uint16
	var v uint32
	it := m.Iterate()
	for it.Next(&k, &v) {
		have[k] = v
	}
	used := map[uint32]bool{}
	for p, i := range have {
		if slices.Contains(ports, p) {
			used[i] = true
		} else {
			m.Delete(p)
		}
	}
	next := uint32(0)
	for _, p := range ports {
		if _, ok := have[p]; ok {
			continue
		}
		for used[next] {
			next++
		}
		if next >= MaxAcctPorts {
			return fmt.Errorf("more than %d accounted ports", MaxAcctPorts)
		}
		// A reused slot starts from zero.
		zero := make([]accountAcct, ebpf.MustPossibleCPU())
		if err := counters.Put(next, zero); err != nil {
			return fmt.Errorf("reset accounting slot %d: %w", next, err)
		}
		if err := m.Put(p, next); err != nil {
			return fmt.Errorf("set accounted port %d: %w", p, err)
		}
		used[next] = true
	}
	return nil
}

// MaxAcctPorts is the size of the accounting maps (account.c).
const MaxAcctPorts = 64

// ReadAccounting reads the kernel's per-port connection accounting from
// the pins (world-readable). ErrNotLoaded when absent.
func ReadAccounting(pinDir string) ([]PortAccount, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	ro := &ebpf.LoadPinOptions{ReadOnly: true}
	pm, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinAcctPorts), ro)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNotLoaded
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned %s: %w", pinAcctPorts, err)
	}
	defer pm.Close()
	am, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, pinAcct), ro)
	if err != nil {
		return nil, fmt.Errorf("open pinned %s: %w", pinAcct, err)
	}
	defer am.Close()
	var out []PortAccount
	var port uint16
	var index uint32
	it := pm.Iterate()
	for it.Next(&port, &index) {
		var per []accountAcct
		if err := am.Lookup(index, &per); err != nil {
			return nil, fmt.Errorf("read accounting of port %d: %w", port, err)
		}
		pa := PortAccount{Port: port}
		for _, v := range per {
			pa.Accepted += v.Accepted
			pa.Closed += v.Closed
			pa.BytesIn += v.BytesIn
			pa.BytesOut += v.BytesOut
		}
		out = append(out, pa)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate accounted ports: %w", err)
	}
	slices.SortFunc(out, func(a, b PortAccount) int { return int(a.Port) - int(b.Port) })
	return out, nil
}
