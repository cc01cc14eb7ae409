// Package metrics is a small Prometheus client: counters, gauges and their
// label vectors, collectors that compute samples at scrape time, a Registry
// served at /metrics in the text exposition format 0.0.4, and a parser of
// that format for `relayctl stats`.
//
// It replaces github.com/prometheus/client_golang, whose dependencies
// (protobuf, procfs, expfmt, ...) run package init functions that fault in
// megabytes of the binary at startup; the relay's idle RSS is what a home
// router has to spare. The output is meant to be byte-compatible with what
// client_golang emitted for the same series, including the Go runtime and
// process collectors (runtime.go).
package metrics

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Kind is the TYPE of a metric family.
type Kind uint8

const (
	KindUntyped Kind = iota
	KindCounter
	KindGauge
	KindSummary
	KindHistogram // only parsed, never produced
)

var kindNames = [...]string{"untyped", "counter", "gauge", "summary", "histogram"}

func (k Kind) String() string { return kindNames[k] }

// Desc describes a metric family: its name, HELP, TYPE and label names.
type Desc struct {
	name, help string
	kind       Kind
	labels     []string // sorted, as the exposition writes them
	order      []int    // labels[i] is the order[i]-th label the caller passes
}

// NewDesc describes a family whose samples carry labels, whose values are
// passed in this order. Names are checked when the family is registered.
func NewDesc(name, help string, kind Kind, labels ...string) *Desc {
	d := &Desc{name: name, help: help, kind: kind, labels: slices.Clone(labels), order: make([]int, len(labels))}
	for i := range d.order {
		d.order[i] = i
	}
	slices.SortFunc(d.order, func(a, b int) int { return strings.Compare(labels[a], labels[b]) })
	for i, o := range d.order {
		d.labels[i] = labels[o]
	}
	return d
}

// Name returns the family name.
func (d *Desc) Name() string { return d.name }

func (d *Desc) check() error {
	if !validName(d.name, true) {
		return fmt.Errorf("metrics: invalid metric name %q", d.name)
	}
	for i, l := range d.labels {
		if !validName(l, false) || strings.HasPrefix(l, "__") || (d.kind == KindSummary && l == "quantile") {
			return fmt.Errorf("metrics: %s: invalid label name %q", d.name, l)
		}
		if i > 0 && d.labels[i-1] == l {
			return fmt.Errorf("metrics: %s: duplicate label name %q", d.name, l)
		}
	}
	return nil
}

// sameFamily reports whether two descriptors may share a family.
func (d *Desc) sameFamily(o *Desc) bool {
	return d == o || d.name == o.name && d.help == o.help && d.kind == o.kind && slices.Equal(d.labels, o.labels)
}

// validName: [a-zA-Z_:][a-zA-Z0-9_:]* for metrics, no ':' for labels.
func validName(s string, colon bool) bool {
	for i, c := range []byte(s) {
		ok := c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == ':' && colon || c >= '0' && c <= '9' && i > 0
		if !ok {
			return false
		}
	}
	return s != ""
}

// A Collector exports one or more families. Describe lists them (the
// Registry refuses a second collector for a family); Collect writes their
// current samples to s at each scrape and may run concurrently with itself.
type Collector interface {
	Describe() []*Desc
	Collect(s *Sink) error
}

// Registry is a set of collectors served together.
type Registry struct {
	mu         sync.RWMutex // write: Register; read: a scrape in progress
	collectors []Collector
	owner      map[string]int // family name → index in collectors

	handlerOnce sync.Once
	handlerErrs *CounterVec
}

// NewRegistry returns an empty Registry.
func NewRegistry() *Registry { return &Registry{owner: map[string]int{}} }

// Register adds c. It fails if a family name is invalid or already
// exported by another collector: two writers of a family would emit
// conflicting or duplicate series.
func (r *Registry) Register(c Collector) error {
	descs := c.Describe()
	if len(descs) == 0 {
		return errors.New("metrics: collector describes no family")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[string]bool{}
	for _, d := range descs {
		if err := d.check(); err != nil {
			return err
		}
		if _, dup := r.owner[d.name]; dup || seen[d.name] {
			return fmt.Errorf("metrics: family %s registered twice", d.name)
		}
		seen[d.name] = true
	}
	for _, d := range descs {
		r.owner[d.name] = len(r.collectors)
	}
	r.collectors = append(r.collectors, c)
	return nil
}

// MustRegister registers each collector and panics on the first error;
// for wiring code, where a duplicate is a programming error.
func (r *Registry) MustRegister(cs ...Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// Quantile is one quantile of a summary.
type Quantile struct{ Q, V float64 }

// Sink receives the samples of one scrape.
type Sink struct {
	owner   map[string]int
	cur     int
	samples []sample
	errs    []error
}

type sample struct {
	d     *Desc
	lvs   []string // in d.labels order
	v     float64  // summary: the sum
	count uint64   // summary only
	qs    []Quantile
}

// Add writes one counter, gauge or untyped sample of d; label values are
// in the order d was created with.
func (s *Sink) Add(d *Desc, v float64, labelValues ...string) {
	s.add(sample{d: d, v: v}, labelValues, false)
}

// Summary writes one summary of d.
func (s *Sink) Summary(d *Desc, count uint64, sum float64, qs []Quantile, labelValues ...string) {
	s.add(sample{d: d, v: sum, count: count, qs: qs}, labelValues, true)
}

func (s *Sink) add(smp sample, lvs []string, summary bool) {
	d := smp.d
	if i, ok := s.owner[d.name]; !ok || i != s.cur {
		s.errs = append(s.errs, fmt.Errorf("metrics: collected %s, which the collector did not describe", d.name))
		return
	}
	if len(lvs) != len(d.labels) {
		s.errs = append(s.errs, fmt.Errorf("metrics: %s: %d label values for %d labels", d.name, len(lvs), len(d.labels)))
		return
	}
	if (d.kind == KindSummary) != summary {
		s.errs = append(s.errs, fmt.Errorf("metrics: %s: a %s written as the wrong kind", d.name, d.kind))
		return
	}
	smp.lvs = make([]string, len(lvs))
	for i, o := range d.order {
		smp.lvs[i] = lvs[o]
	}
	s.samples = append(s.samples, smp)
}

// Family is a metric family as exposed: what Gather returns and Parse
// reads back.
type Family struct {
	Name, Help string
	Type       Kind
	Series     []Series
}

// Series is one sample line: Name is the family's or, for a summary's
// sum and count, has the suffix _sum or _count.
type Series struct {
	Name   string
	Labels []Label // sorted by name; a summary's quantile comes last
	Value  float64
}

// Label is a label pair.
type Label struct{ Name, Value string }

// Label returns the value of the label called name, "" if absent.
func (s *Series) Label(name string) string {
	for _, l := range s.Labels {
		if l.Name == name {
			return l.Value
		}
	}
	return ""
}

// Gather collects all collectors and returns the non-empty families
// sorted by name, their series sorted by label values. On errors (a
// collector failed, inconsistent or duplicate series) it returns what it
// could gather and all errors joined.
func (r *Registry) Gather() ([]Family, error) {
	r.mu.RLock()
	s := &Sink{owner: r.owner}
	for i, c := range r.collectors {
		s.cur = i
		if err := c.Collect(s); err != nil {
			s.errs = append(s.errs, err)
		}
	}
	r.mu.RUnlock()

	// A stable sort keeps each family's samples together and the first
	// descriptor of a family first.
	slices.SortStableFunc(s.samples, func(a, b sample) int {
		if c := strings.Compare(a.d.name, b.d.name); c != 0 {
			return c
		}
		return slices.Compare(a.lvs, b.lvs)
	})
	var fams []Family
	for i, smp := range s.samples {
		if i == 0 || smp.d.name != s.samples[i-1].d.name {
			fams = append(fams, Family{Name: smp.d.name, Help: smp.d.help, Type: smp.d.kind})
		} else {
			prev := s.samples[i-1]
			if !smp.d.sameFamily(prev.d) {
				s.errs = append(s.errs, fmt.Errorf("metrics: %s collected with inconsistent help, type or labels", smp.d.name))
				continue
			}
			if slices.Equal(smp.lvs, prev.lvs) {
				s.errs = append(s.errs, fmt.Errorf("metrics: %s%v collected twice", smp.d.name, smp.lvs))
				continue
			}
		}
		f := &fams[len(fams)-1]
		f.Series = appendSeries(f.Series, smp)
	}
	return fams, errors.Join(s.errs...)
}

func appendSeries(out []Series, smp sample) []Series {
	labels := func(extra ...Label) []Label {
		if len(smp.lvs)+len(extra) == 0 {
			return nil
		}
		ls := make([]Label, len(smp.lvs), len(smp.lvs)+len(extra))
		for i, v := range smp.lvs {
			ls[i] = Label{smp.d.labels[i], v}
		}
		return append(ls, extra...)
	}
	if smp.d.kind != KindSummary {
		return append(out, Series{smp.d.name, labels(), smp.v})
	}
	for _, q := range slices.SortedFunc(slices.Values(smp.qs), func(a, b Quantile) int { return cmp.Compare(a.Q, b.Q) }) {
		out = append(out, Series{smp.d.name, labels(Label{"quantile", string(appendFloat(nil, q.Q))}), q.V})
	}
	return append(out,
		Series{smp.d.name + "_sum", labels(), smp.v},
		Series{smp.d.name + "_count", labels(), float64(smp.count)})
}
