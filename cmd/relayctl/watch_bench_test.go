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
func cpuTicks(t *testing.T, pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	var sum int64
	for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime (fields 14-17)
		v, _ := strconv.ParseInt(f[i], 10, 64)
		sum += v
	}
	return sum
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
	t0, c0 := time.Now(), cpuTicks(t, pid)
	time.Sleep(time.Duration(secs) * time.Second)
	el, c1 := time.Since(t0), cpuTicks(t, pid)
	cpu := time.Duration(c1-c0) * time.Second / 100 // USER_HZ
	st, _ := readSteerState(w.state)
	t.Logf("watcher CPU over %s with no drift: %s (%.2f%% of one core, own + iptables children); checks every %gs; repairs %v",
		el.Round(time.Second), cpu, 100*cpu.Seconds()/el.Seconds(), st.Interval, st.Parts[partV4].Repairs)
}
