//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var calm = os.Getenv("SPLICE_STRESS_CALM")

// pattern fills b with little-endian 8-byte words holding the stream id
// (top 16 bits) and the word's offset in the stream, so a corrupted
// stream tells where its bytes came from, even from another connection.
func pattern(b []byte, off int64, id uint64) {
	for i := range b {
		o := off + int64(i)
		b[i] = byte((uint64(o/8) | id<<48) >> (8 * (o % 8)))
	}
}

// origin finds the stream and offset that b[j:] was sent at (ok false:
// no pattern matches 16 bytes there).
func origin(b []byte, j int) (id uint64, off int64, ok bool) {
	for a := 0; a < 8 && j+a+8 <= len(b); a++ {
		w := binary.LittleEndian.Uint64(b[j+a:])
		id, off = w>>48, int64(w&(1<<48-1))*8-int64(a)
		if off < 0 {
			continue
		}
		want := make([]byte, min(16, len(b)-j))
		pattern(want, off, id)
		if string(want) == string(b[j:j+len(want)]) {
			return id, off, true
		}
	}
	return 0, 0, false
}

func sendPattern(c *net.TCPConn, size int64, id uint64, rng *rand.Rand) error {
	buf := make([]byte, 256<<10)
	var off int64
	for off < size {
		n := min(int64(1+rng.IntN(len(buf))), size-off)
		pattern(buf[:n], off, id)
		if _, err := c.Write(buf[:n]); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		off += n
		if calm == "" && rng.IntN(64) == 0 {
			time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
		}
	}
	return c.CloseWrite()
}

func checkPattern(c *net.TCPConn, size int64, id uint64, rng *rand.Rand, skip int, prog *atomic.Int64) error {
	buf := make([]byte, 256<<10)
	want := make([]byte, len(buf))
	var off int64
	for {
		n, err := c.Read(buf[:1+rng.IntN(len(buf))])
		if n > 0 {
			if skip > 0 {
				k := min(skip, n)
				skip -= k
				copy(buf, buf[k:n])
				n -= k
			}
			pattern(want[:n], off, id)
			for i := 0; i < n; i++ {
				if buf[i] != want[i] {
					_, src, ok := origin(buf[:n], i)
					if !ok {
						src = -1
					}
					return &corruption{at: off + int64(i), src: src, msg: explain(buf[:n], off, i, id)}
				}
			}
			off += int64(n)
			prog.Store(off)
		}
		if err == io.EOF {
			if off != size {
				return fmt.Errorf("EOF after %d of %d bytes", off, size)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		if calm == "" && rng.IntN(32) == 0 {
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
		}
	}
}

// TestSpliceStress moves patterned bytes both ways at once, with readers
// and writers pausing at random so the verdict keeps switching between
// redirecting and passing, and checks every byte's offset.
func TestSpliceStress(t *testing.T) {
	// A short run by default; a soak with e.g. SPLICE_STRESS_ROUNDS=60
	// SPLICE_STRESS_MIB=256 (and a CPU hog beside it).
	rounds, _ := strconv.Atoi(os.Getenv("SPLICE_STRESS_ROUNDS"))
	if rounds == 0 {
		rounds = 2
	}
	mib, _ := strconv.Atoi(os.Getenv("SPLICE_STRESS_MIB"))
	if mib == 0 {
		mib = 32
	}
	size := int64(mib) << 20
	s := newTestSplicer(t)
	type copied struct {
		at   int64 // sender offset of the first byte (-1 unknown)
		n    int
		stat spliceSpliceStat
		cfg  spliceSpliceCfg
	}
	var (
		hookMu sync.Mutex
		log    [2][]copied
	)
	copyHook = func(d *dir, b []byte) {
		c := copied{at: -1, n: len(b), cfg: d.cfg}
		s.stat.Lookup(d.src.cookie, &c.stat)
		if _, off, ok := origin(b, 0); ok {
			c.at = off
		}
		hookMu.Lock()
		log[d.cfg.Dir] = append(log[d.cfg.Dir], c)
		hookMu.Unlock()
	}
	t.Cleanup(func() { copyHook = nil })
	showCopies := func(dir int, from, to int64) {
		hookMu.Lock()
		defer hookMu.Unlock()
		for i, c := range log[dir] {
			if c.at+int64(c.n) >= from && c.at <= to || c.at < 0 && i > 0 && log[dir][i-1].at >= from-(1<<20) {
				t.Logf("dir %d copy #%d: sender %d..%d (%d bytes) stat %+v cfg written %d consumed %d", dir, i, c.at, c.at+int64(c.n), c.n, c.stat, c.cfg.Written, c.cfg.Consumed)
			}
		}
	}
	for r := 0; r < rounds; r++ {
		hookMu.Lock()
		log = [2][]copied{}
		hookMu.Unlock()
		pre := []byte("HELLO")
		p := newSplicedPair(t, s, pre, time.Minute)
		seed := uint64(time.Now().UnixNano())
		var wg sync.WaitGroup
		errs := make([]error, 4)
		var progUp, progDown atomic.Int64
		stop := make(chan struct{})
		go func() {
			var lastU, lastD int64
			still := 0
			for {
				select {
				case <-stop:
					return
				case <-time.After(time.Second):
				}
				u, d := progUp.Load(), progDown.Load()
				if u == lastU && d == lastD && (u < size || d < size) {
					still++
				} else {
					still = 0
				}
				lastU, lastD = u, d
				if still == 3 {
					t.Logf("STALL at up %d down %d", u, d)
					s.dumpPairs(t)
					out, _ := exec.Command("ss", "-tnmi", "state", "established", "( sport = :"+strconv.Itoa(p.relayIn.LocalAddr().(*net.TCPAddr).Port)+" or dport = :"+strconv.Itoa(p.upstream.LocalAddr().(*net.TCPAddr).Port)+" or sport = :"+strconv.Itoa(p.upstream.LocalAddr().(*net.TCPAddr).Port)+" )").CombinedOutput()
					t.Logf("%s", out)
				}
			}
		}()
		start := time.Now()
		// The first error ends the round: nobody reads on after it.
		fail := func(err error) {
			if err != nil {
				t.Logf("round %d: %v", r, err)
				s.dumpPairs(t)
				p.client.Close()
				p.upstream.Close()
			}
		}
		wg.Add(4)
		go func() {
			defer wg.Done()
			errs[0] = sendPattern(p.client, size, 0, rand.New(rand.NewPCG(seed, 1)))
			fail(errs[0])
		}()
		go func() {
			defer wg.Done()
			errs[1] = sendPattern(p.upstream, size, 0, rand.New(rand.NewPCG(seed, 2)))
			fail(errs[1])
		}()
		go func() {
			defer wg.Done()
			errs[2] = checkPattern(p.upstream, size, 0, rand.New(rand.NewPCG(seed, 3)), len(pre), &progUp)
			fail(errs[2])
		}()
		go func() {
			defer wg.Done()
			errs[3] = checkPattern(p.client, size, 0, rand.New(rand.NewPCG(seed, 4)), 0, &progDown)
		}()
		wg.Wait()
		close(stop)
		t.Logf("round %d: %v", r, time.Since(start))
		for i, e := range errs {
			if e != nil {
				t.Errorf("round %d seed %d: %s: %v", r, seed, []string{"client send", "upstream send", "client → upstream", "upstream → client"}[i], e)
			}
		}
		select {
		case res := <-p.done:
			if res.err != nil || res.up != size || res.down != size {
				t.Errorf("round %d: Splice = %d, %d, %v", r, res.up, res.down, res.err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: pair did not finish", r)
		}
		if t.Failed() {
			for i, e := range errs[2:] {
				var ce *corruption
				if errors.As(e, &ce) {
					showCopies(i, ce.src-(256<<10), ce.at+(256<<10))
				}
			}
			return
		}
		up, down, _ := s.SplicedBytes()
		t.Logf("round %d ok (kernel totals %d up, %d down)", r, up, down)
	}
}

func (s *Splicer) dumpPairs(t *testing.T) {
	s.poll.mu.Lock()
	defer s.poll.mu.Unlock()
	for p := range s.poll.pairs {
		for _, d := range []*dir{p.up, p.down} {
			var st spliceSpliceStat
			var cfg spliceSpliceCfg
			e1 := s.stat.Lookup(d.src.cookie, &st)
			e2 := s.cfg.Lookup(d.src.cookie, &cfg)
			q, _ := d.dst.queued()
			a, _ := d.dst.acked()
			t.Logf("dir %d: stat %+v (%v) cfg %+v (%v) local cfg %+v; src inq %d; dst queued %d acked %d; copied %d ended %v",
				d.cfg.Dir, st, e1, cfg, e2, d.cfg, d.src.inq(), q, a, d.copied.Load(), d.ended.Load())
		}
	}
}

// explain says where the received bytes from index i of buf (stream
// offset off of stream id) came from, run by run.
func explain(buf []byte, off int64, i int, id uint64) string {
	var out []string
	for j := i; j < len(buf) && len(out) < 8; {
		sid, src, ok := origin(buf, j)
		if !ok {
			out = append(out, fmt.Sprintf("at %d: unknown bytes %x", off+int64(j), buf[j:min(j+16, len(buf))]))
			break
		}
		k := j
		w := make([]byte, 1)
		for ; k < len(buf); k++ {
			pattern(w, src+int64(k-j), sid)
			if buf[k] != w[0] {
				break
			}
		}
		from := ""
		if sid != id {
			from = fmt.Sprintf(" of ANOTHER stream (%d)", sid)
		}
		out = append(out, fmt.Sprintf("at %d: %d bytes from sender offset %d%s (delta %+d)", off+int64(j), k-j, src, from, src-(off+int64(j))))
		j = k
	}
	return strings.Join(out, "; ")
}

type corruption struct {
	at, src int64
	msg     string
}

func (c *corruption) Error() string { return fmt.Sprintf("byte %d differs: %s", c.at, c.msg) }

// TestSpliceStressPairs runs several pairs at once, each stream with its
// own id in its bytes, so that a verdict acting on another pair's
// bookkeeping (a map value recycled under it) shows as bytes of another
// stream, and the relay's map updates of one pair race the verdicts of
// the others. SPLICE_STRESS_PAIRS, _ROUNDS and _MIB size it.
func TestSpliceStressPairs(t *testing.T) {
	env := func(name string, def int) int {
		if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
			return v
		}
		return def
	}
	pairs, rounds, size := env("SPLICE_STRESS_PAIRS", 6), env("SPLICE_STRESS_ROUNDS", 2), int64(env("SPLICE_STRESS_MIB", 8))<<20
	s := newTestSplicer(t)
	// Why each pair ended (by its client-side cookie), shown for a pair
	// that ended wrong: finish maps resets and EPIPE to a nil error.
	var whyMu sync.Mutex
	why := map[uint64]string{}
	finishHook = func(p *pair, err error) {
		var b strings.Builder
		for i, d := range []*dir{p.up, p.down} {
			var st spliceSpliceStat
			s.stat.Lookup(d.src.cookie, &st)
			q, _ := d.dst.queued()
			fmt.Fprintf(&b, "\n  dir %d: stat %+v; src inq %d; dst queued %d; copied %d ended %v", i, st, d.src.inq(), q, d.copied.Load(), d.ended.Load())
		}
		whyMu.Lock()
		why[p.a.cookie] = fmt.Sprintf("finish(%v)%s\n%s", err, b.String(), debug.Stack())
		whyMu.Unlock()
	}
	t.Cleanup(func() { finishHook = nil })
	for r := 0; r < rounds; r++ {
		seed := uint64(time.Now().UnixNano())
		var wg sync.WaitGroup
		errs := make(chan error, 4*pairs)
		for i := 0; i < pairs; i++ {
			pre := []byte("HELLO")
			p := newSplicedPair(t, s, pre, time.Minute)
			upID, downID := uint64(2*i+1), uint64(2*i+2)
			var progUp, progDown atomic.Int64
			run := func(what string, f func() error) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := f(); err != nil {
						errs <- fmt.Errorf("pair %d %s: %w", i, what, err)
						p.client.Close()
						p.upstream.Close()
					}
				}()
			}
			rng := func(k uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, uint64(i)*8+k)) }
			run("client send", func() error { return sendPattern(p.client, size, upID, rng(1)) })
			run("upstream send", func() error { return sendPattern(p.upstream, size, downID, rng(2)) })
			run("client → upstream", func() error { return checkPattern(p.upstream, size, upID, rng(3), len(pre), &progUp) })
			run("upstream → client", func() error { return checkPattern(p.client, size, downID, rng(4), 0, &progDown) })
			wg.Add(1)
			go func() {
				defer wg.Done()
				select {
				case res := <-p.done:
					if res.err != nil || res.up != size || res.down != size {
						whyMu.Lock()
						w := why[p.cookie]
						whyMu.Unlock()
						errs <- fmt.Errorf("pair %d: Splice = %d, %d, %v: %s", i, res.up, res.down, res.err, w)
					}
				case <-time.After(2 * time.Minute):
					errs <- fmt.Errorf("pair %d did not finish", i)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("round %d seed %d: %v", r, seed, err)
		}
		if t.Failed() {
			return
		}
	}
}
