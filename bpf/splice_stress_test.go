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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var calm = os.Getenv("SPLICE_STRESS_CALM")

// pattern fills b with the little-endian offsets of its 8-byte words, so
// a corrupted stream tells where its bytes came from.
func pattern(b []byte, off int64) {
	for i := range b {
		o := off + int64(i)
		b[i] = byte(uint64(o/8) >> (8 * (o % 8)))
	}
}

func sendPattern(c *net.TCPConn, size int64, rng *rand.Rand) error {
	buf := make([]byte, 256<<10)
	var off int64
	for off < size {
		n := min(int64(1+rng.IntN(len(buf))), size-off)
		pattern(buf[:n], off)
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

func checkPattern(c *net.TCPConn, size int64, rng *rand.Rand, skip int, prog *atomic.Int64) error {
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
			pattern(want[:n], off)
			for i := 0; i < n; i++ {
				if buf[i] != want[i] {
					return &corruption{at: off + int64(i), src: firstSrc(buf[:n], i), msg: explain(buf[:n], off, i)}
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
		for a := 0; a < 8 && a+8 <= len(b); a++ {
			cand := int64(binary.LittleEndian.Uint64(b[a:]))*8 - int64(a)
			if cand < 0 {
				continue
			}
			w := make([]byte, min(16, len(b)))
			pattern(w, cand)
			if string(w) == string(b[:len(w)]) {
				c.at = cand
				break
			}
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
			errs[0] = sendPattern(p.client, size, rand.New(rand.NewPCG(seed, 1)))
			fail(errs[0])
		}()
		go func() {
			defer wg.Done()
			errs[1] = sendPattern(p.upstream, size, rand.New(rand.NewPCG(seed, 2)))
			fail(errs[1])
		}()
		go func() {
			defer wg.Done()
			errs[2] = checkPattern(p.upstream, size, rand.New(rand.NewPCG(seed, 3)), len(pre), &progUp)
			fail(errs[2])
		}()
		go func() {
			defer wg.Done()
			errs[3] = checkPattern(p.client, size, rand.New(rand.NewPCG(seed, 4)), 0, &progDown)
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
// offset off) came from in the sender's stream, run by run.
func explain(buf []byte, off int64, i int) string {
	var out []string
	for j := i; j < len(buf) && len(out) < 8; {
		src := int64(-1)
		for a := 0; a < 8 && j+a+8 <= len(buf); a++ {
			cand := int64(binary.LittleEndian.Uint64(buf[j+a:]))*8 - int64(a)
			if cand < 0 {
				continue
			}
			w := make([]byte, min(32, len(buf)-j))
			pattern(w, cand)
			if string(w) == string(buf[j:j+len(w)]) {
				src = cand
				break
			}
		}
		if src < 0 {
			out = append(out, fmt.Sprintf("at %d: unknown bytes %x", off+int64(j), buf[j:min(j+16, len(buf))]))
			break
		}
		// extend the run
		k := j
		w := make([]byte, 1)
		for ; k < len(buf); k++ {
			pattern(w, src+int64(k-j))
			if buf[k] != w[0] {
				break
			}
		}
		out = append(out, fmt.Sprintf("at %d: %d bytes from sender offset %d (delta %+d)", off+int64(j), k-j, src, src-(off+int64(j))))
		j = k
	}
	return strings.Join(out, "; ")
}

type corruption struct {
	at, src int64
	msg     string
}

func (c *corruption) Error() string { return fmt.Sprintf("byte %d differs: %s", c.at, c.msg) }

func firstSrc(buf []byte, j int) int64 {
	for a := 0; a < 8 && j+a+8 <= len(buf); a++ {
		cand := int64(binary.LittleEndian.Uint64(buf[j+a:]))*8 - int64(a)
		if cand < 0 {
			continue
		}
		w := make([]byte, min(16, len(buf)-j))
		pattern(w, cand)
		if string(w) == string(buf[j:j+len(w)]) {
			return cand
		}
	}
	return -1
}
