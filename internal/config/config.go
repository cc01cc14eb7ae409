// Package config holds relay.yaml: its types, defaults, loading with
// file:line errors, and validation. It knows nothing of sockets.
package config

import (
	"net"
	"strings"
	"time"
)

// DefaultPath is where the CLI looks when neither -c nor $RELAY_CONFIG is set.
const DefaultPath = "/etc/relay/relay.yaml"

// Config is the whole relay.yaml. Field names follow the YAML keys in
// DESIGN.md; that file is the contract users script against.
type Config struct {
	// Path is the file this was loaded from ("" for embedded defaults).
	Path string `yaml:"-"`

	User       string  `yaml:"user"`        // default "relay"
	StateDir   string  `yaml:"state_dir"`   // default /var/lib/relay
	Listen     Listen  `yaml:"listen"`      // defaults :8080, :8443, 127.0.0.1:9090
	UnknownSNI string  `yaml:"unknown_sni"` // original | reject | <route match>; default original
	Steer      Steer   `yaml:"steer"`
	Splice     string  `yaml:"splice"` // auto | sockmap | splice; default auto
	ACME       ACME    `yaml:"acme"`
	Limits     Limits  `yaml:"limits"`
	Log        Log     `yaml:"log"`
	Routes     []Route `yaml:"routes"`
	// TransparentAllow restricts the unknown_sni: original path (and plain
	// HTTP passed on to its original destination) to these clients
	// (CIDRs or "lan"); empty = every client.
	TransparentAllow []string `yaml:"transparent_allow"`

	lines map[string]int // dotted key path → line, for validation errors
}

// Listen holds the relay's own (unprivileged) listen addresses.
type Listen struct {
	HTTP    string `yaml:"http"`    // default ":8080"; "" after defaults never happens, "off" disables
	HTTPS   string `yaml:"https"`   // default ":8443"
	Metrics string `yaml:"metrics"` // default "127.0.0.1:9090", "off" disables
	// ProxyProtocolFrom lists the peers (CIDRs) whose connections to the
	// https port must begin with a PROXY v1 or v2 header; its source
	// address is then the client's. Empty = nobody.
	ProxyProtocolFrom []string `yaml:"proxy_protocol_from"`
}

// SameAddrs reports whether l and o bind the same addresses (the part of
// listen that needs a restart).
func (l Listen) SameAddrs(o Listen) bool {
	return l.HTTP == o.HTTP && l.HTTPS == o.HTTPS && l.Metrics == o.Metrics
}

// Steer is read by `relayctl rules apply` only.
type Steer struct {
	Interfaces []string `yaml:"interfaces"` // empty = every non-loopback interface that is up
	Local      bool     `yaml:"local"`      // also OUTPUT (the gateway's own traffic), relay user excluded
	IPv6       *bool    `yaml:"ipv6"`       // default true
	Bypass     []string `yaml:"bypass"`     // CIDRs never intercepted
	BPF        string   `yaml:"bpf"`        // auto | on | off; default auto
	// Ports intercepted; default {443: https, 80: http}. Not in DESIGN.md's
	// example but users of non-standard ports ask for it.
	HTTPSPorts []int `yaml:"https_ports"` // default [443]
	HTTPPorts  []int `yaml:"http_ports"`  // default [80]
	// PinDir is where BPF state is pinned; default /sys/fs/bpf/relay. One
	// per network namespace steered.
	PinDir string `yaml:"pin_dir"`
}

// IPv6Enabled reports steer.ipv6 with its default (true).
func (s Steer) IPv6Enabled() bool { return s.IPv6 == nil || *s.IPv6 }

// ACME configures certificate issuance for `tls: acme` routes.
type ACME struct {
	Email   string `yaml:"email"`    // empty: tls: acme falls back to internal, with a warning
	CA      string `yaml:"ca"`       // letsencrypt | letsencrypt-staging | directory URL; default letsencrypt
	CARoot  string `yaml:"ca_root"`  // PEM bundle trusted for the ACME server's HTTPS
	DNS     string `yaml:"dns"`      // lego DNS provider name for dns-01
	Profile string `yaml:"profile"`  // ACME profile (e.g. shortlived, tlsserver); empty = CA default
	KeyType string `yaml:"key_type"` // ec256 (default) | ec384 | rsa2048 | rsa4096
	// Challenges restricts the challenge types tried: http-01, tls-alpn-01, dns-01.
	// Empty = choose automatically.
	Challenges []string `yaml:"challenges"`
	EAB        *EAB     `yaml:"eab"`
}

// EAB is ACME external account binding.
type EAB struct {
	KID     string `yaml:"kid"`
	HMACKey string `yaml:"hmac_key"`
}

// Limits protect a small gateway. Zero values are replaced by defaults.
type Limits struct {
	HelloTimeout   Duration `yaml:"hello_timeout"`   // default 10s
	MaxHelloBytes  int      `yaml:"max_hello_bytes"` // default 65536
	IdleTimeout    Duration `yaml:"idle_timeout"`    // default 5m
	MaxConnections int      `yaml:"max_connections"` // default 10000
	MaxHandshakes  int      `yaml:"max_handshakes"`  // default 512
	DrainTimeout   Duration `yaml:"drain_timeout"`   // default 30s
	DialTimeout    Duration `yaml:"dial_timeout"`    // default 5s
	// PerClient limits each client address (IPv6 by /64) over all
	// routes; nil = no per-client limit.
	PerClient *PerClient `yaml:"per_client"`
}

// PerClient is limits.per_client. Zero fields are not limited.
type PerClient struct {
	Connections int  `yaml:"connections"` // concurrent connections per client
	Rate        Rate `yaml:"rate"`        // new connections per second ("10/s")
	Burst       int  `yaml:"burst"`       // token bucket size; default max(1, rate)
}

// Rate is a number of events per second, written "10/s" (or "600/m").
type Rate float64

// Log configures log/slog output.
type Log struct {
	Level  string `yaml:"level"`  // debug | info (default) | warn | error
	Format string `yaml:"format"` // text (default) | json
	// Access is the access log (one line per connection, and per request
	// on terminate routes); nil = none.
	Access *AccessLog `yaml:"access"`
}

// AccessLog is log.access.
type AccessLog struct {
	Path   string `yaml:"path"`   // a file (created 0640, reopened on SIGUSR1) or "stdout"
	Format string `yaml:"format"` // json (default) | combined
}

// Route is one entry of routes:. Exactly one of Passthrough, Terminate,
// Reject is set.
type Route struct {
	// Match is the server name (string form, or the sni of the map form);
	// "" for protocol and silence routes.
	Match string `yaml:"match"`
	// From the map form of match: ALPN protocols (any one offered by the
	// client selects the route), or a non-TLS protocol (ssh, openvpn,
	// http), or Silence: clients that send nothing for that long.
	ALPN          []string   `yaml:"-"`
	Protocol      string     `yaml:"-"`
	Silence       Duration   `yaml:"-"`
	Passthrough   Upstreams  `yaml:"passthrough"`    // one address or a list (round-robin with failover)
	ProxyProtocol string     `yaml:"proxy_protocol"` // "" | v1 | v2
	Terminate     *Terminate `yaml:"terminate"`
	Reject        bool       `yaml:"reject"`
	// Allow and Deny are client address rules (CIDRs, bare addresses or
	// "lan"): a client in Deny, or not in a non-empty Allow, is refused
	// before any upstream is dialled.
	Allow []string `yaml:"allow"`
	Deny  []string `yaml:"deny"`
	// QUIC (passthrough routes): also relay QUIC on UDP by SNI. nil =
	// true when every upstream's port is 443 (QUIC's port), else false.
	QUIC *bool `yaml:"quic"`
	// H3 (terminate routes): also serve HTTP/3 on UDP and advertise it
	// with Alt-Svc. nil = true.
	H3 *bool `yaml:"h3"`

	// Line is the line of this route in the file, for error messages.
	Line int `yaml:"-"`

	matchMap bool // match was written as a map
}

// IsName reports whether the route is selected by a TLS server name
// (with or without ALPN), not by a protocol or silence.
func (r *Route) IsName() bool { return r.Protocol == "" && r.Silence == 0 }

// Protocols a route's match may name (match: {protocol: ...}).
var Protocols = []string{"ssh", "openvpn", "http"}

// Label is the route's metrics label: the match for a name, else
// "NAME alpn=a,b", "protocol:ssh" or "silence:5s". Fixed by the config,
// never by a client.
func (r *Route) Label() string {
	switch {
	case r.Protocol != "":
		return "protocol:" + r.Protocol
	case r.Silence > 0:
		return "silence:" + r.Silence.D().String()
	case len(r.ALPN) > 0:
		return NormalizeName(r.Match) + " alpn=" + strings.Join(r.ALPN, ",")
	}
	return r.Match
}

// Action names what a route does; it is also the metrics "action" label.
func (r *Route) Action() string {
	switch {
	case r.Reject:
		return "reject"
	case r.Terminate != nil:
		return "terminate"
	default:
		return "passthrough"
	}
}

// QUICEnabled reports whether a passthrough route relays QUIC too.
func (r *Route) QUICEnabled() bool {
	if r.Action() != "passthrough" {
		return false
	}
	if r.QUIC != nil {
		return *r.QUIC
	}
	for _, u := range r.Passthrough {
		if _, port, err := net.SplitHostPort(u); err != nil || port != "443" {
			return false
		}
	}
	return len(r.Passthrough) > 0
}

// H3Enabled reports whether a terminate route serves HTTP/3 too (`h3` on
// the route or inside `terminate`).
func (r *Route) H3Enabled() bool {
	if r.Action() != "terminate" {
		return false
	}
	switch {
	case r.H3 != nil:
		return *r.H3
	case r.Terminate.H3 != nil:
		return *r.Terminate.H3
	}
	return true
}

// Terminate: the relay ends TLS and proxies to Upstream.
type Terminate struct {
	// Upstream is http://host:port, https://host:port or tcp://host:port
	// (raw TCP after termination).
	Upstream string `yaml:"upstream"`
	TLS      TLS    `yaml:"tls"`
	// UpstreamCA is a PEM bundle to verify an https:// upstream; empty = system roots.
	UpstreamCA string `yaml:"upstream_ca"`
	// UpstreamInsecure skips verification of an https:// upstream.
	UpstreamInsecure bool `yaml:"upstream_insecure"`
	// H3 is the route's `h3` written inside terminate; nil = the route's.
	H3 *bool `yaml:"h3"`

	ClientAuth  *ClientAuth  `yaml:"client_auth"`  // mTLS; nil = no client certificates asked
	BasicAuth   *BasicAuth   `yaml:"basic_auth"`   // nil = no HTTP basic auth
	ForwardAuth *ForwardAuth `yaml:"forward_auth"` // nil = no forward auth

	// HSTS, when set, adds Strict-Transport-Security: max-age=HSTS to
	// answers that have none (http(s) upstreams); 0 = not added.
	HSTS Duration `yaml:"hsts"`
}

// ClientAuth asks terminate clients for a certificate signed by CA.
type ClientAuth struct {
	CA       string `yaml:"ca"`       // PEM bundle of accepted client CAs
	Required bool   `yaml:"required"` // false: verified if given, else let through
}

// BasicAuth checks HTTP basic credentials against an htpasswd file with
// bcrypt hashes (htpasswd -B), reread when it changes.
type BasicAuth struct {
	UsersFile string `yaml:"users_file"`
}

// ForwardAuth asks URL about every request (the protocol of Authelia,
// Authentik, oauth2-proxy): 2xx lets it through with CopyHeaders copied
// from the answer; any other answer goes to the client as it is.
type ForwardAuth struct {
	URL         string   `yaml:"url"`
	CopyHeaders []string `yaml:"copy_headers"`
}

// TLS is `tls: acme | internal | {cert: F, key: F}`.
type TLS struct {
	Mode string // "acme", "internal" or "files"
	Cert string // with Mode "files"
	Key  string // with Mode "files"
}

// Upstreams is `passthrough: addr` or `passthrough: [addr, ...]`.
type Upstreams []string

// Duration is a time.Duration written as "10s" in YAML.
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }
