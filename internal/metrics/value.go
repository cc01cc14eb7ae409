package metrics

import (
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"slices"
	"sync"
	"sync/atomic"
)

// Counter is a value that only goes up. Its methods are safe for
// concurrent use and take no lock: the relay counts per connection.
type Counter struct {
	desc *Desc
	lvs  []string      // a vector child's label values, in Desc order
	n    atomic.Uint64 // integral increments, the common case: one atomic add
	f    atomic.Uint64 // float64 bits of the fractional rest
}

// NewCounter returns a counter without labels.
func NewCounter(name, help string) *Counter {
	return &Counter{desc: NewDesc(name, help, KindCounter)}
}

// Inc adds 1.
func (c *Counter) Inc() { c.n.Add(1) }

// Add adds v, which must not be negative.
func (c *Counter) Add(v float64) {
	if v < 0 {
		panic(fmt.Sprintf("metrics: counter %s decreased by %v", c.desc.name, v))
	}
	if u := uint64(v); float64(u) == v {
		c.n.Add(u)
		return
	}
	addFloat(&c.f, v)
}

// Value returns the current value.
func (c *Counter) Value() float64 {
	return float64(c.n.Load()) + math.Float64frombits(c.f.Load())
}

func (c *Counter) labelValues() []string { return c.lvs }

func (c *Counter) Describe() []*Desc { return []*Desc{c.desc} }

func (c *Counter) Collect(s *Sink) error {
	s.Add(c.desc, c.Value(), c.lvs...)
	return nil
}

// Gauge is a value that goes up and down, lock-free like Counter.
type Gauge struct {
	desc *Desc
	lvs  []string
	bits atomic.Uint64 // float64
}

// NewGauge returns a gauge without labels.
func NewGauge(name, help string) *Gauge {
	return &Gauge{desc: NewDesc(name, help, KindGauge)}
}

func (g *Gauge) Set(v float64) { g.bits.Store(math.Float64bits(v)) }
func (g *Gauge) Inc()          { addFloat(&g.bits, 1) }
func (g *Gauge) Dec()          { addFloat(&g.bits, -1) }
func (g *Gauge) Add(v float64) { addFloat(&g.bits, v) }

// Value returns the current value.
func (g *Gauge) Value() float64 { return math.Float64frombits(g.bits.Load()) }

func (g *Gauge) labelValues() []string { return g.lvs }

func (g *Gauge) Describe() []*Desc { return []*Desc{g.desc} }

func (g *Gauge) Collect(s *Sink) error {
	s.Add(g.desc, g.Value(), g.lvs...)
	return nil
}

func addFloat(bits *atomic.Uint64, v float64) {
	for {
		old := bits.Load()
		if bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

// CounterVec is a family of counters partitioned by label values.
type CounterVec struct{ vec[*Counter] }

// NewCounterVec returns a counter family with the given label names.
func NewCounterVec(name, help string, labels ...string) *CounterVec {
	d := NewDesc(name, help, KindCounter, labels...)
	return &CounterVec{vec[*Counter]{desc: d, newChild: func(lvs []string) *Counter { return &Counter{desc: d, lvs: lvs} }}}
}

// WithLabelValues returns the counter for these label values (in the
// order the labels were declared), creating it at 0: a series exists from
// its first lookup on. It panics if the number of values is wrong.
func (v *CounterVec) WithLabelValues(lvs ...string) *Counter { return v.with(lvs) }

// GaugeVec is a family of gauges partitioned by label values.
type GaugeVec struct{ vec[*Gauge] }

// NewGaugeVec returns a gauge family with the given label names.
func NewGaugeVec(name, help string, labels ...string) *GaugeVec {
	d := NewDesc(name, help, KindGauge, labels...)
	return &GaugeVec{vec[*Gauge]{desc: d, newChild: func(lvs []string) *Gauge { return &Gauge{desc: d, lvs: lvs} }}}
}

// WithLabelValues is like CounterVec's.
func (v *GaugeVec) WithLabelValues(lvs ...string) *Gauge { return v.with(lvs) }

type child interface {
	Value() float64
	labelValues() []string
}

type vec[T child] struct {
	desc     *Desc
	newChild func(lvs []string) T
	// Copy on write: lookups, the hot path, load a pointer and read a map
	// that is never written again; new label values (rare) copy it.
	children atomic.Pointer[map[string]T]
	mu       sync.Mutex // serializes copies
}

func (v *vec[T]) with(lvs []string) T {
	if len(lvs) != len(v.desc.labels) {
		panic(fmt.Sprintf("metrics: %s: %d label values for %d labels", v.desc.name, len(lvs), len(v.desc.labels)))
	}
	// Length-prefixed values: unambiguous whatever bytes they hold; the
	// buffer stays on the stack and the map lookup does not allocate.
	var buf [128]byte
	key := buf[:0]
	for _, l := range lvs {
		key = binary.AppendUvarint(key, uint64(len(l)))
		key = append(key, l...)
	}
	if m := v.children.Load(); m != nil {
		if c, ok := (*m)[string(key)]; ok {
			return c
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	old := v.children.Load()
	if old == nil {
		old = &map[string]T{}
	}
	if c, ok := (*old)[string(key)]; ok {
		return c
	}
	m := maps.Clone(*old)
	if m == nil {
		m = map[string]T{}
	}
	c := v.newChild(slices.Clone(lvs))
	m[string(key)] = c
	v.children.Store(&m)
	return c
}

func (v *vec[T]) Describe() []*Desc { return []*Desc{v.desc} }

func (v *vec[T]) Collect(s *Sink) error {
	if m := v.children.Load(); m != nil {
		for _, c := range *m {
			s.Add(v.desc, c.Value(), c.labelValues()...)
		}
	}
	return nil
}

// Each calls fn with the label values and value of every series, in no
// particular order, without creating any (unlike WithLabelValues).
func (v *CounterVec) Each(fn func(lvs []string, value float64)) { v.each(fn) }

// Each is like CounterVec's.
func (v *GaugeVec) Each(fn func(lvs []string, value float64)) { v.each(fn) }

func (v *vec[T]) each(fn func(lvs []string, value float64)) {
	if m := v.children.Load(); m != nil {
		for _, c := range *m {
			fn(c.labelValues(), c.Value())
		}
	}
}
