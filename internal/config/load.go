package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Error is one problem in a config file, printed as
// "FILE:LINE: what is wrong; what to write instead".
type Error struct {
	File string
	Line int
	Msg  string
	Fix  string
}

func (e *Error) Error() string {
	s := fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	if e.Fix != "" {
		s += "; " + e.Fix
	}
	return s
}

// Errors is every problem found, in file order.
type Errors []*Error

func (es Errors) Error() string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "\n")
}

// Unwrap lets errors.As find each *Error.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// ResolvePath picks the config file: the -c flag, then $RELAY_CONFIG, then
// DefaultPath.
func ResolvePath(flag string, getenv func(string) string) string {
	if flag != "" {
		return flag
	}
	if getenv != nil {
		if p := getenv("RELAY_CONFIG"); p != "" {
			return p
		}
	}
	return DefaultPath
}

// Load reads and parses the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: no such file; write one (see README.md) or pass -c FILE", path)
		}
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Default returns the embedded defaults: no routes, transparent for
// unknown names.
func Default() *Config {
	c := &Config{}
	c.ApplyDefaults()
	return c
}

// Parse decodes data (unknown keys are errors), applies defaults and
// validates. Errors are Errors naming path and line.
func Parse(path string, data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, yamlError(path, err)
	}
	c := &Config{}
	lines := map[string]int{}
	if len(root.Content) > 0 {
		doc := root.Content[0]
		var errs Errors
		checkKeys(path, doc, reflectKeys, "", &errs, lines)
		if len(errs) > 0 {
			return nil, errs
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(c); err != nil {
			return nil, yamlError(path, err)
		}
	}
	c.Path = path
	c.lines = lines
	c.ApplyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

var yamlLineRE = regexp.MustCompile(`line (\d+): (.*)`)

// yamlError turns a yaml.v3 error into FILE:LINE errors.
func yamlError(path string, err error) error {
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	var errs Errors
	for _, m := range msgs {
		e := &Error{File: path, Line: 1, Msg: strings.TrimPrefix(m, "yaml: ")}
		if sm := yamlLineRE.FindStringSubmatch(m); sm != nil {
			e.Line, _ = strconv.Atoi(sm[1])
			e.Msg = sm[2]
		}
		if strings.Contains(e.Msg, "cannot unmarshal") {
			e.Fix = "check the value's type against README.md's example"
		}
		errs = append(errs, e)
	}
	return errs
}

// keySpec describes the mapping keys allowed at a path (the tree of
// allowed keys mirrors the yaml tags of Config).
type keySpec map[string]keySpec

// listKeys records the line of each element of a list of scalars.
var listKeys = keySpec{"[]": nil}

var routeKeys = keySpec{
	"match": {"sni": nil, "alpn": listKeys, "protocol": nil, "silence": nil}, "passthrough": nil, "proxy_protocol": nil, "reject": nil, "allow": listKeys, "deny": listKeys,
	"quic": nil, "h3": nil,
	"terminate": {"upstream": nil, "tls": {"cert": nil, "key": nil}, "upstream_ca": nil, "upstream_insecure": nil, "hsts": nil, "h3": nil,
		"client_auth": {"ca": nil, "required": nil}, "basic_auth": {"users_file": nil},
		"forward_auth": {"url": nil, "copy_headers": nil}},
}

var reflectKeys = keySpec{
	"user": nil, "state_dir": nil, "unknown_sni": nil, "splice": nil, "transparent_allow": listKeys,
	"listen": {"http": nil, "https": nil, "metrics": nil, "proxy_protocol_from": listKeys},
	"steer":  {"interfaces": nil, "local": nil, "ipv6": nil, "bypass": nil, "bpf": nil, "https_ports": nil, "http_ports": nil, "pin_dir": nil},
	"acme": {"email": nil, "ca": nil, "ca_root": nil, "dns": nil, "profile": nil, "key_type": nil, "challenges": nil,
		"eab": {"kid": nil, "hmac_key": nil}},
	"limits": {"hello_timeout": nil, "max_hello_bytes": nil, "idle_timeout": nil, "max_connections": nil,
		"max_handshakes": nil, "drain_timeout": nil, "dial_timeout": nil,
		"per_client": {"connections": nil, "rate": nil, "burst": nil}},
	"log":    {"level": nil, "format": nil, "access": {"path": nil, "format": nil}},
	"routes": {"[]": routeKeys},
}

// checkKeys reports unknown keys with the nearest known one, and records
// the line of every key (by dotted path) for later validation errors.
func checkKeys(file string, n *yaml.Node, spec keySpec, at string, errs *Errors, lines map[string]int) {
	switch n.Kind {
	case yaml.MappingNode:
		if spec == nil {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if at != "" {
				p = at + "." + k.Value
			}
			lines[p] = k.Line
			sub, ok := spec[k.Value]
			if !ok {
				known := make([]string, 0, len(spec))
				for name := range spec {
					known = append(known, name)
				}
				sortStrings(known)
				where := "at the top level"
				if at != "" {
					where = "in " + at
				}
				fix := "known keys: " + strings.Join(known, ", ")
				if near := nearest(k.Value, known); near != "" {
					fix = "did you mean " + near + "? " + fix
				}
				*errs = append(*errs, &Error{File: file, Line: k.Line, Msg: fmt.Sprintf("unknown key %q %s", k.Value, where), Fix: fix})
				continue
			}
			checkKeys(file, v, sub, p, errs, lines)
		}
	case yaml.SequenceNode:
		elem, ok := spec["[]"]
		if !ok {
			return
		}
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", at, i)
			lines[p] = c.Line
			checkKeys(file, c, elem, p, errs, lines)
		}
	}
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// nearest returns the known key closest to k, if it is close enough to be
// a typo (edit distance up to a third of its length, at least 2).
func nearest(k string, known []string) string {
	best, bestD := "", 1<<30
	for _, c := range known {
		if d := editDistance(k, c); d <= max(2, len(c)/3) && d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// UnmarshalYAML accepts "10s", "5m", "1h30m".
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: a duration must be a string like \"10s\"", n.Line)
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration; write it with a unit, like \"10s\" or \"5m\"", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as "10s".
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// UnmarshalYAML accepts "10/s", "600/m" or a bare number (per second).
func (r *Rate) UnmarshalYAML(n *yaml.Node) error {
	bad := fmt.Errorf("line %d: rate %q is not a rate; write connections per second, like \"10/s\"", n.Line, n.Value)
	if n.Kind != yaml.ScalarNode {
		return bad
	}
	num, unit, _ := strings.Cut(strings.TrimSpace(n.Value), "/")
	v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || v < 0 {
		return bad
	}
	switch strings.TrimSpace(unit) {
	case "", "s":
	case "m":
		v /= 60
	default:
		return bad
	}
	*r = Rate(v)
	return nil
}

// UnmarshalYAML accepts one address or a list.
func (u *Upstreams) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		*u = Upstreams{n.Value}
		return nil
	case yaml.SequenceNode:
		var list []string
		if err := n.Decode(&list); err != nil {
			return err
		}
		*u = list
		return nil
	}
	return fmt.Errorf("line %d: passthrough must be host:port or a list of them", n.Line)
}

// UnmarshalYAML accepts `acme`, `internal` or `{cert: F, key: F}`.
func (t *TLS) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		t.Mode = n.Value
		return nil
	case yaml.MappingNode:
		var f struct {
			Cert string `yaml:"cert"`
			Key  string `yaml:"key"`
		}
		if err := n.Decode(&f); err != nil {
			return err
		}
		t.Mode, t.Cert, t.Key = "files", f.Cert, f.Key
		return nil
	}
	return fmt.Errorf("line %d: tls must be acme, internal or {cert: FILE, key: FILE}", n.Line)
}

// UnmarshalYAML records the route's line and reads the map form of
// match ({sni, alpn}, {protocol}, {silence}).
func (r *Route) UnmarshalYAML(n *yaml.Node) error {
	type plain Route
	var p plain
	var m *matchMap
	if n.Kind == yaml.MappingNode {
		c := *n
		c.Content = nil
		for i := 0; i+1 < len(n.Content); i += 2 {
			if k, v := n.Content[i], n.Content[i+1]; k.Value == "match" && v.Kind == yaml.MappingNode {
				m = &matchMap{}
				if err := v.Decode(m); err != nil {
					return err
				}
				continue
			}
			c.Content = append(c.Content, n.Content[i], n.Content[i+1])
		}
		n = &c
	}
	if err := n.Decode(&p); err != nil {
		return err
	}
	*r = Route(p)
	if m != nil {
		r.Match, r.ALPN, r.Protocol, r.Silence = m.SNI, m.ALPN, m.Protocol, m.Silence
		r.matchMap = true
	}
	r.Line = n.Line
	return nil
}

// matchMap is the map form of a route's match.
type matchMap struct {
	SNI      string   `yaml:"sni"`
	ALPN     []string `yaml:"alpn"`
	Protocol string   `yaml:"protocol"`
	Silence  Duration `yaml:"silence"`
}
