package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// gatewayNet is scripts/netns-gateway.sh's topology, made for one test:
// client (10.10.1.2, fd10:1::2) — gateway — upstream (10.10.2.2, fd10:2::2).
type gatewayNet struct {
	prefix string
	dir    string // 0755 scratch dir (the relay runs as nobody)
}

func (n *gatewayNet) ns(role string) string { return "/run/netns/" + n.prefix + "-" + role }

// in returns a command running in the network namespace of role.
func (n *gatewayNet) in(role string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + n.ns(role), "--"}, args...)...)
}

func (n *gatewayNet) run(t *testing.T, role string, args ...string) string {
	t.Helper()
	out, err := n.in(role, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %s: %v\n%s", role, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newGatewayNet(t *testing.T) *gatewayNet {
	t.Helper()
	return newGatewayNetPrefix(t, fmt.Sprintf("rt%d", os.Getpid()%100000))
}

// newGatewayNetPrefix is newGatewayNet with namespaces and veths named
// after prefix (its first 8 characters must be unique).
func newGatewayNetPrefix(t *testing.T, prefix string) *gatewayNet {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds client/gateway/upstream network namespaces and iptables rules")
	}
	for _, tool := range []string{"iptables", "nsenter", "curl", "ping", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s missing: run scripts/deps.sh (CI's .ci/run does)", tool)
		}
	}
	n := &gatewayNet{prefix: prefix}
	script, _ := filepath.Abs("../../scripts/netns-gateway.sh")
	env := append(os.Environ(), "RELAY_NS_PREFIX="+n.prefix)
	t.Cleanup(func() {
		c := exec.Command(script, "down")
		c.Env = env
		c.Run()
	})
	c := exec.Command(script, "up")
	c.Env = env
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("netns-gateway.sh up: %v\n%s", err, out)
	}
	var err error
	if n.dir, err = os.MkdirTemp("", n.prefix+"-gw"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(n.dir) })
	os.Chmod(n.dir, 0o755)
	return n
}

// asNobody prefixes args to drop to uid/gid 65534 after nsenter (setns
// needs the privilege that the relay must not have).
func asNobody(args ...string) []string {
	return append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"}, args...)
}

// start runs a long-lived command in role's namespace until the test ends.
func (n *gatewayNet) start(t *testing.T, role string, args ...string) *bytes.Buffer {
	t.Helper()
	cmd := n.in(role, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("%s %v output:\n%s", role, args, out.String())
		}
	})
	return &out
}

func (n *gatewayNet) save(t *testing.T, cmd string) string {
	out := n.run(t, "gw", cmd)
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if !strings.HasPrefix(l, "#") {
			keep = append(keep, regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(l, "[0:0]"))
		}
	}
	return strings.Join(keep, "\n")
}

// withoutEmptyNat drops a nat table with no rules: iptables may create the
// built-in table and leave it (DESIGN.md allows that residue).
func withoutEmptyNat(s string) string {
	return regexp.MustCompile(`(?s)\*nat\n(:[A-Z]+ ACCEPT \[0:0\]\n)+COMMIT\n?`).ReplaceAllString(s, "")
}

func (n *gatewayNet) writeConfig(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(n.dir, name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestGatewaySteering is issue "steering" end to end: a client reaches an
// upstream *through* the gateway, whose REDIRECT rules put the connection
// into `relayctl serve` running as nobody; routes pick the upstream by SNI,
// unknown names go to the original destination, IPv4 and IPv6.
func TestGatewaySteering(t *testing.T) {
	n := newGatewayNet(t)
	upBin := filepath.Join(n.dir, "demo-upstream")
	if out, err := exec.Command("go", "build", "-o", upBin, "../../scripts/demo-upstream").CombinedOutput(); err != nil {
		t.Fatalf("build demo-upstream: %v\n%s", err, out)
	}
	n.start(t, "up", upBin, "-tls", ":443", "-http", ":80", "-names", "up.test,other.test", "-label", "up")
	n.start(t, "up", upBin, "-tls", ":8444", "-names", "alt.test", "-label", "alt")

	state := filepath.Join(n.dir, "state")
	os.Mkdir(state, 0o700)
	os.Chown(state, 65534, 65534)
	cfg := n.writeConfig(t, "relay.yaml", fmt.Sprintf(`
user: nobody
state_dir: %s
listen: {https: ":8443", http: ":8080", metrics: "127.0.0.1:9090"}
unknown_sni: original
steer: {bpf: off}
routes:
  - match: alt.test
    passthrough: 10.10.2.2:8444
`, state))

	before4, before6 := n.save(t, "iptables-save"), n.save(t, "ip6tables-save")
	dry := n.run(t, "gw", relayctlBin, "rules", "apply", "--dry-run", "-c", cfg)
	if !strings.Contains(dry, "would change") || n.save(t, "iptables-save") != before4 {
		t.Fatalf("--dry-run changed iptables or printed no plan:\n%s", dry)
	}
	n.run(t, "gw", relayctlBin, "rules", "apply", "-c", cfg)
	after1 := n.save(t, "iptables-save") + n.save(t, "ip6tables-save")
	out := n.run(t, "gw", relayctlBin, "rules", "apply", "-c", cfg)
	if !strings.Contains(out, "nothing to change") || n.save(t, "iptables-save")+n.save(t, "ip6tables-save") != after1 {
		t.Fatalf("second apply changed something:\n%s", out)
	}

	n.start(t, "gw", asNobody(relayctlBin, "serve", "-c", cfg)...)
	waitIn(t, n, "gw", "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:9090/metrics")

	curl := func(args ...string) string {
		return n.run(t, "client", append([]string{"curl", "-sS", "-k", "--max-time", "10"}, args...)...)
	}
	for _, ip := range []string{"10.10.2.2", "[fd10:2::2]"} {
		if got := curl("--resolve", "alt.test:443:"+ip, "https://alt.test/"); !strings.Contains(got, "hello from alt") {
			t.Errorf("%s: routed SNI reached %q, want the alt upstream (route alt.test)", ip, got)
		}
		if got := curl("--resolve", "other.test:443:"+ip, "https://other.test/"); !strings.Contains(got, "hello from up") {
			t.Errorf("%s: unknown SNI reached %q, want the original destination", ip, got)
		}
		if got := curl("http://" + ip + "/plain"); !strings.Contains(got, "hello from up") {
			t.Errorf("%s: transit http reached %q, want the original destination", ip, got)
		}
	}
	metrics := n.run(t, "gw", "curl", "-s", "http://127.0.0.1:9090/metrics")
	for _, want := range []string{
		`relay_connections_total{action="passthrough",route="alt.test"} 2`,
		`relay_connections_total{action="passthrough",route="original"} 2`,
		`relay_connections_total{action="http",route="original"} 2`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s: the relay did not handle the steered connections\n%s", want, grepLines(metrics, "relay_connections_total"))
		}
	}
	show := n.run(t, "gw", relayctlBin, "rules", "show", "-c", cfg)
	if !strings.Contains(show, "RELAY-PREROUTING") || !strings.Contains(show, "nf_tables") || !strings.Contains(show, ":8443: up") {
		t.Errorf("rules show:\n%s", show)
	}

	n.run(t, "gw", relayctlBin, "rules", "delete", "-c", cfg)
	if a, b := withoutEmptyNat(n.save(t, "iptables-save")), withoutEmptyNat(before4); a != b {
		t.Errorf("iptables-save after delete differs from before apply:\n--- before\n%s\n--- after\n%s", b, a)
	}
	if a, b := withoutEmptyNat(n.save(t, "ip6tables-save")), withoutEmptyNat(before6); a != b {
		t.Errorf("ip6tables-save after delete differs:\n--- before\n%s\n--- after\n%s", b, a)
	}
	// Without rules the client reaches the upstream directly.
	if got := curl("--resolve", "alt.test:8444:10.10.2.2", "https://alt.test:8444/"); !strings.Contains(got, "hello from alt") {
		t.Errorf("direct after delete: %q", got)
	}

	t.Run("bypass and interfaces", func(t *testing.T) {
		count := func() string {
			return grepLines(n.run(t, "gw", "curl", "-s", "http://127.0.0.1:9090/metrics"), `route="alt.test"`)
		}
		for _, steer := range []string{
			"{bpf: off, bypass: [10.10.2.2/32, 'fd10:2::2']}",
			fmt.Sprintf("{bpf: off, interfaces: [%s-g1]}", n.prefix[:min(8, len(n.prefix))]), // the upstream side only
		} {
			c := n.writeConfig(t, "steer.yaml", strings.Replace(mustRead(t, cfg), "steer: {bpf: off}", "steer: "+steer, 1))
			n.run(t, "gw", relayctlBin, "rules", "apply", "-c", c)
			before := count()
			for _, ip := range []string{"10.10.2.2", "[fd10:2::2]"} {
				if got := curl("--resolve", "alt.test:443:"+ip, "https://alt.test/"); !strings.Contains(got, "hello from up") {
					t.Errorf("steer %s: %s reached %q, want the upstream directly", steer, ip, got)
				}
			}
			if after := count(); after != before {
				t.Errorf("steer %s: the relay saw the connection (%s -> %s)", steer, before, after)
			}
			n.run(t, "gw", relayctlBin, "rules", "delete", "-c", c)
		}
	})

	t.Run("local", func(t *testing.T) {
		c := n.writeConfig(t, "local.yaml", strings.Replace(mustRead(t, cfg), "steer: {bpf: off}", "steer: {bpf: off, local: true}", 1))
		n.run(t, "gw", relayctlBin, "rules", "apply", "-c", c)
		defer n.run(t, "gw", relayctlBin, "rules", "delete", "-c", c)
		// The gateway's own curl is steered (SNI alt.test goes to :8444);
		// the relay's own dial (uid nobody) is not, or it would loop.
		got := n.run(t, "gw", "curl", "-sS", "-k", "--max-time", "10", "--resolve", "alt.test:443:10.10.2.2", "https://alt.test/")
		if !strings.Contains(got, "hello from alt") {
			t.Errorf("local: gateway's own connection reached %q, want alt via the relay", got)
		}
		got = n.run(t, "gw", "curl", "-sS", "-k", "--max-time", "10", "--resolve", "other.test:443:10.10.2.2", "https://other.test/")
		if !strings.Contains(got, "hello from up") {
			t.Errorf("local: original destination %q (a loop would time out)", got)
		}
	})

	t.Run("preflight", func(t *testing.T) {
		for _, tc := range []struct {
			name, from, to, want string
			cred                 bool
		}{
			{"user", "user: nobody", "user: relay-no-such-user", `relay user "relay-no-such-user" does not exist: create it with`, false},
			{"interface", "steer: {bpf: off}", "steer: {bpf: off, interfaces: [nosuch0]}", "no interface named nosuch0 on this machine (interfaces here:", false},
			{"privilege", "", "", "needs root or CAP_NET_ADMIN; run it with sudo", true},
		} {
			c := n.writeConfig(t, "pre-"+tc.name+".yaml", strings.Replace(mustRead(t, cfg), tc.from, tc.to, 1))
			args := []string{relayctlBin, "rules", "apply", "-c", c}
			if tc.cred {
				args = asNobody(args...)
			}
			cmd := n.in("gw", args...)
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), tc.want) {
				t.Errorf("%s: err %v, output %q; want it to say %q", tc.name, err, out, tc.want)
			}
		}
		// Legacy-backend rules while iptables drives nf_tables.
		n.run(t, "gw", "iptables-legacy", "-A", "INPUT", "-j", "ACCEPT")
		out, err := n.in("gw", relayctlBin, "rules", "apply", "-c", cfg).CombinedOutput()
		n.run(t, "gw", "iptables-legacy", "-D", "INPUT", "-j", "ACCEPT")
		if err == nil || !strings.Contains(string(out), "mixing backends breaks NAT") {
			t.Errorf("backend mix: err %v, output %q", err, out)
		}
		if s := n.save(t, "iptables-save"); strings.Contains(s, "RELAY") {
			t.Errorf("a failed preflight left rules:\n%s", s)
		}
		// Forwarding off with interfaces given: a warning, not an error.
		n.run(t, "gw", "sysctl", "-qw", "net.ipv4.ip_forward=0")
		c := n.writeConfig(t, "fwd.yaml", strings.Replace(mustRead(t, cfg), "steer: {bpf: off}", fmt.Sprintf("steer: {bpf: off, interfaces: [%s-g0]}", n.prefix[:min(8, len(n.prefix))]), 1))
		out, err = n.in("gw", relayctlBin, "rules", "apply", "-c", c).CombinedOutput()
		n.run(t, "gw", "sysctl", "-qw", "net.ipv4.ip_forward=1")
		n.in("gw", relayctlBin, "rules", "delete", "-c", c).Run()
		if err != nil || !strings.Contains(string(out), "warning: net.ipv4.ip_forward") {
			t.Errorf("ip_forward off: err %v, output %q; want a warning", err, out)
		}
	})
}

func waitIn(t *testing.T, n *gatewayNet, role string, args ...string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if n.in(role, args...).Run() == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: %v never succeeded", role, args)
}

func mustRead(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestGatewayBPFSteering: with steer.bpf: on, connections addressed to the
// gateway itself reach the unprivileged relay through sk_lookup (no NAT:
// the relay's socket sees the original address:443), counted in the BPF
// map; after kill -9 of the relay the port falls back to whatever else
// listens (fail-open); delete leaves no pins.
func TestGatewayBPFSteering(t *testing.T) {
	n := newGatewayNet(t)
	fs := filepath.Join(n.dir, "bpffs")
	os.Mkdir(fs, 0o755)
	if err := syscall.Mount("bpf", fs, "bpf", 0, "mode=0755"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(fs, syscall.MNT_DETACH) })
	self, _ := os.Executable()
	up := n.in("up", "env", "RELAY_TEST_HELPER=proxy-echo", self, ":7000")
	if err := up.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Process.Kill(); up.Wait() })

	cfg := n.writeConfig(t, "bpf.yaml", fmt.Sprintf(`
user: nobody
state_dir: %s
listen: {https: ":8443", http: ":8080", metrics: "127.0.0.1:9090"}
unknown_sni: reject
steer: {bpf: on, pin_dir: %s/relay}
splice: sockmap
routes:
  - match: pp.test
    passthrough: 10.10.2.2:7000
    proxy_protocol: v1
`, n.dir, fs))
	out := n.run(t, "gw", relayctlBin, "rules", "apply", "-c", cfg)
	if !strings.Contains(out, "sk_lookup steering on") {
		t.Fatalf("rules apply with bpf: on:\n%s", out)
	}
	if s := n.save(t, "iptables-save"); !strings.Contains(s, "-m addrtype --dst-type LOCAL -j RETURN") {
		t.Errorf("with BPF active, REDIRECT must leave local destinations to sk_lookup:\n%s", s)
	}
	t.Cleanup(func() { n.in("gw", relayctlBin, "rules", "delete", "-c", cfg).Run() })
	fi, err := os.Stat(filepath.Join(fs, "relay", "listeners"))
	if err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("listeners pin: %v %v, want nobody's, 0600", err, fi)
	}
	for _, pin := range []string{"splice_socks", "splice_cfg", "splice_stat"} {
		fi, err := os.Stat(filepath.Join(fs, "relay", pin))
		if err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s pin: %v %v, want nobody's, 0600 (splice: sockmap)", pin, err, fi)
		}
	}

	relay := n.in("gw", asNobody(relayctlBin, "serve", "-c", cfg)...)
	var logs bytes.Buffer
	relay.Stdout, relay.Stderr = &logs, &logs
	if err := relay.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		relay.Process.Kill()
		relay.Wait()
		if t.Failed() {
			t.Logf("relay log:\n%s", logs.String())
		}
	}()
	waitIn(t, n, "gw", "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:9090/metrics")

	for _, addr := range []string{"10.10.1.1:443", "[fd10:1::1]:443"} {
		c := n.in("client", "env", "RELAY_TEST_HELPER=hello-client", self, addr, "pp.test")
		got, _ := c.CombinedOutput()
		host := strings.Trim(strings.TrimSuffix(addr, ":443"), "[]")
		if !strings.HasPrefix(string(got), "PROXY TCP") || !strings.Contains(string(got), " "+host+" ") || !strings.HasSuffix(strings.TrimSpace(string(got)), " 443") {
			t.Errorf("%s: upstream saw %q; want a PROXY line whose destination is %s 443 (the relay's socket saw the original address)", addr, got, host)
		}
	}
	metrics := n.run(t, "gw", "curl", "-s", "http://127.0.0.1:9090/metrics")
	for _, want := range []string{`relay_bpf_attached 1`, `relay_bpf_steered_connections_total{port="443"} 2`, `relay_bpf_accepted_connections_total{port="443"} 2`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(metrics, "relay_bpf"))
		}
	}
	// splice: sockmap: the upstream's answers moved in the kernel.
	if m := regexp.MustCompile(`relay_bpf_spliced_bytes_total\{direction="downstream"\} (\d+)`).FindStringSubmatch(metrics); m == nil || m[1] == "0" {
		t.Errorf("splice: sockmap moved no bytes in the kernel:\n%s", grepLines(metrics, "relay_bpf"))
	}
	if out := n.run(t, "gw", asNobody(relayctlBin, "stats", "-c", cfg)...); !strings.Contains(out, "bpf sockmap splice: ") {
		t.Errorf("relayctl stats lacks the sockmap splice counters:\n%s", out)
	}
	if out := n.run(t, "gw", relayctlBin, "rules", "show", "-c", cfg); !strings.Contains(out, "sockmap splice loaded") || !strings.Contains(out, "port 443: accepted 2, closed 2") {
		t.Errorf("rules show lacks the sockmap splice:\n%s", out)
	}

	// kill -9: the kernel drops the socket from the SOCKMAP; a root
	// listener on :443 now gets the connections.
	relay.Process.Kill()
	relay.Wait()
	banner := n.in("gw", "env", "RELAY_TEST_HELPER=banner", self, ":443", "root-listener")
	bout, _ := banner.StdoutPipe()
	if err := banner.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { banner.Process.Kill(); banner.Wait() }()
	bufio.NewReader(bout).ReadString('\n')
	got, _ := n.in("client", "env", "RELAY_TEST_HELPER=hello-client", self, "10.10.1.1:443", "pp.test").CombinedOutput()
	if strings.TrimSpace(string(got)) != "root-listener" {
		t.Errorf("after kill -9 of the relay: %q, want the root listener (fail-open)", got)
	}

	n.run(t, "gw", relayctlBin, "rules", "delete", "-c", cfg)
	if _, err := os.Stat(filepath.Join(fs, "relay")); !os.IsNotExist(err) {
		t.Errorf("pins left after delete: %v", err)
	}
}
