package main

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cpuTicks returns a process's CPU time in clock ticks, its own plus that
// of its reaped children (the iptables runs of the checks).
func cpuTicks(t *testing.T, pid int) (own, children int64) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	v := make([]int64, 4)
	for j, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime (fields 14-17)
		v[j], _ = strconv.ParseInt(f[i], 10, 64)
	}
	return v[0] + v[1], v[2] + v[3]
}

// TestWatchCPU measures `rules apply --watch` with nothing drifting:
// CPU over RELAY_BENCH_WATCH seconds (60 for docs/BENCHMARKS.md), iptables
// v4+v6, sk_lookup and sockmap watched. A measurement, not a pass/fail:
//
//	RELAY_BENCH_WATCH=60 go test -count=1 -v -run TestWatchCPU ./cmd/relayctl
func TestWatchCPU(t *testing.T) {
	secs, _ := strconv.Atoi(os.Getenv("RELAY_BENCH_WATCH"))
	if secs <= 0 {
		t.Skip("a measurement: set RELAY_BENCH_WATCH=60 to run it")
	}
	if err := bpfSupported(); err != nil {
		t.Skip(err)
	}
	w := newWatchNet(t, "b", "{bpf: on, pin_dir: PINS}")
	watch, _ := w.startWatch(t, partV4, partV6, partSkLookup, partSockmap)
	time.Sleep(3 * time.Second)
	pid := watch.Process.Pid
	t0 := time.Now()
	o0, c0 := cpuTicks(t, pid)
	time.Sleep(time.Duration(secs) * time.Second)
	el := time.Since(t0)
	o1, c1 := cpuTicks(t, pid)
	tick := func(n int64) time.Duration { return time.Duration(n) * time.Second / 100 } // USER_HZ
	cpu := tick(o1 - o0 + c1 - c0)
	st, _ := readSteerState(w.state)
	t.Logf("watcher CPU over %s with no drift: %s = %.2f%% of one core (relayctl %s, its iptables runs %s); checks every %gs; repairs %d",
		el.Round(time.Second), cpu, 100*cpu.Seconds()/el.Seconds(), tick(o1-o0), tick(c1-c0), st.Interval, st.Parts[partV4].Repairs)
}
