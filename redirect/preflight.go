package redirect

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

// capNetAdmin is CAP_NET_ADMIN's bit in /proc/self/status CapEff.
const capNetAdmin = 12

// CheckPrivilege fails unless this process may change the firewall.
func CheckPrivilege() error {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err == nil && caps&(1<<capNetAdmin) != 0 {
				return nil
			}
		}
	}
	return errors.New("not permitted: `relayctl rules` changes iptables and needs root or CAP_NET_ADMIN; run it with sudo")
}

// Backend reports which iptables backend the `iptables` on PATH drives:
// "nf_tables" or "legacy".
func Backend() (string, error) {
	out, err := exec.Command("iptables", "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("iptables --version: %w (install iptables: apt-get install iptables)", err)
	}
	switch s := string(out); {
	case strings.Contains(s, "nf_tables"):
		return "nf_tables", nil
	case strings.Contains(s, "legacy"):
		return "legacy", nil
	default:
		return "legacy", nil // iptables < 1.8 has only the legacy backend
	}
}

// CheckBackendMix fails when the other backend holds rules: packets would
// traverse both rule sets and NAT would misbehave in ways nobody debugs.
func CheckBackendMix(backend string) error {
	other := "iptables-legacy-save"
	if backend == "legacy" {
		other = "iptables-nft-save"
	}
	if _, err := exec.LookPath(other); err != nil {
		return nil
	}
	out, err := exec.Command(other).Output()
	if err != nil {
		return nil // the other backend unusable here: nothing can be mixed
	}
	n := 0
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	if n == 0 {
		return nil
	}
	fix := "move them with `iptables-legacy-save | iptables-nft-restore` and flush the legacy tables, or switch with `update-alternatives --set iptables /usr/sbin/iptables-legacy`"
	if backend == "legacy" {
		fix = "remove them (`iptables-nft-save` shows them), or switch with `update-alternatives --set iptables /usr/sbin/iptables-nft`"
	}
	return fmt.Errorf("iptables uses the %s backend but %d rules exist in the other backend (%s): mixing backends breaks NAT; %s", backend, n, other, fix)
}

// LookupUID returns the uid of the relay user.
func LookupUID(name string) (int, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, fmt.Errorf("relay user %q does not exist: create it with `useradd --system --no-create-home --shell /usr/sbin/nologin %s` (scripts/install.sh does), or set `user:` in the config", name, name)
	}
	return strconv.Atoi(u.Uid)
}

// CheckInterfaces verifies that every named interface exists.
func CheckInterfaces(names []string) error {
	var missing []string
	for _, n := range names {
		if _, err := netlink.LinkByName(n); err != nil {
			missing = append(missing, n)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	have, _ := UpInterfaces(true)
	return fmt.Errorf("steer.interfaces: no interface named %s on this machine (interfaces here: %s); fix steer.interfaces, or leave it empty to steer every interface",
		strings.Join(missing, ", "), strings.Join(have, ", "))
}

// UpInterfaces lists interfaces (all, or only those that are up), lo excluded.
func UpInterfaces(all bool) ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []string
	for _, l := range links {
		a := l.Attrs()
		if a.Name == "lo" || (!all && a.Flags&1 == 0) { // net.FlagUp
			continue
		}
		out = append(out, a.Name)
	}
	slices.Sort(out)
	return out, nil
}

// ForwardingWarning returns a warning when interfaces are steered but the
// kernel does not forward (transit traffic never reaches PREROUTING's
// REDIRECT then).
func ForwardingWarning(v6 bool) string {
	var off []string
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); err == nil && strings.TrimSpace(string(b)) == "0" {
		off = append(off, "net.ipv4.ip_forward")
	}
	if v6 {
		if b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/forwarding"); err == nil && strings.TrimSpace(string(b)) == "0" {
			off = append(off, "net.ipv6.conf.all.forwarding")
		}
	}
	if len(off) == 0 {
		return ""
	}
	return fmt.Sprintf("%s is 0: this host does not forward, so only traffic addressed to it is steered; enable with `sysctl -w %s=1` for a gateway", strings.Join(off, ", "), off[0])
}
