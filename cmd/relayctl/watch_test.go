package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/relay-gw/relay/bpf"
	"golang.org/x/sys/unix"
)

// syncBuffer is a bytes.Buffer safe to read while a process writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// watchNet is a gateway topology with a temporary bpffs, a state file
// path (set in the environment of every command), a demo upstream, and a
// config whose steering uses both iptables and BPF.
type watchNet struct {
	*gatewayNet
	fs, state, cfg string
}

func newWatchNet(t *testing.T, tag, steer string) *watchNet {
	t.Helper()
	n := newGatewayNetPrefix(t, fmt.Sprintf("r22%s%04d", tag, os.Getpid()%10000))
	w := &watchNet{gatewayNet: n, fs: filepath.Join(n.dir, "bpffs"), state: filepath.Join(n.dir, "run", "steering.json")}
	os.Mkdir(w.fs, 0o755)
	if err := syscall.Mount("bpf", w.fs, "bpf", 0, "mode=0755"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		for syscall.Unmount(w.fs, syscall.MNT_DETACH) == nil { // the watcher may have mounted it again
		}
	})
	t.Setenv("RELAY_STEERING_STATE", w.state)
	upBin := filepath.Join(n.dir, "demo-upstream")
	if out, err := exec.Command("go", "build", "-o", upBin, "../../scripts/demo-upstream").CombinedOutput(); err != nil {
		t.Fatalf("build demo-upstream: %v\n%s", err, out)
	}
	n.start(t, "up", upBin, "-tls", ":443", "-http", ":80", "-names", "up.test,other.test", "-label", "up")
	n.start(t, "up", upBin, "-tls", ":8444", "-names", "alt.test", "-label", "alt")
	n.start(t, "up", upBin, "-http", ":8081", "-label", "web")
	state := filepath.Join(n.dir, "state")
	os.Mkdir(state, 0o700)
	os.Chown(state, 65534, 65534)
	w.cfg = n.writeConfig(t, "relay.yaml", fmt.Sprintf(`
user: nobody
state_dir: %s
listen: {https: ":8443", http: ":8080", metrics: "127.0.0.1:9090"}
unknown_sni: original
steer: %s
splice: sockmap
routes:
  - match: alt.test
    passthrough: 10.10.2.2:8444
  - match: web.test
    terminate: {upstream: "http://10.10.2.2:8081", tls: internal}
`, state, strings.ReplaceAll(steer, "PINS", w.fs+"/relay")))
	return w
}

// startWatch runs `rules apply --watch` in the gateway and waits until
// its state file names every part ok.
func (w *watchNet) startWatch(t *testing.T, parts ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := w.in("gw", relayctlBin, "rules", "apply", "--watch", "-c", w.cfg)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		if t.Failed() {
			t.Logf("watcher output:\n%s", out.String())
		}
	})
	w.waitState(t, "the watcher to start", func(st *steerState) bool {
		for _, p := range parts {
			if st.Parts[p] == nil || st.Parts[p].State != "ok" {
				return false
			}
		}
		return true
	})
	return cmd, out
}

// waitState polls the state file until ok (generous: a loaded 2-core CI machine).
func (w *watchNet) waitState(t *testing.T, what string, ok func(*steerState) bool) *steerState {
	t.Helper()
	var st *steerState
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var err error
		if st, err = readSteerState(w.state); err == nil && ok(st) {
			return st
		}
	}
	b, _ := json.MarshalIndent(st, "", "  ")
	t.Fatalf("timed out waiting for %s; state:\n%s", what, b)
	return nil
}

func bpfSupported() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: network namespaces, iptables, BPF")
	}
	return bpf.Supported()
}

// waitRepaired waits until part has been repaired n times and is healthy.
func (w *watchNet) waitRepaired(t *testing.T, part string, n uint64) *steerState {
	t.Helper()
	return w.waitState(t, fmt.Sprintf("repair %d of %s", n, part), func(st *steerState) bool {
		p := st.Parts[part]
		return p != nil && p.Repairs >= n && p.State != "failing"
	})
}

func (w *watchNet) curl(t *testing.T, from string, args ...string) string {
	t.Helper()
	out, _ := w.in(from, append([]string{"curl", "-sS", "-k", "--max-time", "10"}, args...)...).CombinedOutput()
	return string(out)
}

// TestWatchRepairsDrift is issue 22's watch mode end to end: what others
// remove (nat table flushed, a jump deleted, the sk_lookup link detached,
// bpffs unmounted) comes back, is counted, and the relay's connections
// keep flowing; an interface named in steer.interfaces that appears after
// apply is steered; the relay exports the health; `rules delete` stops
// the watcher and leaves iptables as it was.
func TestWatchRepairsDrift(t *testing.T) {
	if err := bpfSupported(); err != nil {
		t.Skip(err)
	}
	w := newWatchNet(t, "w", "{bpf: on, pin_dir: PINS, interfaces: [LAN]}")
	lan := w.prefix[:8] + "-l0" // appears later
	os.WriteFile(w.cfg, []byte(strings.Replace(mustRead(t, w.cfg), "[LAN]", "["+lan+"]", 1)), 0o644)
	before4, before6 := w.save(t, "iptables-save"), w.save(t, "ip6tables-save")

	watch, wout := w.startWatch(t, partV4, partV6, partSkLookup, partSockmap)
	if !strings.Contains(wout.String(), "no interface named "+lan) {
		t.Errorf("watch mode did not say %s is missing yet:\n%s", lan, wout.String())
	}
	relay := w.start(t, "gw", asNobody(relayctlBin, "serve", "-c", w.cfg)...)
	_ = relay
	waitIn(t, w.gatewayNet, "gw", "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:9090/metrics")
	metrics := func() string { return w.run(t, "gw", "curl", "-s", "http://127.0.0.1:9090/metrics") }
	m := metrics()
	for _, p := range []string{partV4, partV6, partSkLookup, partSockmap} {
		if want := `relay_steering_healthy{part="` + p + `"} 1`; !strings.Contains(m, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(m, "relay_steering"))
		}
	}
	// sk_lookup: connections addressed to the gateway itself.
	local := func(what string) {
		t.Helper()
		if got := w.curl(t, "client", "--resolve", "alt.test:443:10.10.1.1", "https://alt.test/"); !strings.Contains(got, "hello from alt") {
			t.Errorf("%s: a connection to the gateway's :443 reached %q, want the alt upstream through sk_lookup", what, got)
		}
	}
	local("start")

	t.Run("interface appears", func(t *testing.T) {
		// Traffic through the new interface is steered; through g0 (not
		// in steer.interfaces) it is not.
		if got := w.curl(t, "client", "--resolve", "alt.test:443:10.10.2.2", "https://alt.test/"); !strings.Contains(got, "hello from up") {
			t.Fatalf("before %s exists, transit reached %q, want the upstream directly", lan, got)
		}
		w.run(t, "gw", "ip", "link", "add", lan, "type", "veth", "peer", "name", w.prefix[:8]+"-l1", "netns", w.ns("client"))
		w.run(t, "gw", "ip", "addr", "add", "10.10.3.1/24", "dev", lan)
		w.run(t, "gw", "ip", "link", "set", lan, "up")
		w.run(t, "client", "ip", "addr", "add", "10.10.3.2/24", "dev", w.prefix[:8]+"-l1")
		w.run(t, "client", "ip", "link", "set", w.prefix[:8]+"-l1", "up")
		w.run(t, "client", "ip", "route", "add", "10.10.2.2/32", "via", "10.10.3.1")
		waitIn(t, w.gatewayNet, "client", "ping", "-c1", "-W1", "10.10.2.2")
		if got := w.curl(t, "client", "--resolve", "alt.test:443:10.10.2.2", "https://alt.test/"); !strings.Contains(got, "hello from alt") {
			t.Errorf("through %s, transit reached %q, want the alt upstream through the relay", lan, got)
		}
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(wout.String(), "interface "+lan+" appeared") && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if !strings.Contains(wout.String(), "interface "+lan+" appeared") {
			t.Errorf("the watcher logged no event for %s:\n%s", lan, wout.String())
		}
	})

	t.Run("nat table flushed", func(t *testing.T) {
		w.run(t, "gw", "iptables", "-t", "nat", "-F")
		w.run(t, "gw", "iptables", "-t", "nat", "-X")
		w.waitRepaired(t, partV4, 1)
		if s := w.save(t, "iptables-save"); !strings.Contains(s, "-A PREROUTING -j RELAY-PREROUTING") || !strings.Contains(s, "--to-ports 8443") {
			t.Errorf("rules not back:\n%s", s)
		}
		if !strings.Contains(wout.String(), "nat table flushed") {
			t.Errorf("the repair log names no cause:\n%s", wout.String())
		}
		if got := w.curl(t, "client", "--resolve", "alt.test:443:10.10.2.2", "https://alt.test/"); !strings.Contains(got, "hello from alt") {
			t.Errorf("after the repair, transit reached %q, want the alt upstream through the relay", got)
		}
		if m := metrics(); !strings.Contains(m, `relay_steering_repairs_total{part="iptables_v4"} 1`) {
			t.Errorf("repair not counted:\n%s", grepLines(m, "relay_steering"))
		}
	})

	t.Run("jump deleted", func(t *testing.T) {
		w.run(t, "gw", "ip6tables", "-t", "nat", "-D", "PREROUTING", "-j", "RELAY-PREROUTING")
		w.waitRepaired(t, partV6, 1)
		if s := w.save(t, "ip6tables-save"); strings.Count(s, "-A PREROUTING -j RELAY-PREROUTING") != 1 {
			t.Errorf("jump not back exactly once:\n%s", s)
		}
		if !strings.Contains(wout.String(), "chain order rewritten") {
			t.Errorf("the repair log names no cause:\n%s", wout.String())
		}
	})

	t.Run("sk_lookup detached", func(t *testing.T) {
		l, err := link.LoadPinnedLink(filepath.Join(w.fs, "relay", "link"), nil)
		if err != nil {
			t.Fatal(err)
		}
		err = l.Detach()
		l.Close()
		if err != nil {
			t.Fatalf("detach: %v", err)
		}
		w.waitRepaired(t, partSkLookup, 1)
		local("after re-attach") // same maps: the relay's listener is still registered
	})

	t.Run("bpffs unmounted", func(t *testing.T) {
		if err := syscall.Unmount(w.fs, syscall.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
		st := w.waitRepaired(t, partSkLookup, 2)
		w.waitRepaired(t, partSockmap, 1)
		var sfs unix.Statfs_t
		if err := unix.Statfs(w.fs, &sfs); err != nil || uint32(sfs.Type) != uint32(unix.BPF_FS_MAGIC) {
			t.Errorf("%s is not a bpffs again: %v", w.fs, err)
		}
		for _, pin := range []string{"link", "listeners", "ports", "counters", "splice_socks"} {
			if _, err := os.Stat(filepath.Join(w.fs, "relay", pin)); err != nil {
				t.Errorf("pin %s not restored: %v", pin, err)
			}
		}
		if !strings.Contains(st.Parts[partSkLookup].LastDrift, "bpffs unmounted") {
			t.Errorf("last drift %q names no cause", st.Parts[partSkLookup].LastDrift)
		}
		local("after bpffs remount")
	})

	show := w.run(t, "gw", relayctlBin, "rules", "show", "-c", w.cfg)
	if !strings.Contains(show, "steering health (watcher pid") || !strings.Contains(show, "iptables_v4: ok; 1 repairs") {
		t.Errorf("rules show lacks the steering health:\n%s", show)
	}
	if out := w.run(t, "gw", asNobody(relayctlBin, "stats", "-c", w.cfg)...); !regexp.MustCompile(`sk_lookup: (ok|repaired); 2 repairs`).MatchString(out) {
		t.Errorf("relayctl stats lacks the steering health:\n%s", out)
	}

	// From the gateway itself, sk_lookup steers 127.0.0.1:443 and :80.
	if out, err := w.in("gw", relayctlBin, "selftest", "-c", w.cfg).CombinedOutput(); err != nil || !strings.Contains(string(out), "selftest: all checks passed") {
		t.Errorf("selftest from the gateway after the repairs: %v\n%s", err, out)
	}

	t.Run("rules delete while watching", func(t *testing.T) {
		out := w.run(t, "gw", relayctlBin, "rules", "delete", "-c", w.cfg)
		if !strings.Contains(out, "stopped `rules apply --watch`") {
			t.Errorf("rules delete did not stop the watcher:\n%s", out)
		}
		done := make(chan error, 1)
		go func() { done <- watch.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("watcher exit: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("watcher still running after rules delete")
		}
		if a, b := withoutEmptyNat(w.save(t, "iptables-save")), withoutEmptyNat(before4); a != b {
			t.Errorf("iptables-save differs from before:\n--- before\n%s\n--- after\n%s", b, a)
		}
		if a, b := withoutEmptyNat(w.save(t, "ip6tables-save")), withoutEmptyNat(before6); a != b {
			t.Errorf("ip6tables-save differs from before:\n--- before\n%s\n--- after\n%s", b, a)
		}
		if _, err := os.Stat(filepath.Join(w.fs, "relay")); !os.IsNotExist(err) {
			t.Errorf("pins left: %v", err)
		}
		time.Sleep(3 * time.Second) // a watcher that fought back would have re-applied by now
		if s := w.save(t, "iptables-save"); strings.Contains(s, "RELAY") {
			t.Errorf("rules came back after delete:\n%s", s)
		}
		if m := metrics(); !strings.Contains(m, `relay_steering_healthy{part="iptables_v4"} 0`) {
			t.Errorf("with no watcher, health should be 0:\n%s", grepLines(m, "relay_steering"))
		}
	})
}

// TestWatchSIGTERM: stopping the watcher (systemctl stop) removes
// everything it installed and exits 0; a second watcher is refused while
// one runs.
func TestWatchSIGTERM(t *testing.T) {
	if err := bpfSupported(); err != nil {
		t.Skip(err)
	}
	w := newWatchNet(t, "s", "{bpf: on, pin_dir: PINS}")
	before4 := w.save(t, "iptables-save")
	sock := filepath.Join(w.dir, "notify.sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	watch, out := w.startWatch(t, partV4, partV6, partSkLookup)
	notify.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 64)
	if n, err := notify.Read(buf); err != nil || string(buf[:n]) != "READY=1" {
		t.Errorf("systemd notification: %q %v, want READY=1", buf[:n], err)
	}
	second, err := w.in("gw", relayctlBin, "rules", "apply", "--watch", "-c", w.cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(second), "another `rules apply --watch` runs") {
		t.Errorf("second watcher: %v %s", err, second)
	}
	// A plain `rules apply` of a changed config is not reverted: the
	// watcher is told to re-read its config.
	os.WriteFile(w.cfg, []byte(strings.Replace(mustRead(t, w.cfg), "{bpf: on,", "{bypass: [10.10.9.9/32], bpf: on,", 1)), 0o644)
	if out := w.run(t, "gw", relayctlBin, "rules", "apply", "-c", w.cfg); !strings.Contains(out, "applied by `rules apply --watch`") {
		t.Errorf("rules apply while watching:\n%s", out)
	}
	// The watcher is signalled, not waited for: give it time to log.
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(out.String(), "config reloaded and applied") && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(out.String(), "config reloaded and applied") {
		t.Errorf("the watcher did not reload:\n%s", out.String())
	}
	other := w.writeConfig(t, "other.yaml", mustRead(t, w.cfg))
	if o, err := w.in("gw", relayctlBin, "rules", "apply", "-c", other).CombinedOutput(); err == nil || !strings.Contains(string(o), "keeps the steering of "+w.cfg) {
		t.Errorf("rules apply of another config while watching: %v\n%s", err, o)
	}
	time.Sleep(2500 * time.Millisecond) // a check or more
	if s := w.save(t, "iptables-save"); !strings.Contains(s, "-d 10.10.9.9/32 -j RETURN") {
		t.Errorf("the watcher reverted a deliberate apply:\n%s", s)
	}
	if strings.Contains(out.String(), "steering repaired") {
		t.Errorf("the watcher counted a deliberate apply as drift:\n%s", out.String())
	}
	watch.Process.Signal(syscall.SIGTERM)
	if err := watch.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v\n%s", err, out.String())
	}
	if a, b := withoutEmptyNat(w.save(t, "iptables-save")), withoutEmptyNat(before4); a != b {
		t.Errorf("iptables-save differs from before:\n--- before\n%s\n--- after\n%s", b, a)
	}
	if _, err := os.Stat(filepath.Join(w.fs, "relay")); !os.IsNotExist(err) {
		t.Errorf("pins left: %v", err)
	}
	if _, err := os.Stat(w.state); !os.IsNotExist(err) {
		t.Errorf("state file left: %v", err)
	}
}
