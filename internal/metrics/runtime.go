package metrics

import (
	"bytes"
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The Go runtime and process collectors export the families, HELP texts
// and values of client_golang v1.23's collectors.NewGoCollector() and
// NewProcessCollector(ProcessCollectorOpts{}) with default options, so
// that dashboards built for them keep working.

// memstats are client_golang's go_memstats_* families, computed like its
// memStatsFromRM from runtime/metrics (which, unlike ReadMemStats, does
// not stop the world): each is the sum of the listed runtime metrics.
var memstats = []struct {
	name, help string
	kind       Kind
	sum        []string
}{
	{"alloc_bytes", "Number of bytes allocated in heap and currently in use. Equals to /memory/classes/heap/objects:bytes.", KindGauge,
		[]string{"/memory/classes/heap/objects:bytes"}},
	{"alloc_bytes_total", "Total number of bytes allocated in heap until now, even if released already. Equals to /gc/heap/allocs:bytes.", KindCounter,
		[]string{"/gc/heap/allocs:bytes"}},
	{"sys_bytes", "Number of bytes obtained from system. Equals to /memory/classes/total:byte.", KindGauge,
		[]string{"/memory/classes/total:bytes"}},
	{"mallocs_total", "Total number of heap objects allocated, both live and gc-ed. Semantically a counter version for go_memstats_heap_objects gauge. Equals to /gc/heap/allocs:objects + /gc/heap/tiny/allocs:objects.", KindCounter,
		[]string{"/gc/heap/allocs:objects", "/gc/heap/tiny/allocs:objects"}},
	{"frees_total", "Total number of heap objects frees. Equals to /gc/heap/frees:objects + /gc/heap/tiny/allocs:objects.", KindCounter,
		[]string{"/gc/heap/frees:objects", "/gc/heap/tiny/allocs:objects"}},
	{"heap_alloc_bytes", "Number of heap bytes allocated and currently in use, same as go_memstats_alloc_bytes. Equals to /memory/classes/heap/objects:bytes.", KindGauge,
		[]string{"/memory/classes/heap/objects:bytes"}},
	{"heap_sys_bytes", "Number of heap bytes obtained from system. Equals to /memory/classes/heap/objects:bytes + /memory/classes/heap/unused:bytes + /memory/classes/heap/released:bytes + /memory/classes/heap/free:bytes.", KindGauge,
		[]string{"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes", "/memory/classes/heap/released:bytes", "/memory/classes/heap/free:bytes"}},
	{"heap_idle_bytes", "Number of heap bytes waiting to be used. Equals to /memory/classes/heap/released:bytes + /memory/classes/heap/free:bytes.", KindGauge,
		[]string{"/memory/classes/heap/released:bytes", "/memory/classes/heap/free:bytes"}},
	{"heap_inuse_bytes", "Number of heap bytes that are in use. Equals to /memory/classes/heap/objects:bytes + /memory/classes/heap/unused:bytes", KindGauge,
		[]string{"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes"}},
	{"heap_released_bytes", "Number of heap bytes released to OS. Equals to /memory/classes/heap/released:bytes.", KindGauge,
		[]string{"/memory/classes/heap/released:bytes"}},
	{"heap_objects", "Number of currently allocated objects. Equals to /gc/heap/objects:objects.", KindGauge,
		[]string{"/gc/heap/objects:objects"}},
	{"stack_inuse_bytes", "Number of bytes obtained from system for stack allocator in non-CGO environments. Equals to /memory/classes/heap/stacks:bytes.", KindGauge,
		[]string{"/memory/classes/heap/stacks:bytes"}},
	{"stack_sys_bytes", "Number of bytes obtained from system for stack allocator. Equals to /memory/classes/heap/stacks:bytes + /memory/classes/os-stacks:bytes.", KindGauge,
		[]string{"/memory/classes/heap/stacks:bytes", "/memory/classes/os-stacks:bytes"}},
	{"mspan_inuse_bytes", "Number of bytes in use by mspan structures. Equals to /memory/classes/metadata/mspan/inuse:bytes.", KindGauge,
		[]string{"/memory/classes/metadata/mspan/inuse:bytes"}},
	{"mspan_sys_bytes", "Number of bytes used for mspan structures obtained from system. Equals to /memory/classes/metadata/mspan/inuse:bytes + /memory/classes/metadata/mspan/free:bytes.", KindGauge,
		[]string{"/memory/classes/metadata/mspan/inuse:bytes", "/memory/classes/metadata/mspan/free:bytes"}},
	{"mcache_inuse_bytes", "Number of bytes in use by mcache structures. Equals to /memory/classes/metadata/mcache/inuse:bytes.", KindGauge,
		[]string{"/memory/classes/metadata/mcache/inuse:bytes"}},
	{"mcache_sys_bytes", "Number of bytes used for mcache structures obtained from system. Equals to /memory/classes/metadata/mcache/inuse:bytes + /memory/classes/metadata/mcache/free:bytes.", KindGauge,
		[]string{"/memory/classes/metadata/mcache/inuse:bytes", "/memory/classes/metadata/mcache/free:bytes"}},
	{"buck_hash_sys_bytes", "Number of bytes used by the profiling bucket hash table. Equals to /memory/classes/profiling/buckets:bytes.", KindGauge,
		[]string{"/memory/classes/profiling/buckets:bytes"}},
	{"gc_sys_bytes", "Number of bytes used for garbage collection system metadata. Equals to /memory/classes/metadata/other:bytes.", KindGauge,
		[]string{"/memory/classes/metadata/other:bytes"}},
	{"other_sys_bytes", "Number of bytes used for other system allocations. Equals to /memory/classes/other:bytes.", KindGauge,
		[]string{"/memory/classes/other:bytes"}},
	{"next_gc_bytes", "Number of heap bytes when next garbage collection will take place. Equals to /gc/heap/goal:bytes.", KindGauge,
		[]string{"/gc/heap/goal:bytes"}},
}

// runtimeGauges are the runtime/metrics client_golang exports by default,
// under names derived from theirs; HELP is the runtime's description.
var runtimeGauges = []struct{ name, rm string }{
	{"go_gc_gogc_percent", "/gc/gogc:percent"},
	{"go_gc_gomemlimit_bytes", "/gc/gomemlimit:bytes"},
	{"go_sched_gomaxprocs_threads", "/sched/gomaxprocs:threads"},
}

type goCollector struct {
	goroutines, threads, gc, lastGC, info *Desc
	memstats                              []*Desc
	rm                                    []*Desc // of runtimeGauges; nil if the runtime lacks one
	mu                                    sync.Mutex
	samples                               []rtmetrics.Sample // guarded by mu
	index                                 map[string]int     // runtime metric name → samples index
}

// NewGoCollector returns the collector of the go_* families.
func NewGoCollector() Collector {
	c := &goCollector{
		goroutines: NewDesc("go_goroutines", "Number of goroutines that currently exist.", KindGauge),
		threads:    NewDesc("go_threads", "Number of OS threads created.", KindGauge),
		gc:         NewDesc("go_gc_duration_seconds", "A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.", KindSummary),
		lastGC:     NewDesc("go_memstats_last_gc_time_seconds", "Number of seconds since 1970 of last garbage collection.", KindGauge),
		info:       NewDesc("go_info", "Information about the Go environment.", KindGauge, "version"),
		rm:         make([]*Desc, len(runtimeGauges)),
		index:      map[string]int{},
	}
	known := map[string]rtmetrics.Description{}
	for _, d := range rtmetrics.All() {
		known[d.Name] = d
	}
	add := func(name string) {
		if _, ok := c.index[name]; !ok && known[name].Kind != rtmetrics.KindBad {
			c.index[name] = len(c.samples)
			c.samples = append(c.samples, rtmetrics.Sample{Name: name})
		}
	}
	for _, m := range memstats {
		c.memstats = append(c.memstats, NewDesc("go_memstats_"+m.name, m.help, m.kind))
		for _, n := range m.sum {
			add(n)
		}
	}
	for i, g := range runtimeGauges {
		if d, ok := known[g.rm]; ok {
			kind := KindGauge
			if d.Cumulative {
				kind = KindCounter
			}
			c.rm[i] = NewDesc(g.name, d.Description+" Sourced from "+g.rm+".", kind)
			add(g.rm)
		}
	}
	return c
}

func (c *goCollector) Describe() []*Desc {
	ds := append([]*Desc{c.goroutines, c.threads, c.gc, c.lastGC, c.info}, c.memstats...)
	for _, d := range c.rm {
		if d != nil {
			ds = append(ds, d)
		}
	}
	return ds
}

func (c *goCollector) Collect(s *Sink) error {
	s.Add(c.goroutines, float64(runtime.NumGoroutine()))
	n, _ := runtime.ThreadCreateProfile(nil)
	s.Add(c.threads, float64(n))
	stats := debug.GCStats{PauseQuantiles: make([]time.Duration, 5)}
	debug.ReadGCStats(&stats)
	qs := make([]Quantile, len(stats.PauseQuantiles))
	for i, q := range stats.PauseQuantiles {
		qs[i] = Quantile{float64(i) / float64(len(qs)-1), q.Seconds()}
	}
	s.Summary(c.gc, uint64(stats.NumGC), stats.PauseTotal.Seconds(), qs)
	s.Add(c.lastGC, float64(stats.LastGC.UnixNano())/1e9)
	s.Add(c.info, 1, runtime.Version())

	c.mu.Lock()
	defer c.mu.Unlock()
	rtmetrics.Read(c.samples)
	value := func(name string) rtmetrics.Value {
		if i, ok := c.index[name]; ok {
			return c.samples[i].Value
		}
		return rtmetrics.Value{} // KindBad
	}
	for i, m := range memstats {
		var sum uint64 // like memStatsFromRM: MemStats fields are uint64
		for _, n := range m.sum {
			if v := value(n); v.Kind() == rtmetrics.KindUint64 {
				sum += v.Uint64()
			}
		}
		s.Add(c.memstats[i], float64(sum))
	}
	for i, g := range runtimeGauges {
		if c.rm[i] == nil {
			continue
		}
		switch v := value(g.rm); v.Kind() {
		case rtmetrics.KindUint64:
			s.Add(c.rm[i], float64(v.Uint64()))
		case rtmetrics.KindFloat64:
			s.Add(c.rm[i], v.Float64())
		}
	}
	return nil
}

type processCollector struct {
	cpu, openFDs, maxFDs, vsize, maxVsize, rss, start, netIn, netOut *Desc
	btime                                                            func() (float64, error)
}

// NewProcessCollector returns the collector of the process_* families,
// read from /proc/self. Like client_golang's default, a value that cannot
// be read is left out rather than failing the scrape.
func NewProcessCollector() Collector {
	return &processCollector{
		cpu:      NewDesc("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", KindCounter),
		openFDs:  NewDesc("process_open_fds", "Number of open file descriptors.", KindGauge),
		maxFDs:   NewDesc("process_max_fds", "Maximum number of open file descriptors.", KindGauge),
		vsize:    NewDesc("process_virtual_memory_bytes", "Virtual memory size in bytes.", KindGauge),
		maxVsize: NewDesc("process_virtual_memory_max_bytes", "Maximum amount of virtual memory available in bytes.", KindGauge),
		rss:      NewDesc("process_resident_memory_bytes", "Resident memory size in bytes.", KindGauge),
		start:    NewDesc("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", KindGauge),
		netIn:    NewDesc("process_network_receive_bytes_total", "Number of bytes received by the process over the network.", KindCounter),
		netOut:   NewDesc("process_network_transmit_bytes_total", "Number of bytes sent by the process over the network.", KindCounter),
		btime:    sync.OnceValues(bootTime),
	}
}

func (c *processCollector) Describe() []*Desc {
	return []*Desc{c.cpu, c.openFDs, c.maxFDs, c.vsize, c.maxVsize, c.rss, c.start, c.netIn, c.netOut}
}

// userHZ is the unit of the times in /proc/PID/stat; procfs assumes 100
// too (it is on all Linux architectures the relay builds for).
const userHZ = 100

func (c *processCollector) Collect(s *Sink) error {
	if b, err := os.ReadFile("/proc/self/stat"); err == nil {
		// Fields after the command name, which may hold spaces: state is
		// [0], utime [11], stime [12], starttime [19], vsize [20], rss [21].
		if i := bytes.LastIndexByte(b, ')'); i >= 0 {
			if f := strings.Fields(string(b[i+1:])); len(f) > 21 {
				num := func(i int) float64 { v, _ := strconv.ParseUint(f[i], 10, 64); return float64(v) }
				s.Add(c.cpu, (num(11)+num(12))/userHZ)
				s.Add(c.vsize, num(20))
				s.Add(c.rss, num(21)*float64(os.Getpagesize()))
				if bt, err := c.btime(); err == nil {
					s.Add(c.start, bt+num(19)/userHZ)
				}
			}
		}
	}
	if n, err := openFDs(); err == nil {
		s.Add(c.openFDs, float64(n))
	}
	if b, err := os.ReadFile("/proc/self/limits"); err == nil {
		fds, fdsOK := limit(b, "Max open files")
		as, asOK := limit(b, "Max address space")
		if fdsOK && asOK {
			s.Add(c.maxFDs, fds)
			s.Add(c.maxVsize, as)
		}
	}
	if b, err := os.ReadFile("/proc/self/net/netstat"); err == nil {
		in, out := ipExtOctets(b)
		s.Add(c.netIn, in)
		s.Add(c.netOut, out)
	}
	return nil
}

func bootTime() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, os.ErrNotExist
}

// openFDs counts /proc/self/fd; since Linux 6.2 its size is the count.
func openFDs() (int, error) {
	if fi, err := os.Stat("/proc/self/fd"); err == nil && fi.Size() > 0 {
		return int(fi.Size()), nil
	}
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	return len(names), err
}

// limit returns the soft limit of the /proc/PID/limits row called name.
func limit(b []byte, name string) (float64, bool) {
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, name); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				return 0, false
			}
			if f[0] == "unlimited" {
				return 1<<64 - 1, true // procfs's value: 1.8446744073709552e+19
			}
			v, err := strconv.ParseUint(f[0], 10, 64)
			return float64(v), err == nil
		}
	}
	return 0, false
}

// ipExtOctets returns InOctets and OutOctets of the IpExt rows of
// /proc/PID/net/netstat: a header row of names, then a row of values.
func ipExtOctets(b []byte) (in, out float64) {
	var names []string
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(line, "IpExt:")
		if !ok {
			continue
		}
		if names == nil {
			names = strings.Fields(rest)
			continue
		}
		for i, v := range strings.Fields(rest) {
			if i < len(names) {
				switch names[i] {
				case "InOctets":
					in, _ = strconv.ParseFloat(v, 64)
				case "OutOctets":
					out, _ = strconv.ParseFloat(v, 64)
				}
			}
		}
		break
	}
	return in, out
}
