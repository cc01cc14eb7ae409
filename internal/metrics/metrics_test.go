package metrics

import (
	"errors"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
)

func TestWriteText(t *testing.T) {
	reg := NewRegistry()
	conns := NewCounterVec("b_connections_total", "Connections, by route and action.", "route", "action")
	conns.WithLabelValues("z.test", "passthrough").Inc()
	conns.WithLabelValues("a.test", "terminate").Add(2.5)
	conns.WithLabelValues("a.test", "passthrough").Add(1e6)
	conns.WithLabelValues(`q"uo\te`+"\n", "reject")
	active := NewGaugeVec("a_active", "Help with \\ and\nnewline \"quoted\".", "route")
	active.WithLabelValues("x").Inc()
	active.WithLabelValues("x").Dec()
	active.WithLabelValues("x").Dec()
	up := NewGauge("c_up", "")
	up.Set(1)
	empty := NewCounterVec("d_empty_total", "No series yet: not exposed.", "l")
	gc := NewDesc("e_pause_seconds", "A summary.", KindSummary, "kind")
	reg.MustRegister(conns, active, up, empty, collectorFunc{[]*Desc{gc}, func(s *Sink) error {
		s.Summary(gc, 3, 0.75, []Quantile{{1, 0.5}, {0, 0.0001}, {0.5, 0.25}}, "stw")
		return nil
	}})
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := string(AppendText(nil, fams))
	want := `# HELP a_active Help with \\ and\nnewline "quoted".
# TYPE a_active gauge
a_active{route="x"} -1
# HELP b_connections_total Connections, by route and action.
# TYPE b_connections_total counter
b_connections_total{action="passthrough",route="a.test"} 1e+06
b_connections_total{action="passthrough",route="z.test"} 1
b_connections_total{action="reject",route="q\"uo\\te\n"} 0
b_connections_total{action="terminate",route="a.test"} 2.5
# HELP c_up 
# TYPE c_up gauge
c_up 1
# HELP e_pause_seconds A summary.
# TYPE e_pause_seconds summary
e_pause_seconds{kind="stw",quantile="0"} 0.0001
e_pause_seconds{kind="stw",quantile="0.5"} 0.25
e_pause_seconds{kind="stw",quantile="1"} 0.5
e_pause_seconds_sum{kind="stw"} 0.75
e_pause_seconds_count{kind="stw"} 3
`
	if got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}

type collectorFunc struct {
	descs   []*Desc
	collect func(*Sink) error
}

func (c collectorFunc) Describe() []*Desc     { return c.descs }
func (c collectorFunc) Collect(s *Sink) error { return c.collect(s) }

func TestAppendFloat(t *testing.T) {
	for _, tc := range []struct {
		f    float64
		want string
	}{
		{0, "0"}, {math.Copysign(0, -1), "0"}, {1, "1"}, {-1, "-1"}, {0.5, "0.5"},
		{344832, "344832"}, {999999, "999999"}, {1e6, "1e+06"}, {1444729, "1.444729e+06"},
		{1.79559215812e9, "1.79559215812e+09"}, {0.0001, "0.0001"}, {0.00001, "1e-05"},
		{float64(math.MaxInt64), "9.223372036854776e+18"}, {1<<64 - 1, "1.8446744073709552e+19"},
		{math.NaN(), "NaN"}, {math.Inf(1), "+Inf"}, {math.Inf(-1), "-Inf"},
	} {
		if got := string(appendFloat(nil, tc.f)); got != tc.want {
			t.Errorf("%v: got %s, want %s", tc.f, got, tc.want)
		}
	}
}

func TestRegisterErrors(t *testing.T) {
	reg := NewRegistry()
	reg.MustRegister(NewCounter("a_total", "A."))
	for name, c := range map[string]Collector{
		"same name":           NewGauge("a_total", "Another."),
		"twice in one":        collectorFunc{descs: []*Desc{NewDesc("b", "", KindGauge), NewDesc("b", "", KindGauge)}},
		"invalid name":        NewCounter("a-b", ""),
		"leading digit":       NewCounter("1a", ""),
		"invalid label":       NewCounterVec("c_total", "", "route", "bad-label"),
		"reserved label":      NewCounterVec("c_total", "", "__name"),
		"duplicate label":     NewCounterVec("c_total", "", "x", "x"),
		"quantile in summary": collectorFunc{descs: []*Desc{NewDesc("s", "", KindSummary, "quantile")}},
		"describes nothing":   collectorFunc{},
	} {
		if err := reg.Register(c); err == nil {
			t.Errorf("%s: registered", name)
		}
	}
	// A failed registration leaves nothing behind.
	if err := reg.Register(NewCounter("c_total", "")); err != nil {
		t.Error(err)
	}
	defer func() {
		if recover() == nil {
			t.Error("MustRegister of a duplicate did not panic")
		}
	}()
	reg.MustRegister(NewCounter("a_total", "A."))
}

func TestGatherErrors(t *testing.T) {
	d := NewDesc("x_total", "X.", KindCounter, "l")
	other := NewDesc("y_total", "Y.", KindCounter)
	inconsistent := NewDesc("x_total", "Different help.", KindCounter, "l")
	for name, collect := range map[string]func(*Sink) error{
		"failed":            func(*Sink) error { return errors.New("map unreadable") },
		"undescribed":       func(s *Sink) error { s.Add(other, 1); return nil },
		"duplicate series":  func(s *Sink) error { s.Add(d, 1, "a"); s.Add(d, 2, "a"); return nil },
		"label count":       func(s *Sink) error { s.Add(d, 1); return nil },
		"summary as sample": func(s *Sink) error { s.Summary(d, 1, 1, nil, "a"); return nil },
		"inconsistent":      func(s *Sink) error { s.Add(d, 1, "a"); s.Add(inconsistent, 1, "b"); return nil },
	} {
		reg := NewRegistry()
		reg.MustRegister(NewCounter("ok_total", ""), collectorFunc{[]*Desc{d}, collect})
		fams, err := reg.Gather()
		if err == nil {
			t.Errorf("%s: no error", name)
		}
		if len(fams) == 0 || fams[0].Name != "ok_total" {
			t.Errorf("%s: the other families were not gathered: %v", name, fams)
		}
	}
}

func TestHandler(t *testing.T) {
	reg := NewRegistry()
	c := NewCounter("a_total", "A.")
	reg.MustRegister(c)
	fail := false
	reg.MustRegister(collectorFunc{[]*Desc{NewDesc("b", "", KindGauge)}, func(*Sink) error {
		if fail {
			return errors.New("broken")
		}
		return nil
	}})
	h := reg.Handler()
	reg.Handler() // a second handler shares the error counter

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if ct := rec.Header().Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8; escaping=underscores" {
		t.Errorf("content type %q", ct)
	}
	want := `# HELP a_total A.
# TYPE a_total counter
a_total 0
# HELP promhttp_metric_handler_errors_total Total number of internal errors encountered by the promhttp metric handler.
# TYPE promhttp_metric_handler_errors_total counter
promhttp_metric_handler_errors_total{cause="encoding"} 0
promhttp_metric_handler_errors_total{cause="gathering"} 0
`
	if rec.Code != http.StatusOK || rec.Body.String() != want {
		t.Errorf("%d\n%s", rec.Code, rec.Body)
	}

	fail = true
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusInternalServerError || !strings.Contains(rec.Body.String(), "broken") {
		t.Errorf("failed collector: %d %s", rec.Code, rec.Body)
	}
	fail = false
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if !strings.Contains(rec.Body.String(), `promhttp_metric_handler_errors_total{cause="gathering"} 1`) {
		t.Errorf("gathering error not counted:\n%s", rec.Body)
	}
}

func TestCounterConcurrent(t *testing.T) {
	v := NewCounterVec("c_total", "", "route")
	g := NewGauge("g", "")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				v.WithLabelValues("a").Inc()
				v.WithLabelValues("b").Add(0.5)
				g.Inc()
			}
		})
	}
	wg.Wait()
	if a, b := v.WithLabelValues("a").Value(), v.WithLabelValues("b").Value(); a != 8000 || b != 4000 || g.Value() != 8000 {
		t.Errorf("a %v b %v g %v", a, b, g.Value())
	}
}

func TestCounterDecreasePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("no panic")
		}
	}()
	NewCounter("c_total", "").Add(-1)
}

// The relay looks a series up and increments it per connection: neither
// may allocate.
func TestWithLabelValuesAllocs(t *testing.T) {
	v := NewCounterVec("c_total", "", "route", "action")
	g := NewGaugeVec("g", "", "route", "action")
	route, action := "nas.example.com", "passthrough"
	v.WithLabelValues(route, action)
	g.WithLabelValues(route, action)
	if n := testing.AllocsPerRun(100, func() {
		v.WithLabelValues(route, action).Inc()
		v.WithLabelValues(route, action).Add(1500)
		g.WithLabelValues(route, action).Inc()
	}); n != 0 {
		t.Errorf("%v allocations", n)
	}
}

func TestLabelKeysUnambiguous(t *testing.T) {
	v := NewCounterVec("c_total", "", "a", "b")
	v.WithLabelValues("x\x01", "y").Inc()
	if v.WithLabelValues("x", "\x01y").Value() != 0 {
		t.Error("different label values share a series")
	}
}

func TestRuntimeCollectors(t *testing.T) {
	reg := NewRegistry()
	reg.MustRegister(NewGoCollector(), NewProcessCollector())
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	values := map[string]float64{}
	for _, f := range fams {
		names = append(names, f.Name)
		values[f.Name] = f.Series[0].Value
	}
	// The families client_golang v1.23.2's Go and process collectors
	// export with default options on Linux.
	want := []string{
		"go_gc_duration_seconds", "go_gc_gogc_percent", "go_gc_gomemlimit_bytes", "go_goroutines", "go_info",
		"go_memstats_alloc_bytes", "go_memstats_alloc_bytes_total", "go_memstats_buck_hash_sys_bytes",
		"go_memstats_frees_total", "go_memstats_gc_sys_bytes", "go_memstats_heap_alloc_bytes",
		"go_memstats_heap_idle_bytes", "go_memstats_heap_inuse_bytes", "go_memstats_heap_objects",
		"go_memstats_heap_released_bytes", "go_memstats_heap_sys_bytes", "go_memstats_last_gc_time_seconds",
		"go_memstats_mallocs_total", "go_memstats_mcache_inuse_bytes", "go_memstats_mcache_sys_bytes",
		"go_memstats_mspan_inuse_bytes", "go_memstats_mspan_sys_bytes", "go_memstats_next_gc_bytes",
		"go_memstats_other_sys_bytes", "go_memstats_stack_inuse_bytes", "go_memstats_stack_sys_bytes",
		"go_memstats_sys_bytes", "go_sched_gomaxprocs_threads", "go_threads",
		"process_cpu_seconds_total", "process_max_fds", "process_network_receive_bytes_total",
		"process_network_transmit_bytes_total", "process_open_fds", "process_resident_memory_bytes",
		"process_start_time_seconds", "process_virtual_memory_bytes", "process_virtual_memory_max_bytes",
	}
	if !slices.Equal(names, want) {
		t.Errorf("families:\n%v\nwant:\n%v", names, want)
	}
	for _, n := range []string{"go_goroutines", "go_threads", "go_memstats_sys_bytes", "go_sched_gomaxprocs_threads",
		"process_open_fds", "process_max_fds", "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_start_time_seconds"} {
		if values[n] <= 0 {
			t.Errorf("%s = %v", n, values[n])
		}
	}
}
