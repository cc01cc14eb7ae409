package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// r18Netns is a network namespace of its own (loopback only) for the
// BPF restart tests: the relay, its upstream and the clients all live in
// it, and connections to 127.0.0.1:443 reach the relay through sk_lookup.
type r18Netns struct{ name, path string }

func newR18Netns(t *testing.T) *r18Netns {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace, a bpffs and BPF steering")
	}
	for _, tool := range []string{"ip", "iptables", "nsenter", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s missing: run scripts/deps.sh (CI's .ci/run does)", tool)
		}
	}
	n := &r18Netns{name: fmt.Sprintf("r18-%d", os.Getpid()%100000)}
	n.path = "/run/netns/" + n.name
	exec.Command("ip", "netns", "del", n.name).Run()
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	if out, err := exec.Command("ip", "-n", n.name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v\n%s", err, out)
	}
	return n
}

// do runs f on a thread in the namespace: sockets made there stay there.
func (n *r18Netns) do(f func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open(n.path)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns: %w", err)
	}
	ferr := f()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("setns back: %w", err) // the thread stays locked and dies with the goroutine
	}
	runtime.UnlockOSThread()
	return ferr
}

func (n *r18Netns) dialer(addr string) dialer {
	return func() (c net.Conn, err error) {
		nerr := n.do(func() error {
			c, err = net.DialTimeout("tcp", addr, 10*time.Second)
			return nil
		})
		if nerr != nil {
			return nil, nerr
		}
		return c, err
	}
}

func (n *r18Netns) listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := n.do(func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func (n *r18Netns) cmd(args ...string) []string {
	return append([]string{"nsenter", "--net=" + n.path, "--"}, args...)
}

func (n *r18Netns) run(t *testing.T, args ...string) string {
	t.Helper()
	argv := n.cmd(args...)
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// metrics reads the relay's /metrics inside the namespace.
func (n *r18Netns) metrics(addr string) (string, error) {
	d := n.dialer(addr)
	cl := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(context.Context, string, string) (net.Conn, error) { return d() },
	}}
	resp, err := cl.Get("http://" + addr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// pinTree lists the bpffs below dir (names, owners, modes).
func pinTree(t *testing.T, dir string) string {
	t.Helper()
	var out []string
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		out = append(out, fmt.Sprintf("%s uid=%d %v", strings.TrimPrefix(p, dir), st.Uid, fi.Mode()))
		return nil
	})
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// TestRestartBPFSteering: with steer.bpf: on, connections to the
// namespace's own :443 reach the relay through sk_lookup. A hand-over
// keeps them on the relay throughout (the new relay registers the same
// socket: nothing falls through to the normal lookup, nothing is refused).
// Then 20 cycles of kill -9 and restart: during each gap :443 falls
// through to the normal lookup (fail-open: a plain listener answers),
// after it the relay is back; pins and iptables rules are the same after
// the cycles as before them.
func TestRestartBPFSteering(t *testing.T) {
	n := newR18Netns(t)
	dir, state := restartDir(t)
	fs := filepath.Join(dir, "r18-bpffs")
	os.Mkdir(fs, 0o755)
	if err := syscall.Mount("bpf", fs, "bpf", 0, "mode=0755"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(fs, syscall.MNT_DETACH) })

	// The upstream, and a plain listener on :443 that answers whatever
	// the relay does not get (the normal socket lookup).
	up := n.listen(t, "127.0.0.1:7000")
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	var fellThrough atomic.Int64
	plain := n.listen(t, "127.0.0.1:443")
	go func() {
		for {
			c, err := plain.Accept()
			if err != nil {
				return
			}
			fellThrough.Add(1)
			io.WriteString(c, "normal lookup\n")
			c.Close()
		}
	}()

	cfg := filepath.Join(dir, "relay.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
user: nobody
state_dir: %s
listen: {https: ":8443", http: ":8080", metrics: "127.0.0.1:9090"}
unknown_sni: reject
steer: {bpf: on, pin_dir: %s/relay}
limits: {drain_timeout: 1m}
routes:
  - match: echo.test
    passthrough: 127.0.0.1:7000
`, state, fs)), 0o644)
	out := n.run(t, relayctlBin, "rules", "apply", "-c", cfg)
	if !strings.Contains(out, "sk_lookup steering on") {
		t.Fatalf("rules apply with bpf: on:\n%s", out)
	}
	t.Cleanup(func() {
		exec.Command("nsenter", "--net="+n.path, "--", relayctlBin, "rules", "delete", "-c", cfg).Run()
	})
	pinsBefore := pinTree(t, fs)
	rulesBefore := n.run(t, "iptables-save", "-t", "nat") + n.run(t, "ip6tables-save", "-t", "nat")

	relayArgv := n.cmd(asNobody(relayctlBin, "serve", "-c", cfg)...)
	steered := n.dialer("127.0.0.1:443")
	hello := clientHello(t, "echo.test")
	up443 := func() bool {
		c, err := dialEchoWith(steered, hello)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	waitRelay := func(p *relayProc) {
		t.Helper()
		p.waitLog(t, "BPF steering attached", 60*time.Second)
		deadline := time.Now().Add(60 * time.Second)
		for !up443() {
			if time.Now().After(deadline) || p.exited() {
				t.Fatalf("relay %s: :443 not steered to it", p.name)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// Hand-over under load, through sk_lookup.
	a := startProc(t, "A", relayArgv, false)
	waitRelay(a)
	fellThrough.Store(0)
	long := openLongConns(t, steered, hello, 200, 100*time.Millisecond)
	defer long.closeAll()
	fresh := startNewConns(steered, hello, 10*time.Millisecond)
	time.Sleep(500 * time.Millisecond)
	b := startProc(t, "B", relayArgv, false)
	b.waitLog(t, "hand-over done", 60*time.Second)
	b.waitLog(t, "BPF steering attached", 10*time.Second)
	time.Sleep(time.Second)
	fresh.finish()
	long.finish()
	select {
	case <-a.done:
	case <-time.After(60 * time.Second):
		t.Fatal("relay A did not exit after the hand-over")
	}
	if !up443() {
		t.Fatal("after relay A exited, :443 no longer reaches relay B (the sk_lookup entry was lost)")
	}
	long.fail.check(t, "long connections (sk_lookup)")
	fresh.fail.check(t, "new connections (sk_lookup)")
	if f := fellThrough.Load(); f != 0 {
		t.Errorf("%d connections fell through to the normal lookup during the hand-over", f)
	}
	m, err := n.metrics("127.0.0.1:9090")
	if err != nil || !strings.Contains(m, "relay_bpf_attached 1") {
		t.Errorf("relay B metrics: %v\n%s", err, grepLines(m, "relay_bpf"))
	}
	t.Logf("hand-over through sk_lookup: %d new connections ok, %d long", fresh.ok.Load(), len(long.conns))

	// kill -9 and restart, 20 times.
	cur := b
	for i := 1; i <= 20; i++ {
		cur.cmd.Process.Kill()
		<-cur.done
		c, err := steered()
		if err != nil {
			t.Fatalf("cycle %d: after kill -9, :443: %v (want the normal lookup: fail-open)", i, err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if line != "normal lookup\n" {
			t.Fatalf("cycle %d: after kill -9, :443 answered %q; want the normal lookup's listener (fail-open)", i, line)
		}
		cur = startProc(t, fmt.Sprintf("cycle %d", i), relayArgv, false)
		waitRelay(cur) // also over a stale hand-over socket of the killed one
	}
	cur.cmd.Process.Signal(syscall.SIGTERM)
	<-cur.done
	if got := pinTree(t, fs); got != pinsBefore {
		t.Errorf("pins after the restarts:\n%s\nbefore:\n%s", got, pinsBefore)
	}
	if got := n.run(t, "iptables-save", "-t", "nat") + n.run(t, "ip6tables-save", "-t", "nat"); stripCounters(got) != stripCounters(rulesBefore) {
		t.Errorf("nat rules after the restarts:\n%s\nbefore:\n%s", got, rulesBefore)
	}
	if _, err := os.Stat(filepath.Join(state, "relay.sock")); !os.IsNotExist(err) {
		t.Errorf("hand-over socket left after SIGTERM: %v", err)
	}
	n.run(t, relayctlBin, "rules", "delete", "-c", cfg)
	if _, err := os.Stat(filepath.Join(fs, "relay")); !os.IsNotExist(err) {
		t.Errorf("pins left after rules delete: %v", err)
	}
}

func stripCounters(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.Index(l, " ["); strings.HasPrefix(l, ":") && i > 0 {
			l = l[:i]
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}
