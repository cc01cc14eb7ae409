package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Defaults documented on the fields of Config.
const (
	DefaultUser     = "relay"
	DefaultStateDir = "/var/lib/relay"
)

// ApplyDefaults fills zero values with their defaults.
func (c *Config) ApplyDefaults() {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&c.User, DefaultUser)
	def(&c.StateDir, DefaultStateDir)
	def(&c.Listen.HTTP, ":8080")
	def(&c.Listen.HTTPS, ":8443")
	def(&c.Listen.Metrics, "127.0.0.1:9090")
	def(&c.UnknownSNI, "original")
	def(&c.Splice, "auto")
	def(&c.Steer.BPF, "auto")
	def(&c.Steer.PinDir, "/sys/fs/bpf/relay")
	def(&c.ACME.CA, "letsencrypt")
	def(&c.ACME.KeyType, "ec256")
	def(&c.Log.Level, "info")
	def(&c.Log.Format, "text")
	if c.Log.Access != nil {
		def(&c.Log.Access.Format, "json")
	}
	if len(c.Steer.HTTPSPorts) == 0 {
		c.Steer.HTTPSPorts = []int{443}
	}
	if len(c.Steer.HTTPPorts) == 0 {
		c.Steer.HTTPPorts = []int{80}
	}
	l := &c.Limits
	defD := func(d *Duration, v time.Duration) {
		if *d == 0 {
			*d = Duration(v)
		}
	}
	defI := func(i *int, v int) {
		if *i == 0 {
			*i = v
		}
	}
	defD(&l.HelloTimeout, 10*time.Second)
	defI(&l.MaxHelloBytes, 65536)
	defD(&l.IdleTimeout, 5*time.Minute)
	defI(&l.MaxConnections, 10000)
	defI(&l.MaxHandshakes, 512)
	defD(&l.DrainTimeout, 30*time.Second)
	defD(&l.DialTimeout, 5*time.Second)
	for i := range c.Routes {
		if c.Routes[i].Terminate != nil && c.Routes[i].Terminate.TLS.Mode == "" {
			c.Routes[i].Terminate.TLS.Mode = "acme"
		}
	}
}

// NormalizeName lowercases a server name and strips one trailing dot.
func NormalizeName(s string) string {
	return strings.ToLower(strings.TrimSuffix(s, "."))
}

// line returns the line of a dotted key path, or of its nearest parent.
func (c *Config) line(path string) int {
	for p := path; p != ""; {
		if l, ok := c.lines[p]; ok {
			return l
		}
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			break
		}
		p = p[:i]
	}
	return 1
}

// Validate checks meaning: addresses, names, enums, cross-references. It
// does not look at this machine (interfaces, users), except for the files
// that access rules name (client_auth.ca, basic_auth.users_file): a typo
// there would open or close a route at the next start.
func (c *Config) Validate() error {
	var errs Errors
	add := func(path, msg, fix string) {
		errs = append(errs, &Error{File: c.Path, Line: c.line(path), Msg: msg, Fix: fix})
	}
	if c.Path == "" {
		c.Path = "config"
	}
	oneOf := func(path, v string, allowed ...string) {
		for _, a := range allowed {
			if v == a {
				return
			}
		}
		add(path, fmt.Sprintf("%s: %q is not allowed", path, v), "write one of: "+strings.Join(allowed, ", "))
	}

	// listen
	for _, l := range []struct {
		key, v  string
		offOK   bool
		example string
	}{
		{"listen.https", c.Listen.HTTPS, false, ":8443"},
		{"listen.http", c.Listen.HTTP, true, ":8080"},
		{"listen.metrics", c.Listen.Metrics, true, "127.0.0.1:9090"},
	} {
		if l.offOK && l.v == "off" {
			continue
		}
		port, err := listenPort(l.v)
		if err != nil {
			add(l.key, fmt.Sprintf("%s %q: %v", l.key, l.v, err), fmt.Sprintf("write host:port, e.g. %q", l.example))
			continue
		}
		if (port == 80 || port == 443) && l.key != "listen.metrics" {
			add(l.key, fmt.Sprintf("%s uses privileged port %d: the relay listens unprivileged on high ports and `relayctl rules apply` steers %d to it", l.key, port, port),
				fmt.Sprintf("write %q", l.example))
		}
	}
	oneOf("splice", c.Splice, "auto", "sockmap", "splice")
	oneOf("steer.bpf", c.Steer.BPF, "auto", "on", "off")
	for i, b := range c.Steer.Bypass {
		if _, err := ParsePrefix(b); err != nil {
			add(fmt.Sprintf("steer.bypass[%d]", i), fmt.Sprintf("steer.bypass %q is not a CIDR or IP address", b), "write e.g. 192.168.1.0/24, 10.0.0.1 or fd00::/8")
		}
	}
	for _, ports := range []struct {
		key string
		v   []int
	}{{"steer.https_ports", c.Steer.HTTPSPorts}, {"steer.http_ports", c.Steer.HTTPPorts}} {
		for _, p := range ports.v {
			if p < 1 || p > 65535 {
				add(ports.key, fmt.Sprintf("%s: port %d out of range", ports.key, p), "write ports between 1 and 65535")
			}
		}
	}
	for i, name := range c.Steer.Interfaces {
		if name == "" || len(name) > 15 || strings.ContainsAny(name, "/ \t") {
			add(fmt.Sprintf("steer.interfaces[%d]", i), fmt.Sprintf("steer.interfaces: %q is not an interface name", name), "write names as `ip link` shows them, e.g. br-lan")
		}
	}

	// acme
	switch ca := c.ACME.CA; {
	case ca == "letsencrypt", ca == "letsencrypt-staging":
	case strings.HasPrefix(ca, "https://") || strings.HasPrefix(ca, "http://"):
		if _, err := url.Parse(ca); err != nil {
			add("acme.ca", fmt.Sprintf("acme.ca %q: %v", ca, err), "write letsencrypt, letsencrypt-staging or a directory URL")
		}
	default:
		add("acme.ca", fmt.Sprintf("acme.ca %q is not a known CA", ca), "write letsencrypt, letsencrypt-staging or an ACME directory URL (https://...)")
	}
	oneOf("acme.key_type", c.ACME.KeyType, "ec256", "ec384", "rsa2048", "rsa4096")
	for _, ch := range c.ACME.Challenges {
		oneOf("acme.challenges", ch, "http-01", "tls-alpn-01", "dns-01")
	}
	if c.ACME.Email != "" && !strings.Contains(c.ACME.Email, "@") {
		add("acme.email", fmt.Sprintf("acme.email %q is not an email address", c.ACME.Email), "write e.g. me@example.com")
	}

	// limits
	l := c.Limits
	if l.MaxHelloBytes < 1024 || l.MaxHelloBytes > 1<<20 {
		add("limits.max_hello_bytes", fmt.Sprintf("limits.max_hello_bytes %d out of range", l.MaxHelloBytes), "write a value between 1024 and 1048576 (default 65536)")
	}
	for _, d := range []struct {
		key string
		v   Duration
	}{{"limits.hello_timeout", l.HelloTimeout}, {"limits.idle_timeout", l.IdleTimeout}, {"limits.drain_timeout", l.DrainTimeout}, {"limits.dial_timeout", l.DialTimeout}} {
		if d.v < 0 {
			add(d.key, fmt.Sprintf("%s must be positive", d.key), "write e.g. \"10s\"")
		}
	}
	for _, n := range []struct {
		key string
		v   int
	}{{"limits.max_connections", l.MaxConnections}, {"limits.max_handshakes", l.MaxHandshakes}} {
		if n.v < 1 {
			add(n.key, fmt.Sprintf("%s must be at least 1", n.key), "remove it for the default")
		}
	}
	if pc := l.PerClient; pc != nil {
		if pc.Connections < 0 || pc.Burst < 0 || pc.Rate < 0 {
			add("limits.per_client", "limits.per_client: values must not be negative", "write e.g. {connections: 32, rate: 10/s, burst: 20}")
		}
		if pc.Burst > 0 && pc.Rate == 0 {
			add("limits.per_client.burst", "limits.per_client.burst without rate", "add rate: N/s, or remove burst")
		}
	}
	c.checkClientRules("transparent_allow", c.TransparentAllow, add)
	for i, p := range c.Listen.ProxyProtocolFrom {
		if _, err := ParsePrefix(p); err != nil {
			add(fmt.Sprintf("listen.proxy_protocol_from[%d]", i), fmt.Sprintf("listen.proxy_protocol_from %q is not a CIDR or IP address", p),
				"write the address of the proxy in front, e.g. 203.0.113.7 or 10.0.0.0/8")
		}
	}
	oneOf("log.level", c.Log.Level, "debug", "info", "warn", "error")
	oneOf("log.format", c.Log.Format, "text", "json")
	if a := c.Log.Access; a != nil {
		oneOf("log.access.format", a.Format, "json", "combined")
		if a.Path == "" {
			add("log.access", "log.access without path", "write log: {access: {path: /var/log/relay/access.log}} (or path: stdout)")
		} else if a.Path != "stdout" && !strings.HasPrefix(a.Path, "/") {
			add("log.access.path", fmt.Sprintf("log.access.path %q is not an absolute path", a.Path), "write an absolute path like /var/log/relay/access.log, or stdout")
		}
	}

	// routes
	first := map[string]int{}     // name → line of its route without alpn
	firstALPN := map[string]int{} // name + "\x00" + protocol → line
	firstKind := map[string]int{} // "protocol:ssh", "silence" → line
	for i := range c.Routes {
		r := &c.Routes[i]
		at := fmt.Sprintf("routes[%d]", i)
		line := func(key string) string { return at + "." + key }
		c.checkMatch(r, line, add, first, firstALPN, firstKind)
		actions := 0
		if len(r.Passthrough) > 0 {
			actions++
		}
		if r.Terminate != nil {
			actions++
		}
		if r.Reject {
			actions++
		}
		if actions != 1 {
			add(at, fmt.Sprintf("route %q must have exactly one of passthrough, terminate, reject (has %d)", r.Label(), actions),
				"write `passthrough: host:443`, `terminate: {upstream: ..., tls: ...}` or `reject: true`")
		}
		for j, u := range r.Passthrough {
			if err := validHostPort(u); err != nil {
				add(line("passthrough"), fmt.Sprintf("passthrough[%d] %q: %v", j, u, err), "write host:port, e.g. 192.168.1.20:443")
			}
		}
		c.checkClientRules(line("allow"), r.Allow, add)
		c.checkClientRules(line("deny"), r.Deny, add)
		if r.QUIC != nil && len(r.Passthrough) == 0 {
			add(line("quic"), "quic applies to passthrough routes only", "remove it; terminate routes serve HTTP/3 with `h3: true`")
		}
		if r.H3 != nil && r.Terminate == nil {
			add(line("h3"), "h3 applies to terminate routes only", "remove it; passthrough routes relay QUIC with `quic: true`")
		}
		if r.ProxyProtocol != "" {
			oneOf(line("proxy_protocol"), r.ProxyProtocol, "v1", "v2")
			if len(r.Passthrough) == 0 {
				add(line("proxy_protocol"), "proxy_protocol applies to passthrough routes only", "remove it, or make the route a passthrough")
			}
		}
		if t := r.Terminate; t != nil {
			u, err := url.Parse(t.Upstream)
			switch {
			case t.Upstream == "":
				add(line("terminate"), "terminate without upstream", "add `upstream: http://host:port` (or https://, tcp://)")
			case err != nil:
				add(line("terminate.upstream"), fmt.Sprintf("terminate.upstream %q: %v", t.Upstream, err), "write http://host:port, https://host:port or tcp://host:port")
			case u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "tcp":
				add(line("terminate.upstream"), fmt.Sprintf("terminate.upstream %q: scheme %q is not supported", t.Upstream, u.Scheme), "write http://host:port, https://host:port or tcp://host:port")
			default:
				if err := validHostPort(u.Host); err != nil && u.Scheme == "tcp" {
					add(line("terminate.upstream"), fmt.Sprintf("terminate.upstream %q: %v", t.Upstream, err), "write tcp://host:port")
				} else if u.Host == "" {
					add(line("terminate.upstream"), fmt.Sprintf("terminate.upstream %q has no host", t.Upstream), "write http://host:port")
				}
			}
			c.checkAuth(line("terminate"), t, u, add)
			switch {
			case t.HSTS < 0:
				add(line("terminate.hsts"), fmt.Sprintf("hsts %v is negative", t.HSTS.D()), "write a duration like 8760h (one year), or remove it")
			case t.HSTS > 0 && err == nil && u.Scheme == "tcp":
				add(line("terminate.hsts"), "hsts applies to http:// and https:// upstreams only", "remove it from this tcp:// route")
			}
			switch t.TLS.Mode {
			case "acme":
				if strings.HasPrefix(r.Match, "*.") && c.ACME.Email != "" && c.ACME.DNS == "" {
					add(line("terminate.tls"), fmt.Sprintf("route %q: wildcard certificates need DNS-01", r.Match),
						"set acme.dns to a lego DNS provider name (e.g. cloudflare), or use tls: internal")
				}
			case "internal":
			case "files":
				if t.TLS.Cert == "" || t.TLS.Key == "" {
					add(line("terminate.tls"), "tls {cert, key}: both cert and key are required", "write tls: {cert: /etc/relay/x.crt, key: /etc/relay/x.key}")
				}
			default:
				add(line("terminate.tls"), fmt.Sprintf("tls %q is not a certificate source", t.TLS.Mode), "write acme, internal or {cert: FILE, key: FILE}")
			}
		}
	}
	switch u := c.UnknownSNI; u {
	case "original", "reject":
	default:
		if _, ok := first[NormalizeName(u)]; !ok {
			add("unknown_sni", fmt.Sprintf("unknown_sni %q names no route", u), "write original, reject, or the match of one of the routes")
		}
		for _, r := range c.Routes {
			// A client without SNI gets the route's certificate, issued
			// for its name: a wildcard has none to issue.
			if NormalizeName(r.Match) == NormalizeName(u) && strings.HasPrefix(r.Match, "*.") && r.Terminate != nil && r.Terminate.TLS.Mode != "files" {
				add("unknown_sni", fmt.Sprintf("unknown_sni %q names a wildcard terminate route: a client without SNI would get no certificate", u),
					"name an exact route, or give this route tls: {cert: FILE, key: FILE}")
			}
		}
	}
	if len(errs) > 0 {
		slices.SortStableFunc(errs, func(a, b *Error) int { return a.Line - b.Line }) // file order
		return errs
	}
	return nil
}

// checkMatch validates a route's match (string or map form) and records
// it in first/firstALPN/firstKind to refuse duplicates and ambiguities.
func (c *Config) checkMatch(r *Route, line func(string) string, add func(path, msg, fix string), first, firstALPN, firstKind map[string]int) {
	const fixMap = "write match: NAME, {sni: NAME, alpn: [h2]}, {protocol: ssh|openvpn|http} or {silence: 3s}"
	kinds := 0
	if r.Match != "" || len(r.ALPN) > 0 {
		kinds++
	}
	if r.Protocol != "" {
		kinds++
	}
	if r.Silence != 0 {
		kinds++
	}
	here := c.line(line("match"))
	switch {
	case kinds == 0 && !r.matchMap:
		add(line("match"), "route without match", "add `match: name.example.com` (or \"*.example.com\")")
		return
	case kinds != 1:
		add(line("match"), "match must have exactly one of sni (with optional alpn), protocol, silence", fixMap)
		return
	}
	switch {
	case r.Protocol != "":
		if !slices.Contains(Protocols, r.Protocol) {
			add(line("match.protocol"), fmt.Sprintf("match.protocol %q is not a protocol relay recognises", r.Protocol), "write one of: "+strings.Join(Protocols, ", "))
			return
		}
		c.checkProtocolRoute(r, line, add)
		key := "protocol:" + r.Protocol
		if prev, dup := firstKind[key]; dup {
			add(line("match"), fmt.Sprintf("duplicate match {protocol: %s} (first at line %d)", r.Protocol, prev), "merge the two routes or remove one")
		} else {
			firstKind[key] = here
		}
	case r.Silence != 0:
		if r.Silence < 0 {
			add(line("match.silence"), "match.silence must be positive", "write e.g. {silence: 3s}")
			return
		}
		if r.Silence >= c.Limits.HelloTimeout {
			add(line("match.silence"), fmt.Sprintf("match.silence %s is not shorter than limits.hello_timeout %s: no client would ever be silent that long", r.Silence.D(), c.Limits.HelloTimeout.D()),
				"write a shorter silence (e.g. 3s) or raise limits.hello_timeout")
		}
		c.checkProtocolRoute(r, line, add)
		if prev, dup := firstKind["silence"]; dup {
			add(line("match"), fmt.Sprintf("a second silence route (first at line %d): a silent client can go to one route only", prev), "keep one silence route")
		} else {
			firstKind["silence"] = here
		}
	default:
		if r.Match == "" {
			add(line("match"), "match.alpn without sni", "write {sni: NAME, alpn: [...]} (the name may be \"*.example.com\")")
			return
		}
		if err := validMatch(r.Match); err != nil {
			add(line("match"), fmt.Sprintf("match %q: %v", r.Match, err), "write a DNS name like nas.example.com, or \"*.example.com\" for one label")
			return
		}
		key := NormalizeName(r.Match)
		if len(r.ALPN) == 0 {
			if prev, dup := first[key]; dup {
				add(line("match"), fmt.Sprintf("duplicate match %q (first at line %d)", r.Match, prev), "merge the two routes or remove one")
			} else {
				first[key] = here
			}
			return
		}
		for j, p := range r.ALPN {
			if p == "" || len(p) > 255 {
				add(fmt.Sprintf("%s[%d]", line("match.alpn"), j), fmt.Sprintf("match.alpn[%d] %q is not an ALPN protocol name", j, p), "write names like h2, http/1.1, xmpp-client")
				continue
			}
			k := key + "\x00" + p
			if prev, dup := firstALPN[k]; dup {
				add(line("match.alpn"), fmt.Sprintf("ambiguous routes: %q with ALPN %q is also matched by the route at line %d", r.Match, p, prev),
					"list each ALPN protocol in one route of a name only")
			} else {
				firstALPN[k] = here
			}
		}
	}
}

// checkProtocolRoute refuses what a protocol or silence route cannot do:
// it carries no TLS, so it can only be passed through.
func (c *Config) checkProtocolRoute(r *Route, line func(string) string, add func(path, msg, fix string)) {
	if r.Terminate != nil || r.Reject {
		add(line("match"), fmt.Sprintf("route %s: protocol and silence routes are passthrough only", r.Label()), "write passthrough: host:port")
	}
}

// LAN is the client rule that stands for the networks of steer.interfaces.
const LAN = "lan"

// checkClientRules validates an allow/deny list: CIDRs, addresses or lan.
func (c *Config) checkClientRules(key string, list []string, add func(path, msg, fix string)) {
	for i, v := range list {
		if v == LAN {
			continue
		}
		if _, err := ParsePrefix(v); err != nil {
			add(fmt.Sprintf("%s[%d]", key, i), fmt.Sprintf("%s[%d]: %q is not a CIDR, an IP address or lan", key, i, v),
				"write e.g. 192.168.1.0/24, 2001:db8::/32, 10.0.0.5 or lan")
		}
	}
}

// checkAuth validates client_auth, basic_auth and forward_auth of a
// terminate route at key.
func (c *Config) checkAuth(key string, t *Terminate, up *url.URL, add func(path, msg, fix string)) {
	httpOnly := func(what string) {
		if up != nil && up.Scheme == "tcp" {
			add(key+"."+what, what+" needs an http:// or https:// upstream (it acts on HTTP requests)", "remove it, or proxy HTTP")
		}
	}
	if ca := t.ClientAuth; ca != nil {
		k := key + ".client_auth"
		if ca.CA == "" {
			add(k, "client_auth without ca", "write client_auth: {ca: /etc/relay/clients-ca.pem, required: true}")
		} else if pem, err := os.ReadFile(ca.CA); err != nil {
			add(k+".ca", fmt.Sprintf("client_auth.ca %s: %v", ca.CA, errors.Unwrap(err)), "write the path of a PEM file with the CA that signs client certificates")
		} else if !bytes.Contains(pem, []byte("-----BEGIN CERTIFICATE-----")) {
			add(k+".ca", fmt.Sprintf("client_auth.ca %s has no PEM certificate in it", ca.CA), "write the path of a PEM file with the CA that signs client certificates")
		}
	}
	if ba := t.BasicAuth; ba != nil {
		k := key + ".basic_auth"
		httpOnly("basic_auth")
		if ba.UsersFile == "" {
			add(k, "basic_auth without users_file", "write basic_auth: {users_file: /etc/relay/htpasswd} (made with htpasswd -B)")
		} else if data, err := os.ReadFile(ba.UsersFile); err != nil {
			add(k+".users_file", fmt.Sprintf("basic_auth.users_file %s: %v", ba.UsersFile, errors.Unwrap(err)), "create it with `htpasswd -B -c FILE USER`")
		} else if _, err := ParseHtpasswd(data); err != nil {
			add(k+".users_file", fmt.Sprintf("basic_auth.users_file %s: %v", ba.UsersFile, err), "write each user with `htpasswd -B FILE USER` (bcrypt)")
		}
	}
	if fa := t.ForwardAuth; fa != nil {
		k := key + ".forward_auth"
		httpOnly("forward_auth")
		if u, err := url.Parse(fa.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			add(k+".url", fmt.Sprintf("forward_auth.url %q is not an http:// or https:// URL", fa.URL), "write e.g. http://127.0.0.1:9091/api/verify?rd=https://auth.example.com/")
		}
		for _, h := range fa.CopyHeaders {
			if h == "" || strings.ContainsAny(h, " \t:\r\n") {
				add(k+".copy_headers", fmt.Sprintf("forward_auth.copy_headers: %q is not a header name", h), "write names like Remote-User")
			}
		}
	}
}

// ParseHtpasswd parses an htpasswd file of bcrypt hashes into user →
// hash. Blank lines and # comments are skipped; any other hash (MD5
// apr1, SHA1, crypt) is an error naming its line, since only bcrypt is
// worth checking against.
func ParseHtpasswd(data []byte) (map[string]string, error) {
	users := map[string]string{}
	for i, ln := range strings.Split(string(data), "\n") {
		ln = strings.TrimSpace(ln)
		if ln == "" || strings.HasPrefix(ln, "#") {
			continue
		}
		user, hash, ok := strings.Cut(ln, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("line %d is not user:hash", i+1)
		}
		if len(hash) != 60 || !(strings.HasPrefix(hash, "$2a$") || strings.HasPrefix(hash, "$2b$") || strings.HasPrefix(hash, "$2y$")) {
			return nil, fmt.Errorf("line %d (user %q) is not a bcrypt hash", i+1, user)
		}
		users[user] = hash
	}
	return users, nil
}

// ParsePrefix parses a CIDR or a bare address (taken as a single host).
func ParsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func listenPort(s string) (int, error) {
	_, p, err := net.SplitHostPort(s)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 0 || n > 65535 {
		return 0, fmt.Errorf("port %q is not a number between 0 and 65535", p)
	}
	return n, nil
}

func validHostPort(s string) error {
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return err
	}
	if h == "" {
		return fmt.Errorf("host is empty")
	}
	if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not a number between 1 and 65535", p)
	}
	return nil
}

// validMatch accepts a DNS name or "*." + DNS name (a wildcard is a whole
// leftmost label).
func validMatch(m string) error {
	name := strings.TrimSuffix(m, ".")
	name = strings.TrimPrefix(name, "*.")
	if name == "" || len(name) > 253 {
		return fmt.Errorf("empty or too long")
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("label %q is empty or longer than 63 bytes", label)
		}
		for _, ch := range label {
			switch {
			case ch >= 'a' && ch <= 'z', ch >= 'A' && ch <= 'Z', ch >= '0' && ch <= '9', ch == '-', ch == '_':
			case ch == '*':
				return fmt.Errorf("a wildcard must be the whole leftmost label (\"*.example.com\")")
			default:
				return fmt.Errorf("character %q is not allowed in a name", ch)
			}
		}
	}
	return nil
}
