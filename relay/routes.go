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
