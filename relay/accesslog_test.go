package relay

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"go.yaml.in/yaml/v3"
	"golang.org/x/crypto/bcrypt"
)

// readAccessLog waits until path holds at least n lines and returns them.
func readAccessLog(t testing.TB, path string, n int) []string {
	t.Helper()
	var lines []string
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		data, _ := os.ReadFile(path)
		lines = strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
		if len(data) > 0 && len(lines) >= n {
			return lines
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: %d lines after 10 s, want %d: %q", path, len(lines), n, lines)
	return nil
}

// accessLogRelay starts a relay with a passthrough, a reject and a
// basic-auth terminate route, logging to a file of format; it returns
// the relay, the log's path and the password file's user:password.
func accessLogRelay(t *testing.T, format string) (*testRelay, string) {
	dir := t.TempDir()
	users := filepath.Join(dir, "htpasswd")
	h, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	os.WriteFile(users, []byte("alice:"+string(h)+"\n"), 0o600)
	up := rawUpstream(t, func(c *net.TCPConn) {
		io.CopyN(io.Discard, c, 5) // the hello's record header is enough
		io.WriteString(c, "hello from upstream")
	})
	web := headersUpstream(t)
	cfg := baseConfig(
		config.Route{Match: "pt.test", Passthrough: config.Upstreams{up}},
		config.Route{Match: "rej.test", Reject: true},
		config.Route{Match: "web.test", Terminate: &config.Terminate{Upstream: web.URL, TLS: config.TLS{Mode: "internal"},
			BasicAuth: &config.BasicAuth{UsersFile: users}}},
	)
	path := filepath.Join(dir, "access.log")
	cfg.Log.Access = &config.AccessLog{Path: path, Format: format}
	old := umask(0o077) // the file is 0640 whatever the umask
	r := startRelay(t, cfg)
	umask(old)
	return r, path
}

func TestAccessLogJSON(t *testing.T) {
	r, path := accessLogRelay(t, "json")
	// passthrough
	c := dialRelay(t, r)
	c.Write(clientHello(t, "pt.test", "h2", "http/1.1"))
	got, _ := io.ReadAll(c)
	c.Close()
	if string(got) != "hello from upstream" {
		t.Fatalf("passthrough answer %q", got)
	}
	// reject, then a request without, with wrong and with good credentials
	if _, err := r.dialTLS(t, "rej.test", nil); err == nil {
		t.Fatal("rej.test: connected")
	}
	hc := httpsClient(r, false)
	for _, pass := range []string{"", "wrong", "s3cret"} {
		req, _ := http.NewRequest("GET", "https://web.test/some/path?token=secret", nil)
		req.Header.Set("User-Agent", "accesslog-test")
		if pass != "" {
			req.SetBasicAuth("alice", pass)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	lines := readAccessLog(t, path, 5)
	var es []jsonEntry
	for _, l := range lines {
		var e jsonEntry
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("not JSON: %q: %v", l, err)
		}
		if e.Client != "127.0.0.1" || e.ClientPort == 0 || e.Time == "" {
			t.Errorf("client/time: %q", l)
		}
		es = append(es, e)
	}
	find := func(pred func(e jsonEntry) bool) *jsonEntry {
		for i := range es {
			if pred(es[i]) {
				return &es[i]
			}
		}
		return nil
	}
	if e := find(func(e jsonEntry) bool { return e.Route == "pt.test" }); e == nil || e.Action != "passthrough" || e.SNI != "pt.test" ||
		e.ALPN != "h2,http/1.1" || e.Result != "ok" || e.Upstream == "" || e.BytesDown != int64(len("hello from upstream")) || e.BytesUp < 100 {
		t.Errorf("passthrough line: %+v", e)
	}
	if e := find(func(e jsonEntry) bool { return e.Route == "rej.test" }); e == nil || e.Action != "reject" || e.Result != "refused" {
		t.Errorf("reject line: %+v", e)
	}
	denied := 0
	for _, e := range es {
		if e.Route != "web.test" {
			continue
		}
		if e.Method != "GET" || e.Host != "web.test" || e.Path != "/some/path" || e.Action != "terminate" || e.UserAgent != "accesslog-test" {
			t.Errorf("request line: %+v", e)
		}
		switch e.Status {
		case 401:
			denied++
			if e.Result != "access_denied" || e.Reason != "basic_auth" {
				t.Errorf("401 line: %+v", e)
			}
		case 200:
			if e.User != "alice" || e.Result != "ok" || e.BytesDown == 0 {
				t.Errorf("200 line: %+v", e)
			}
		default:
			t.Errorf("request status %d: %+v", e.Status, e)
		}
	}
	if denied != 2 {
		t.Errorf("%d denied requests logged, want 2", denied)
	}
	if strings.Contains(strings.Join(lines, "\n"), "token=secret") {
		t.Error("the query string was logged")
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("access log mode: %v %v, want 0640", fi.Mode(), err)
	}

	// logrotate: rename, reopen, and the next line goes to a new file.
	os.Rename(path, path+".1")
	if err := r.ReopenAccessLog(); err != nil {
		t.Fatal(err)
	}
	r.dialTLS(t, "rej.test", nil)
	if l := readAccessLog(t, path, 1); len(l) != 1 || !strings.Contains(l[0], `"route":"rej.test"`) {
		t.Errorf("after reopen: %q", l)
	}
	if old := readAccessLog(t, path+".1", 5); len(old) != 5 {
		t.Errorf("rotated file has %d lines, want 5", len(old))
	}
}

func TestAccessLogCombined(t *testing.T) {
	r, path := accessLogRelay(t, "combined")
	r.dialTLS(t, "rej.test", nil)
	hc := httpsClient(r, true)
	req, _ := http.NewRequest("GET", "https://web.test/x", nil)
	req.SetBasicAuth("alice", "s3cret")
	req.Header.Set("Referer", "https://example.com/")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	lines := strings.Join(readAccessLog(t, path, 2), "\n")
	for _, want := range []string{
		`127.0.0.1 - - [`, `] "REJECT rej.test -" - 0 "-" "-" route="rej.test" action=reject result=refused sni=rej.test`,
		`127.0.0.1 - alice [`, `] "GET /x HTTP" 200 `, ` "https://example.com/" "Go-http-client/2.0" route="web.test" action=terminate result=ok sni=web.test host=web.test`,
	} {
		if !strings.Contains(lines, want) {
			t.Errorf("combined log lacks %q:\n%s", want, lines)
		}
	}
}

// TestAccessLogFullQueueDrops: a writer that cannot keep up drops lines
// (counted) and never blocks the caller.
func TestAccessLogFullQueueDrops(t *testing.T) {
	pr, pw, err := os.Pipe() // nobody reads: the writer blocks once the pipe is full
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	var dropped atomic.Uint64
	a := &accessLog{format: "json", path: "pipe", ch: make(chan *accessEntry, accessLogQueue), reopen: make(chan chan error),
		quit: make(chan struct{}), done: make(chan struct{}), dropped: &dropped, log: func(string, ...any) {}, f: pw}
	go a.run()
	start := time.Now()
	const n = 3 * accessLogQueue
	for i := range n {
		a.add(&accessEntry{Time: time.Now(), Route: fmt.Sprint("r", i), Result: resultOK})
	}
	if d := dropped.Load(); d == 0 || d >= n {
		t.Errorf("dropped %d of %d lines", d, n)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("adding %d lines took %v: the caller waited for the writer", n, el)
	}
	go io.Copy(io.Discard, bufio.NewReader(pr)) // unblock, so that close returns
	a.close()
}

// TestFail2banFilter runs Debian's fail2ban-regex with
// scripts/fail2ban's filter over lines this relay wrote, in both formats.
func TestFail2banFilter(t *testing.T) {
	bin, err := exec.LookPath("fail2ban-regex")
	if err != nil {
		t.Skip("fail2ban-regex not installed (scripts/deps.sh installs fail2ban)")
	}
	filter, _ := filepath.Abs("../scripts/fail2ban/filter.d/relay.conf")
	for _, format := range []string{"json", "combined"} {
		t.Run(format, func(t *testing.T) {
			r, path := accessLogRelay(t, format)
			c := dialRelay(t, r)
			c.Write(clientHello(t, "pt.test"))
			io.ReadAll(c)
			c.Close()
			r.dialTLS(t, "rej.test", nil)
			for _, h2 := range []bool{false, true} {
				hc := httpsClient(r, h2)
				for _, pass := range []string{"wrong", "s3cret", "again-wrong"} {
					req, _ := http.NewRequest("GET", "https://web.test/login", nil)
					req.SetBasicAuth("alice", pass)
					resp, err := hc.Do(req)
					if err != nil {
						t.Fatal(err)
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
			readAccessLog(t, path, 8)
			out, err := exec.Command(bin, "--print-all-matched", path, filter).CombinedOutput()
			if err != nil {
				t.Fatalf("fail2ban-regex: %v\n%s", err, out)
			}
			if !strings.Contains(string(out), "Lines: 8 lines, 0 ignored, 4 matched, 4 missed") {
				t.Errorf("fail2ban-regex did not match exactly the 4 refused requests:\n%s", out)
			}
			if !regexp.MustCompile(`(?m)^\|\s+127\.0\.0\.1 .*401|"client":"127\.0\.0\.1"`).Match(out) {
				t.Errorf("matched lines do not name the client:\n%s", out)
			}
		})
	}
}

// TestCrowdSecExample parses scripts/crowdsec's YAML and checks that the
// parser reads only fields the JSON access log has.
func TestCrowdSecExample(t *testing.T) {
	files, _ := filepath.Glob("../scripts/crowdsec/*/*.yaml")
	more, _ := filepath.Glob("../scripts/crowdsec/*/*/*.yaml")
	files = append(files, more...)
	if len(files) != 3 {
		t.Fatalf("crowdsec files: %v", files)
	}
	fields := map[string]bool{}
	rt := reflect.TypeOf(jsonEntry{})
	for i := range rt.NumField() {
		name, _, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ",")
		fields[name] = true
	}
	extract := regexp.MustCompile(`JsonExtract\(evt\.Line\.Raw, "([a-z_]+)"\)`)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc map[string]any
		if err := yaml.Unmarshal(data, &doc); err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if len(doc) == 0 {
			t.Errorf("%s: empty", f)
		}
		for _, m := range extract.FindAllStringSubmatch(string(data), -1) {
			if !fields[m[1]] {
				t.Errorf("%s reads field %q, which the access log does not write", f, m[1])
			}
		}
	}
}

// TestAccessLogPerClientLimit: a connection refused by limits.per_client
// leaves a line (fail2ban can count floods).
func TestAccessLogPerClientLimit(t *testing.T) {
	cfg := baseConfig(config.Route{Match: "rej.test", Reject: true})
	cfg.Limits.PerClient = &config.PerClient{Rate: 0.01, Burst: 1}
	path := filepath.Join(t.TempDir(), "access.log")
	cfg.Log.Access = &config.AccessLog{Path: path, Format: "json"}
	r := startRelay(t, cfg)
	for range 2 {
		r.dialTLS(t, "rej.test", nil)
	}
	lines := strings.Join(readAccessLog(t, path, 2), "\n")
	if !strings.Contains(lines, `"client":"127.0.0.1"`) || !strings.Contains(lines, `"result":"refused","reason":"per_client_rate"`) {
		t.Errorf("no per_client_rate line:\n%s", lines)
	}
}
