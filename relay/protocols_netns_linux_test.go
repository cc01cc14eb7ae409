package relay

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// protoNet is two network namespaces joined to this one by veth pairs:
// clients live in one (10.221.N.2, the relay listens on 10.221.N.1), the
// SSH and OpenVPN servers in the other (10.222.N.2, reached from here at
// 10.222.N.1). Nothing touches this namespace's routes or firewall.
type protoNet struct {
	client, server     string // namespace names
	relayIP, serverIP  string
	clientIP, hostSide string
}

func newProtoNet(t *testing.T) *protoNet {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, veth pairs and a tun device")
	}
	n := os.Getpid() % 250
	id := fmt.Sprintf("%05d", os.Getpid()%100000)
	p := &protoNet{client: "i21c-" + id, server: "i21s-" + id,
		relayIP: fmt.Sprintf("10.221.%d.1", n), clientIP: fmt.Sprintf("10.221.%d.2", n),
		hostSide: fmt.Sprintf("10.222.%d.1", n), serverIP: fmt.Sprintf("10.222.%d.2", n)}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	for _, x := range []struct{ ns, hostIf, nsIf, hostAddr, nsAddr string }{
		{p.client, "i21ch" + id, "i21cn" + id, p.relayIP, p.clientIP},
		{p.server, "i21sh" + id, "i21sn" + id, p.hostSide, p.serverIP},
	} {
		run("netns", "add", x.ns)
		t.Cleanup(func() {
			exec.Command("ip", "link", "del", x.hostIf).Run()
			exec.Command("ip", "netns", "del", x.ns).Run()
		})
		run("link", "add", x.hostIf, "type", "veth", "peer", "name", x.nsIf)
		run("link", "set", x.nsIf, "netns", x.ns)
		run("addr", "add", x.hostAddr+"/24", "dev", x.hostIf)
		run("link", "set", x.hostIf, "up")
		run("-n", x.ns, "addr", "add", x.nsAddr+"/24", "dev", x.nsIf)
		run("-n", x.ns, "link", "set", x.nsIf, "up")
		run("-n", x.ns, "link", "set", "lo", "up")
	}
	return p
}

// daemon starts a long-running program in namespace ns, in its own
// process group, killed (with whatever it forked) when the test ends.
func daemon(t *testing.T, ns, logPath string, argv ...string) {
	t.Helper()
	log, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", argv[0], err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // our own process group
		cmd.Wait()
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s log:\n%s", filepath.Base(argv[0]), b)
		}
	})
}

// waitLog waits until the file at path contains s.
func waitLog(t *testing.T, path, s string, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if b, _ := os.ReadFile(path); bytes.Contains(b, []byte(s)) {
			return
		}
	}
	b, _ := os.ReadFile(path)
	t.Fatalf("%s: no %q after %v:\n%s", path, s, d, b)
}

// writePKI writes a CA, a server and a client certificate for OpenVPN.
func writePKI(t *testing.T, dir string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "i21 test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	writePEM := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writePEM("ca.pem", "CERTIFICATE", caDER)
	for i, who := range []string{"server", "client"} {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		eku := x509.ExtKeyUsageServerAuth
		if who == "client" {
			eku = x509.ExtKeyUsageClientAuth
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: who},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement, ExtKeyUsage: []x509.ExtKeyUsage{eku}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(key)
		writePEM(who+".pem", "CERTIFICATE", der)
		writePEM(who+".key", "PRIVATE KEY", kder)
	}
}

// TestProtocolRoutesRealPrograms: an OpenVPN tunnel (ping over it), an
// SSH login and curl over TLS, all through the relay's one https port at
// the same time, with Debian's openssh, openvpn and curl in namespaces.
func TestProtocolRoutesRealPrograms(t *testing.T) {
	bins := map[string]string{}
	for _, b := range []string{"sshd", "ssh", "ssh-keygen", "openvpn", "curl", "ping"} {
		p, err := exec.LookPath(b)
		if err != nil {
			if p, err = exec.LookPath("/usr/sbin/" + b); err != nil {
				t.Skipf("%s not installed (scripts/deps.sh installs openssh-server, openssh-client, openvpn, curl)", b)
			}
		}
		bins[b] = p
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun: OpenVPN cannot make its tunnel")
	}
	pn := newProtoNet(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	// sshd's privilege separation directory (its package makes it when
	// the service starts, which never happens here).
	os.MkdirAll("/run/sshd", 0o755)

	// sshd on the server namespace's own address and port 2222: never the
	// host's port 22.
	for _, k := range []string{"host", "client"} {
		if out, err := exec.Command(bins["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, k)).CombinedOutput(); err != nil {
			t.Fatalf("ssh-keygen: %v: %s", err, out)
		}
	}
	pub, _ := os.ReadFile(filepath.Join(dir, "client.pub"))
	os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o600)
	sshdConf := filepath.Join(dir, "sshd_config")
	os.WriteFile(sshdConf, []byte(fmt.Sprintf(`Port 2222
ListenAddress %s
HostKey %s/host
AuthorizedKeysFile %s/authorized_keys
PidFile %s/sshd.pid
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
`, pn.serverIP, dir, dir, dir)), 0o600)
	daemon(t, pn.server, filepath.Join(dir, "sshd.log"), bins["sshd"], "-D", "-e", "-f", sshdConf)
	waitLog(t, filepath.Join(dir, "sshd.log"), "Server listening", 10*time.Second)

	// The OpenVPN server (TLS mode: the client opens with a hard reset).
	writePKI(t, dir)
	ovpn := func(args ...string) []string {
		return append([]string{bins["openvpn"], "--dev", "tun", "--disable-dco", "--verb", "3", "--dh", "none",
			"--ca", filepath.Join(dir, "ca.pem"), "--data-ciphers", "AES-256-GCM", "--ping", "2", "--ping-exit", "60"}, args...)
	}
	daemon(t, pn.server, filepath.Join(dir, "ovpn-server.log"), ovpn("--proto", "tcp-server", "--local", pn.serverIP, "--lport", "1194",
		"--tls-server", "--cert", filepath.Join(dir, "server.pem"), "--key", filepath.Join(dir, "server.key"),
		"--ifconfig", "10.223.0.1", "10.223.0.2")...)
	waitLog(t, filepath.Join(dir, "ovpn-server.log"), "Listening for incoming TCP connection", 10*time.Second)

	// The relay, on the client side's veth address; a terminate route for
	// curl, the two protocol routes, and an access log.
	web := headersUpstream(t)
	cfg := baseConfig(
		config.Route{Protocol: "ssh", Passthrough: config.Upstreams{pn.serverIP + ":2222"}},
		config.Route{Protocol: "openvpn", Passthrough: config.Upstreams{pn.serverIP + ":1194"}},
		config.Route{Match: "web.test", Terminate: &config.Terminate{Upstream: web.URL, TLS: config.TLS{Mode: "internal"}}},
	)
	cfg.Listen.HTTPS = pn.relayIP + ":0"
	accessPath := filepath.Join(dir, "access.log")
	cfg.Log.Access = &config.AccessLog{Path: accessPath, Format: "json"}
	r := startRelay(t, cfg)
	_, port, _ := net.SplitHostPort(r.HTTPSAddr().String())
	os.WriteFile(filepath.Join(dir, "relay-ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.ca.cert.Raw}), 0o644)

	// The OpenVPN client connects to the relay's https port.
	daemon(t, pn.client, filepath.Join(dir, "ovpn-client.log"), ovpn("--proto", "tcp-client", "--remote", pn.relayIP, port,
		"--tls-client", "--remote-cert-tls", "server", "--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client.key"),
		"--ifconfig", "10.223.0.2", "10.223.0.1")...)
	waitLog(t, filepath.Join(dir, "ovpn-client.log"), "Initialization Sequence Completed", 30*time.Second)

	// With the tunnel up: ping over it, an SSH login and curl, at once.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	inClient := func(argv ...string) *exec.Cmd {
		return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", pn.client}, argv...)...)
	}
	// Both ends say so, and the first packet (which may race the
	// server's last step) has made it across.
	waitLog(t, filepath.Join(dir, "ovpn-server.log"), "Initialization Sequence Completed", 30*time.Second)
	for end := time.Now().Add(15 * time.Second); ; {
		if inClient(bins["ping"], "-c", "1", "-W", "1", "10.223.0.1").Run() == nil {
			break
		}
		if time.Now().After(end) {
			t.Fatal("no ping answer over the OpenVPN tunnel in 15 s")
		}
	}
	var wg sync.WaitGroup
	results := make([]string, 3)
	errs := make([]error, 3)
	for i, cmd := range []*exec.Cmd{
		inClient(bins["ping"], "-c", "3", "-i", "0.2", "-W", "5", "10.223.0.1"), // while ssh and curl run
		inClient(bins["ssh"], "-i", filepath.Join(dir, "client"), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
			"-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", port, "root@"+pn.relayIP, "echo", "ssh-login-ok"),
		inClient(bins["curl"], "-sS", "--max-time", "20", "--cacert", filepath.Join(dir, "relay-ca.pem"),
			"--resolve", "web.test:"+port+":"+pn.relayIP, "https://web.test:"+port+"/"),
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := cmd.CombinedOutput()
			results[i], errs[i] = string(out), err
		}()
	}
	wg.Wait()
	if errs[0] != nil || !strings.Contains(results[0], "3 received") {
		t.Errorf("ping over the OpenVPN tunnel: %v\n%s", errs[0], results[0])
	}
	if errs[1] != nil || !strings.Contains(results[1], "ssh-login-ok") {
		t.Errorf("ssh login through the relay: %v\n%s", errs[1], results[1])
	}
	if errs[2] != nil || !strings.Contains(results[2], "X-Forwarded-Proto") {
		t.Errorf("curl through the relay: %v\n%s", errs[2], results[2])
	}

	m := r.metricsText(t)
	for series, want := range map[string]float64{
		`relay_connections_total{action="passthrough",route="protocol:ssh"}`:     1,
		`relay_connections_total{action="passthrough",route="protocol:openvpn"}`: 1,
		`relay_connections_total{action="terminate",route="web.test"}`:           1,
	} {
		if v := metricValue(m, series); v != want {
			t.Errorf("%s = %v, want %v", series, v, want)
		}
	}
	lines := strings.Join(readAccessLog(t, accessPath, 2), "\n")
	for _, want := range []string{`"client":"` + pn.clientIP + `"`, `"route":"protocol:ssh","action":"passthrough","upstream":"` + pn.serverIP + `:2222"`,
		`"route":"web.test","action":"terminate"`} {
		if !strings.Contains(lines, want) {
			t.Errorf("access log lacks %s:\n%s", want, lines)
		}
	}
}
