package relay

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/relay-gw/relay/internal/config"
)

// v6Net is a network namespace joined to this one by a veth pair: the
// host side has 2001:db8:20::1/64, the namespace 2001:db8:20::2 and ::3
// (one /64) and 2001:db8:21::5 (another), so that clients of different
// IPv6 sources reach the relay.
type v6Net struct {
	ns   string // /run/netns/...
	host string // host address to listen on
}

func newV6Net(t *testing.T) *v6Net {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and a veth pair")
	}
	id := fmt.Sprintf("%04d", os.Getpid()%10000)
	name, hostIf, nsIf := "r20-v6-"+id, "r20h"+id, "r20n"+id
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", name)
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", hostIf).Run()
		exec.Command("ip", "netns", "del", name).Run()
	})
	run("link", "add", hostIf, "type", "veth", "peer", "name", nsIf)
	run("link", "set", nsIf, "netns", name)
	run("addr", "add", "2001:db8:20::1/64", "dev", hostIf, "nodad")
	run("link", "set", hostIf, "up")
	run("-6", "route", "add", "2001:db8:21::/64", "dev", hostIf)
	for _, a := range []string{"2001:db8:20::2/64", "2001:db8:20::3/64", "2001:db8:21::5/64"} {
		run("-n", name, "addr", "add", a, "dev", nsIf, "nodad")
	}
	run("-n", name, "link", "set", nsIf, "up")
	run("-n", name, "link", "set", "lo", "up")
	run("-n", name, "-6", "route", "add", "default", "dev", nsIf)
	return &v6Net{ns: "/run/netns/" + name, host: "2001:db8:20::1"}
}

// dial connects to addr from src inside the namespace. The socket is made
// on a thread that joined the namespace (and dies with its goroutine).
func (n *v6Net) dial(src, addr string) (net.Conn, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		f, err := os.Open(n.ns)
		if err != nil {
			ch <- res{nil, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- res{nil, fmt.Errorf("setns: %w", err)}
			return
		}
		c, err := fromDialer(src).Dial("tcp", addr)
		ch <- res{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func TestAccessAndPerClientIPv6Netns(t *testing.T) {
	n := newV6Net(t)
	ln, err := listenConfig().Listen(t.Context(), "tcp", "["+n.host+"]:0")
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	var upN atomic.Int64
	up := countingTLSUpstream(t, ca, &upN)
	cfg := baseConfig(config.Route{Match: "v6.test", Passthrough: config.Upstreams{up},
		Allow: []string{"2001:db8:20::/64"}, Deny: []string{"2001:db8:20::3"}})
	r := startRelay(t, cfg, func(o *Options) { o.HTTPSListener = ln })
	addr := r.HTTPSAddr().String()
	handshake := func(src string) (string, error) {
		c, err := n.dial(src, addr)
		if err != nil {
			t.Fatalf("dial from %s: %v", src, err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		tc := tls.Client(c, &tls.Config{ServerName: "v6.test", InsecureSkipVerify: true})
		b := make([]byte, 64)
		k, err := tc.Read(b)
		return string(b[:k]), err
	}
	if got, err := handshake("2001:db8:20::2"); err != nil || got != "upstream:v6.test" {
		t.Fatalf("allowed source: %q %v", got, err)
	}
	for _, src := range []string{"2001:db8:20::3", "2001:db8:21::5"} {
		if _, err := handshake(src); err == nil || !strings.Contains(err.Error(), "access denied") {
			t.Errorf("source %s: %v, want access_denied", src, err)
		}
	}
	if upN.Load() != 1 {
		t.Errorf("upstream connections %d, want 1", upN.Load())
	}
	m := r.metricsText(t)
	if metricValue(m, `relay_access_denied_total{reason="deny",route="v6.test"}`) != 1 ||
		metricValue(m, `relay_access_denied_total{reason="not_allowed",route="v6.test"}`) != 1 {
		t.Errorf("access denied metrics:\n%s", grep(m, "relay_access_denied_total"))
	}

	t.Run("per_client by /64", func(t *testing.T) {
		arrived := make(chan struct{}, 8)
		ln, err := listenConfig().Listen(t.Context(), "tcp", "["+n.host+"]:0")
		if err != nil {
			t.Fatal(err)
		}
		cfg := baseConfig(config.Route{Match: "a.test", Passthrough: config.Upstreams{holdUpstream(t, arrived)}})
		cfg.Limits.PerClient = &config.PerClient{Connections: 1}
		r := startRelay(t, cfg, func(o *Options) { o.HTTPSListener = ln })
		open := func(src string) *net.TCPConn {
			c, err := n.dial(src, r.HTTPSAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			c.Write(clientHello(t, "a.test"))
			return c.(*net.TCPConn)
		}
		open("2001:db8:20::2")
		expectArrival(t, arrived, "first of 2001:db8:20::/64")
		expectClosed(t, open("2001:db8:20::3"), "second of the same /64")
		open("2001:db8:21::5")
		expectArrival(t, arrived, "another /64")
		if v := metricValue(r.metricsText(t), `relay_limit_rejections_total{limit="per_client_connections"}`); v != 1 {
			t.Errorf("per_client_connections = %v, want 1", v)
		}
	})
}
