package relay

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// h2specPath finds h2spec (scripts/deps.sh installs it with go install):
// on PATH, else in $(go env GOPATH)/bin.
func h2specPath(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("h2spec"); err == nil {
		return p
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		p := filepath.Join(strings.TrimSpace(string(out)), "bin", "h2spec")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Skip("h2spec not installed (scripts/deps.sh: go install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible)")
	return ""
}

var h2specSummary = regexp.MustCompile(`(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed`)

// TestH2Spec: h2spec 2.2.1 against a terminate route to a plain HTTP
// upstream, default and strict, finds no failure.
func TestH2Spec(t *testing.T) {
	bin := h2specPath(t)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	cfg := baseConfig(config.Route{Match: "localhost", Terminate: &config.Terminate{Upstream: up.URL, TLS: config.TLS{Mode: "internal"}}})
	r := startRelay(t, cfg)
	port := strconv.Itoa(r.HTTPSAddr().(*net.TCPAddr).Port)
	for _, strict := range []bool{false, true} {
		args := []string{"-t", "-k", "-h", "localhost", "-p", port, "-o", "5"}
		name := "default"
		if strict {
			args, name = append(args, "-S"), "strict"
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			out, _ := exec.CommandContext(ctx, bin, args...).CombinedOutput()
			m := h2specSummary.FindStringSubmatch(string(out))
			if m == nil {
				t.Fatalf("h2spec %s: no summary in its output:\n%s", strings.Join(args, " "), out)
			}
			t.Logf("h2spec %s: %s", name, m[0])
			if m[4] != "0" {
				i := strings.Index(string(out), "Failures:")
				t.Fatalf("h2spec %s: %s\n%s", name, m[0], string(out)[max(i, 0):])
			}
		})
	}
}
