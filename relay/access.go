package relay

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// Reasons of relay_access_denied_total.
const (
	deniedByDeny     = "deny"        // the client is in the route's deny list
	deniedNotAllowed = "not_allowed" // the route has an allow list without the client
)

// alertAccessDenied is a fatal TLS alert record (access_denied): a refused
// client has been sent nothing else yet, so it can still be told why.
var alertAccessDenied = []byte{0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x31}

// clientRules are a route's allow and deny lists. A nil *clientRules lets
// everyone in. Deny wins over allow; a non-empty allow list refuses
// everyone not in it.
type clientRules struct {
	allow, deny       []netip.Prefix
	allowLAN, denyLAN bool
	lan               *lanNets
	hasAllow          bool
}

// newClientRules builds the rules of allow and deny (CIDRs, addresses or
// "lan"); nil when both are empty.
func newClientRules(allow, deny []string, lan *lanNets) (*clientRules, error) {
	if len(allow) == 0 && len(deny) == 0 {
		return nil, nil
	}
	r := &clientRules{lan: lan, hasAllow: len(allow) > 0}
	parse := func(list []string, into *[]netip.Prefix, isLAN *bool) error {
		for _, v := range list {
			if v == config.LAN {
				*isLAN = true
				continue
			}
			p, err := config.ParsePrefix(v)
			if err != nil {
				return fmt.Errorf("client rule %q: %w", v, err)
			}
			*into = append(*into, unmapPrefix(p))
		}
		return nil
	}
	if err := parse(allow, &r.allow, &r.allowLAN); err != nil {
		return nil, err
	}
	if err := parse(deny, &r.deny, &r.denyLAN); err != nil {
		return nil, err
	}
	return r, nil
}

// check reports whether a may come in, and if not the reason (a
// relay_access_denied_total label).
func (r *clientRules) check(a netip.Addr) (ok bool, reason string) {
	if r == nil {
		return true, ""
	}
	a = a.Unmap()
	if matchAny(r.deny, a) || (r.denyLAN && r.lan.contains(a)) {
		return false, deniedByDeny
	}
	if !r.hasAllow || matchAny(r.allow, a) || (r.allowLAN && r.lan.contains(a)) {
		return true, ""
	}
	return false, deniedNotAllowed
}

func matchAny(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// unmapPrefix turns ::ffff:a.b.c.d/n into a.b.c.d/(n-96), so that the
// unmapped client addresses match it.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

// lanNets are the networks of steer.interfaces (every non-loopback
// interface when empty), as `lan` in client rules. They are read again
// after lanRefresh, so a DHCP lease change needs no reload.
type lanNets struct {
	ifaces []string

	mu   sync.Mutex
	at   time.Time
	nets []netip.Prefix
}

const lanRefresh = 10 * time.Second

func (l *lanNets) contains(a netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.at.IsZero() || time.Since(l.at) > lanRefresh {
		l.nets, l.at = interfaceNets(l.ifaces), time.Now()
	}
	return matchAny(l.nets, a)
}

// interfaceNets returns the networks of the named interfaces (missing
// ones are skipped: a bridge may come up later), or of every
// non-loopback interface when names is empty.
func interfaceNets(names []string) []netip.Prefix {
	var ifs []net.Interface
	if len(names) == 0 {
		all, _ := net.Interfaces()
		for _, ifc := range all {
			if ifc.Flags&net.FlagLoopback == 0 {
				ifs = append(ifs, ifc)
			}
		}
	} else {
		for _, n := range names {
			if ifc, err := net.InterfaceByName(n); err == nil {
				ifs = append(ifs, *ifc)
			}
		}
	}
	var out []netip.Prefix
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				out = append(out, unmapPrefix(p.Masked()))
			}
		}
	}
	return out
}

// buildAccess builds the client rules of every route of cfg into st.
func (st *state) buildAccess(cfg *config.Config) error {
	lan := &lanNets{ifaces: cfg.Steer.Interfaces}
	var err error
	if st.original.access, err = newClientRules(cfg.TransparentAllow, nil, lan); err != nil {
		return fmt.Errorf("transparent_allow: %w", err)
	}
	for i := range cfg.Routes {
		rc := &cfg.Routes[i]
		r := st.routes[i]
		if r.access, err = newClientRules(rc.Allow, rc.Deny, lan); err != nil {
			return fmt.Errorf("route %s: %w", rc.Label(), err)
		}
	}
	for _, p := range cfg.Listen.ProxyProtocolFrom {
		pf, err := config.ParsePrefix(p)
		if err != nil {
			return fmt.Errorf("listen.proxy_protocol_from %q: %w", p, err)
		}
		st.proxyFrom = append(st.proxyFrom, unmapPrefix(pf))
	}
	return nil
}

// refused checks the client of c against rt's rules. A refused client is
// counted, sent a TLS access_denied alert and logged; the caller closes c.
func (s *Server) refused(c *net.TCPConn, rt *route, sni string, ent *accessEntry) bool {
	if rt.access == nil {
		return false
	}
	ok, reason := rt.access.check(s.clientAddr(c).Addr())
	if ok {
		return false
	}
	s.m.accessDenied.WithLabelValues(rt.label, reason).Inc()
	if !rt.plain { // a TLS alert would be garbage to SSH or OpenVPN
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write(alertAccessDenied)
	}
	s.log.Debug("access denied", "route", rt.label, "client", s.peer(c), "sni", sni, "reason", reason)
	s.logEntry(ent, resultAccessDenied, reason)
	return true
}

// refusedHTTP checks a request on the http port against rt's rules; a
// refused client gets 403.
func (s *Server) refusedHTTP(w http.ResponseWriter, r *http.Request, rt *route) bool {
	if rt.access == nil {
		return false
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	ok, reason := rt.access.check(ap.Addr())
	if err == nil && ok {
		return false
	}
	if reason == "" {
		reason = deniedNotAllowed
	}
	s.m.accessDenied.WithLabelValues(rt.label, reason).Inc()
	s.log.Debug("access denied", "route", rt.label, "client", r.RemoteAddr, "host", r.Host, "reason", reason)
	noteResult(w, resultAccessDenied, reason)
	http.Error(w, "access denied", http.StatusForbidden)
	return true
}

// transitRefused checks a plain-HTTP connection passed on to its original
// destination against transparent_allow; a refused one is counted (the
// caller closes it: nothing can be said in HTTP before the request).
func (s *Server) transitRefused(c *net.TCPConn) bool {
	rt := s.state.Load().original
	if rt.access == nil {
		return false
	}
	ok, reason := rt.access.check(s.clientAddr(c).Addr())
	if !ok {
		s.m.accessDenied.WithLabelValues(rt.label, reason).Inc()
		s.log.Debug("access denied", "route", rt.label, "client", c.RemoteAddr(), "reason", reason)
	}
	return !ok
}
