package metrics

import (
	"math"
	"reflect"
	"strings"
	"testing"
)

func TestParseRoundTrip(t *testing.T) {
	reg := NewRegistry()
	v := NewCounterVec("relay_bytes_total", "Bytes\\relayed\n(both ways).", "route", "direction")
	v.WithLabelValues("a.test", "upstream").Add(12345678)
	v.WithLabelValues(`we"ird\`+"\nroute", "downstream").Add(0.25)
	g := NewGaugeVec("odd_values", "Not a number and infinities.", "v")
	g.WithLabelValues("nan").Set(math.NaN())
	g.WithLabelValues("+inf").Set(math.Inf(1))
	g.WithLabelValues("-inf").Set(math.Inf(-1))
	g.WithLabelValues("tiny").Set(5e-324)
	reg.MustRegister(v, g, NewGoCollector(), NewProcessCollector())
	want, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	text := AppendText(nil, want)
	got, err := Parse(strings.NewReader(string(text)))
	if err != nil {
		t.Fatal(err)
	}
	// NaN != NaN: compare through a stand-in.
	nan := func(fams []Family) {
		for _, f := range fams {
			for i := range f.Series {
				if math.IsNaN(f.Series[i].Value) {
					f.Series[i].Value = -42
				}
			}
		}
	}
	nan(want)
	nan(got)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("round trip differs:\n%+v\n%+v", got, want)
	}
	if again := AppendText(nil, got); string(again) != strings.ReplaceAll(string(text), "NaN", "-42") {
		t.Errorf("text round trip differs:\n%s", again)
	}
}

func TestParse(t *testing.T) {
	in := `# A comment, then an untyped family without HELP or TYPE.
plain 1
   
# TYPE spaced counter
# HELP spaced   Help after extra blanks \\ \n end.
spaced{ a = "1" , b="2",} 3 1700000000000
spaced{a="2"} 4
# TYPE sum summary
sum{quantile="0.5"} 1
sum_sum 2
sum_count 3
sum_total 4
`
	got, err := Parse(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []Family{
		{Name: "plain", Series: []Series{{Name: "plain", Value: 1}}},
		{Name: "spaced", Help: "Help after extra blanks \\ \n end.", Type: KindCounter, Series: []Series{
			{Name: "spaced", Labels: []Label{{"a", "1"}, {"b", "2"}}, Value: 3},
			{Name: "spaced", Labels: []Label{{"a", "2"}}, Value: 4},
		}},
		{Name: "sum", Type: KindSummary, Series: []Series{
			{Name: "sum", Labels: []Label{{"quantile", "0.5"}}, Value: 1},
			{Name: "sum_sum", Value: 2},
			{Name: "sum_count", Value: 3},
		}},
		{Name: "sum_total", Series: []Series{{Name: "sum_total", Value: 4}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
	if got[1].Series[0].Label("b") != "2" || got[1].Series[0].Label("c") != "" {
		t.Error("Series.Label")
	}
}

func TestParseErrors(t *testing.T) {
	for _, in := range []string{
		"An error has occurred while serving metrics:\n\nbroken",
		"x",
		"x{a=\"1\"}",
		"x abc",
		"x 1 2 3",
		"x{a=1} 1",
		"x{a=\"1} 1",
		"x{a=\"1\" b=\"2\"} 1",
		"x{a=\"\\t\"} 1",
		"x{-a=\"1\"} 1",
		"1x 1",
		"# TYPE x countr",
		"# HELP x bad \\q escape",
		"x 1\n# TYPE x counter",
		"x 1\ny 1\nx 2",
	} {
		if fams, err := Parse(strings.NewReader(in)); err == nil {
			t.Errorf("%q: parsed: %+v", in, fams)
		}
	}
}
