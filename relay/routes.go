package relay

import (
	"strings"
)

// routeTable maps server names to routes: exact names first, then
// "*.suffix" (one label), longest suffix winning. Keys are normalized
// (lowercase, no trailing dot).
type routeTable[T any] struct {
	exact    map[string]T
	wildcard map[string]T // key: suffix without "*." (e.g. "example.com")
}

func newRouteTable[T any]() *routeTable[T] {
	return &routeTable[T]{exact: map[string]T{}, wildcard: map[string]T{}}
}

func normalizeName(s string) string {
	s = strings.TrimSuffix(s, ".")
	return strings.ToLower(s)
}

func (t *routeTable[T]) add(match string, v T) {
	m := normalizeName(match)
	if suffix, ok := strings.CutPrefix(m, "*."); ok {
		t.wildcard[suffix] = v
		return
	}
	t.exact[m] = v
}

// lookup returns the route for name. A wildcard matches exactly one label,
// so "*.example.com" matches "a.example.com" but not "a.b.example.com" nor
// "example.com"; with both "*.b.example.com" and "*.example.com", the
// longer one wins for "a.b.example.com" simply because only it matches.
func (t *routeTable[T]) lookup(name string) (T, bool) {
	var zero T
	name = normalizeName(name)
	if name == "" {
		return zero, false
	}
	if v, ok := t.exact[name]; ok {
		return v, true
	}
	if i := strings.IndexByte(name, '.'); i > 0 {
		if v, ok := t.wildcard[name[i+1:]]; ok {
			return v, true
		}
	}
	return zero, false
}

// lookupExactKey returns the entry added under match itself.
func (t *routeTable[T]) lookupExactKey(match string) (T, bool) {
	m := normalizeName(match)
	if suffix, ok := strings.CutPrefix(m, "*."); ok {
		v, ok := t.wildcard[suffix]
		return v, ok
	}
	v, ok := t.exact[m]
	return v, ok
}

// lookupBoth returns the exact entry and the wildcard entry for name,
// either of which may be missing.
func (t *routeTable[T]) lookupBoth(name string) (exact, wild T, okExact, okWild bool) {
	name = normalizeName(name)
	if name == "" {
		return
	}
	exact, okExact = t.exact[name]
	if i := strings.IndexByte(name, '.'); i > 0 {
		wild, okWild = t.wildcard[name[i+1:]]
	}
	return
}

// routeSet is every route of one match name: the one without alpn and
// those selected by an ALPN protocol the client offers.
type routeSet struct {
	first  *route // the first in the config, for the http port
	plain  *route
	byALPN map[string]*route
}

// pick returns the route for a client offering alpn: the first offered
// protocol (in the client's order) that a route lists, else the route
// without alpn (nil when there is none).
func (rs *routeSet) pick(alpn []string) *route {
	for _, p := range alpn {
		if r := rs.byALPN[p]; r != nil {
			return r
		}
	}
	return rs.plain
}

// lookupRoute applies the documented order: name + ALPN, name, wildcard +
// ALPN, wildcard.
func lookupRoute(t *routeTable[*routeSet], name string, alpn []string) (*route, bool) {
	exact, wild, okE, okW := t.lookupBoth(name)
	if okE {
		if r := exact.pick(alpn); r != nil {
			return r, true
		}
	}
	if okW {
		if r := wild.pick(alpn); r != nil {
			return r, true
		}
	}
	return nil, false
}
