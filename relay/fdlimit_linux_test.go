package relay

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/relay-gw/relay/internal/config"
	"golang.org/x/sys/unix"
)

func TestFitConnections(t *testing.T) {
	cfg := baseConfig()
	reserve := fdReserve(cfg)
	for _, c := range []struct {
		nofile  uint64
		want    int
		clamped bool
	}{
		{0, 10000, false},
		{1 << 20, 10000, false},
		{uint64(2*10000 + reserve), 10000, false},
		{20000, (20000 - reserve) / 2, true},
		{1024, (1024 - reserve) / 2, true},
		{uint64(reserve), 1, true},
	} {
		eff, needed, clamped := fitConnections(cfg, c.nofile)
		if eff != c.want || clamped != c.clamped || needed != uint64(2*10000+reserve) {
			t.Errorf("nofile %d: (%d, %d, %v), want (%d, %d, %v)", c.nofile, eff, needed, clamped, c.want, 2*10000+reserve, c.clamped)
		}
	}
}

// fdLimitNOFILE is the child relay's open-file limit.
const fdLimitNOFILE = 512

// fdLimitChild runs a relay under RLIMIT_NOFILE fdLimitNOFILE (the test
// binary re-executed by TestOpenFilesLimit), prints its https address and
// effective max_connections, then obeys stdin: "squeeze N" lowers the
// limit to N descriptors above those open, "stats" prints the open_files
// rejections.
func fdLimitChild(up string) error {
	rl := unix.Rlimit{Cur: fdLimitNOFILE, Max: fdLimitNOFILE}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return fmt.Errorf("setrlimit: %w", err)
	}
	cfg := baseConfig(config.Route{Match: "fdlimit.test", Passthrough: config.Upstreams{up}})
	cfg.Listen.HTTP, cfg.Listen.Metrics = "off", "off"
	s, err := New(Options{Config: cfg, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Serve(ctx)
	fmt.Printf("addr %s max %d\n", s.HTTPSAddr(), s.maxConns.Load())
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 2 && f[0] == "squeeze":
			n, _ := strconv.Atoi(f[1])
			ents, _ := os.ReadDir("/proc/self/fd")
			rl := unix.Rlimit{Cur: uint64(len(ents) + n), Max: fdLimitNOFILE}
			if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
				return fmt.Errorf("setrlimit: %w", err)
			}
			fmt.Println("ok")
		case len(f) == 1 && f[0] == "stats":
			fmt.Printf("open_files %d\n", s.fds.shed.Load())
		}
	}
	return nil
}

// A relay whose max_connections (10000) does not fit its open-file limit
// says so and lowers it; when descriptors run out anyway, new connections
// are closed at once and counted while held ones keep working, accept
// resumes as soon as descriptors free, and the log has one line for it.
func TestOpenFilesLimit(t *testing.T) {
	hello := clientHello(t, "fdlimit.test")
	up := rawUpstream(t, func(c *net.TCPConn) {
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c) // echo
	})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "RELAY_FDLIMIT_CHILD="+up)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	stderr := &lockedBuf{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	out := bufio.NewScanner(stdout)
	line := func() string {
		if !out.Scan() {
			t.Fatalf("child ended: %v\n%s", out.Err(), stderr.String())
		}
		return out.Text()
	}
	var addr string
	var max int
	if _, err := fmt.Sscanf(line(), "addr %s max %d", &addr, &max); err != nil {
		t.Fatal(err)
	}
	if want := (fdLimitNOFILE - fdReserve(baseConfig(config.Route{Passthrough: config.Upstreams{up}}))) / fdsPerConn; max != want {
		t.Errorf("effective max_connections %d under %d open files, want %d", max, fdLimitNOFILE, want)
	}
	// Logged before the address was printed; the copy may lag.
	for i := 0; i < 100 && !strings.Contains(stderr.String(), "does not fit"); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	warn := stderr.String()
	for _, w := range []string{"max_connections=10000", fmt.Sprintf("open_files_limit=%d", fdLimitNOFILE), "LimitNOFILE=", "ulimit -n", fmt.Sprintf("effective_max_connections=%d", max)} {
		if !strings.Contains(warn, w) {
			t.Errorf("start-up warning lacks %q:\n%s", w, warn)
		}
	}

	// echo reports whether a new connection through the relay works.
	open := func() (*net.TCPConn, bool) {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		tc := c.(*net.TCPConn)
		ok := echoOK(tc, hello)
		if !ok {
			tc.Close()
		}
		return tc, ok
	}
	fmt.Fprintln(stdin, "squeeze 24")
	if l := line(); l != "ok" {
		t.Fatal(l)
	}
	var held []*net.TCPConn
	shed, slow := 0, 0
	start := time.Now()
	for range 60 {
		t0 := time.Now()
		if c, ok := open(); ok {
			held = append(held, c)
		} else {
			shed++
			if time.Since(t0) > 500*time.Millisecond {
				slow++
			}
		}
	}
	t.Logf("under squeeze: %d held, %d shed (%d of them not closed within 0.5 s), in %v", len(held), shed, slow, time.Since(start).Round(time.Millisecond))
	if len(held) == 0 || shed == 0 {
		t.Fatalf("%d held, %d shed: want both", len(held), shed)
	}
	if slow > shed/2 { // loose: a loaded machine may be slow
		t.Errorf("%d of %d shed connections waited > 0.5 s: want them closed at once", slow, shed)
	}
	for i, c := range held {
		if !echoOK(c, nil) {
			t.Errorf("held connection %d stopped working while others were shed", i)
		}
	}
	fmt.Fprintln(stdin, "stats")
	var n int
	fmt.Sscanf(line(), "open_files %d", &n)
	if n == 0 {
		t.Errorf("no open_files rejection counted for %d shed connections:\n%s", shed, stderr.String())
	}
	for _, c := range held {
		c.Close()
	}
	// Accept resumes once descriptors are free: no back-off stall.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, ok := open()
		if ok {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no connection served 5s after descriptors were freed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	stdin.Close()
	cmd.Wait()
	if got := strings.Count(stderr.String(), "out of open files"); got != 1 {
		t.Errorf("%d 'out of open files' log lines, want 1 per interval:\n%s", got, stderr.String())
	}
	if strings.Contains(stderr.String(), "retry_in") {
		t.Errorf("accept backed off:\n%s", stderr.String())
	}
}

// echoOK writes hello (if any) and a ping through c and reports whether
// the echo came back.
func echoOK(c *net.TCPConn, hello []byte) bool {
	c.SetDeadline(time.Now().Add(time.Second))
	defer c.SetDeadline(time.Time{})
	if hello != nil {
		if _, err := c.Write(hello); err != nil {
			return false
		}
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		return false
	}
	buf := make([]byte, 4)
	_, err := io.ReadFull(c, buf)
	return err == nil && string(buf) == "ping"
}

// lockedBuf is a strings.Builder safe to read while a command writes it.
type lockedBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
