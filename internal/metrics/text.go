package metrics

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
)

// ContentType is the media type of the text exposition format, with the
// escaping parameter client_golang added (names are never escaped here:
// all are valid legacy names).
const ContentType = "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"

// AppendText appends fams in the text exposition format 0.0.4.
func AppendText(b []byte, fams []Family) []byte {
	for _, f := range fams {
		b = append(b, "# HELP "...)
		b = append(b, f.Name...)
		b = append(b, ' ')
		b = appendEscaped(b, f.Help, false)
		b = append(b, "\n# TYPE "...)
		b = append(b, f.Name...)
		b = append(b, ' ')
		b = append(b, f.Type.String()...)
		b = append(b, '\n')
		for _, s := range f.Series {
			b = append(b, s.Name...)
			for i, l := range s.Labels {
				if i == 0 {
					b = append(b, '{')
				} else {
					b = append(b, ',')
				}
				b = append(b, l.Name...)
				b = append(b, `="`...)
				b = appendEscaped(b, l.Value, true)
				b = append(b, '"')
			}
			if len(s.Labels) > 0 {
				b = append(b, '}')
			}
			b = append(b, ' ')
			b = appendFloat(b, s.Value)
			b = append(b, '\n')
		}
	}
	return b
}

// appendEscaped escapes \ and newline, and " in label values.
func appendEscaped(b []byte, s string, quote bool) []byte {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '"' && quote:
			b = append(b, `\"`...)
		default:
			b = append(b, c)
		}
	}
	return b
}

// appendFloat formats like client_golang: the shortest representation
// that reads back exactly, in strconv's 'g' form (an exponent from 1e6 on:
// 1.2e+06).
func appendFloat(b []byte, f float64) []byte {
	switch {
	case f == 0: // also -0
		return append(b, '0')
	case math.IsNaN(f):
		return append(b, "NaN"...)
	case math.IsInf(f, 1):
		return append(b, "+Inf"...)
	case math.IsInf(f, -1):
		return append(b, "-Inf"...)
	}
	return strconv.AppendFloat(b, f, 'g', -1, 64)
}

// Handler serves the registry's families. A failed scrape answers 500, as
// client_golang's default did, so that a broken collector is noticed; the
// failures are counted in promhttp_metric_handler_errors_total (the name
// client_golang used).
func (r *Registry) Handler() http.Handler {
	r.handlerOnce.Do(func() {
		r.handlerErrs = NewCounterVec("promhttp_metric_handler_errors_total",
			"Total number of internal errors encountered by the promhttp metric handler.", "cause")
		r.handlerErrs.WithLabelValues("gathering")
		r.handlerErrs.WithLabelValues("encoding")
		r.MustRegister(r.handlerErrs)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fams, err := r.Gather()
		if err != nil {
			r.handlerErrs.WithLabelValues("gathering").Inc()
			slog.Warn("metrics scrape failed", "err", err)
			http.Error(w, "An error has occurred while serving metrics:\n\n"+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", ContentType)
		if _, err := w.Write(AppendText(nil, fams)); err != nil {
			r.handlerErrs.WithLabelValues("encoding").Inc()
		}
	})
}

// Parse reads the text exposition format. Samples of a summary or
// histogram (name_sum, name_count, name_bucket) belong to its family;
// timestamps are ignored.
func Parse(r io.Reader) ([]Family, error) {
	p := parser{seen: map[string]bool{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		if err := p.line(sc.Text()); err != nil {
			return p.fams, fmt.Errorf("metrics text line %d: %w", line, err)
		}
	}
	return p.fams, sc.Err()
}

type parser struct {
	fams []Family
	seen map[string]bool
}

// family returns the family called name: the current one, or a new one.
func (p *parser) family(name string) (*Family, error) {
	if n := len(p.fams); n > 0 && p.fams[n-1].Name == name {
		return &p.fams[n-1], nil
	}
	if p.seen[name] {
		return nil, fmt.Errorf("family %s is not contiguous", name)
	}
	p.seen[name] = true
	p.fams = append(p.fams, Family{Name: name})
	return &p.fams[len(p.fams)-1], nil
}

func (p *parser) line(text string) error {
	text = strings.TrimLeft(text, " \t")
	if text == "" {
		return nil
	}
	if rest, ok := strings.CutPrefix(text, "#"); ok {
		return p.comment(rest)
	}

	var s Series
	i := strings.IndexAny(text, "{ \t")
	if i < 0 {
		return errors.New("sample without value")
	}
	s.Name, text = text[:i], text[i:]
	if !validName(s.Name, true) {
		return fmt.Errorf("invalid metric name %q", s.Name)
	}
	if text[0] == '{' {
		var err error
		if s.Labels, text, err = parseLabels(text[1:]); err != nil {
			return fmt.Errorf("%s: %w", s.Name, err)
		}
	}
	fields := strings.Fields(text)
	if len(fields) < 1 || len(fields) > 2 {
		return fmt.Errorf("%s: want a value and an optional timestamp", s.Name)
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	if err != nil {
		return fmt.Errorf("%s: value: %w", s.Name, err)
	}
	s.Value = v
	name := s.Name
	if n := len(p.fams); n > 0 && (p.fams[n-1].Type == KindSummary || p.fams[n-1].Type == KindHistogram) {
		for _, suffix := range []string{"_sum", "_count", "_bucket"} {
			if strings.TrimSuffix(name, suffix) == p.fams[n-1].Name {
				name = p.fams[n-1].Name
			}
		}
	}
	f, err := p.family(name)
	if err != nil {
		return err
	}
	f.Series = append(f.Series, s)
	return nil
}

// comment handles a line starting with #: HELP, TYPE or a plain comment.
func (p *parser) comment(text string) error {
	text = strings.TrimLeft(text, " \t")
	keyword, text, _ := strings.Cut(text, " ")
	if keyword != "HELP" && keyword != "TYPE" {
		return nil
	}
	text = strings.TrimLeft(text, " \t")
	name, text, _ := strings.Cut(text, " ")
	if !validName(name, true) {
		return fmt.Errorf("%s: invalid metric name %q", keyword, name)
	}
	f, err := p.family(name)
	if err != nil {
		return err
	}
	if len(f.Series) > 0 {
		return fmt.Errorf("%s %s after its samples", keyword, name)
	}
	text = strings.TrimLeft(text, " \t")
	if keyword == "HELP" {
		f.Help, err = unescape(text, false)
		return err
	}
	for k, n := range kindNames {
		if n == strings.TrimRight(text, " \t") {
			f.Type = Kind(k)
			return nil
		}
	}
	return fmt.Errorf("TYPE %s: unknown type %q", name, text)
}

// parseLabels parses `name="value",...}` and returns the rest of the line.
func parseLabels(text string) ([]Label, string, error) {
	var ls []Label
	for {
		text = strings.TrimLeft(text, " \t")
		if rest, ok := strings.CutPrefix(text, "}"); ok {
			return ls, rest, nil
		}
		name, rest, ok := strings.Cut(text, "=")
		name = strings.TrimSpace(name)
		if !ok || !validName(name, false) {
			return nil, "", fmt.Errorf("malformed label in %q", text)
		}
		rest = strings.TrimLeft(rest, " \t")
		if !strings.HasPrefix(rest, `"`) {
			return nil, "", fmt.Errorf("label %s: value not quoted", name)
		}
		// The value ends at the first quote not escaped.
		end := 1
		for ; end < len(rest) && rest[end] != '"'; end++ {
			if rest[end] == '\\' {
				end++
			}
		}
		if end >= len(rest) {
			return nil, "", fmt.Errorf("label %s: unterminated value", name)
		}
		v, err := unescape(rest[1:end], true)
		if err != nil {
			return nil, "", fmt.Errorf("label %s: %w", name, err)
		}
		ls = append(ls, Label{name, v})
		text = strings.TrimLeft(rest[end+1:], " \t")
		if after, ok := strings.CutPrefix(text, ","); ok {
			text = after
		} else if !strings.HasPrefix(text, "}") {
			return nil, "", fmt.Errorf("label %s: want , or }", name)
		}
	}
}

func unescape(s string, quote bool) (string, error) {
	if !strings.Contains(s, `\`) {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i++; i == len(s) {
			return "", errors.New("trailing backslash")
		}
		switch c := s[i]; {
		case c == '\\':
			b.WriteByte('\\')
		case c == 'n':
			b.WriteByte('\n')
		case c == '"' && quote:
			b.WriteByte('"')
		default:
			return "", fmt.Errorf(`invalid escape \%c`, c)
		}
	}
	return b.String(), nil
}
