package relay

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/relay-gw/relay/internal/config"
)

// clientTableSize bounds the per-client table (limits.per_client): past it
// the least recently seen client is forgotten, so a flood of spoofed or
// random sources costs at most this many entries, never more (88 bytes
// each, 5.5 MiB in all: BenchmarkClientTableFlood). A forgotten client
// starts again with a full bucket.
const clientTableSize = 65536

// clientKey is a client's address as a limit sees it: IPv4 addresses as
// they are, IPv6 ones by their /64 (one household, one key).
type clientKey [16]byte

func keyOf(a netip.Addr) clientKey {
	a = a.Unmap()
	if a.Is4() {
		return clientKey(netip.AddrFrom4(a.As4()).As16())
	}
	k := clientKey(a.As16())
	clear(k[8:])
	k[15] = 1 // never equal to a v4-mapped key
	return k
}

// clientEntry is one client: its open connections and token bucket. prev
// and next link the LRU list (indices into clientTable.ents, -1 = none).
type clientEntry struct {
	key        clientKey
	conns      int32
	tokens     float32
	last       int64 // unix nanoseconds of the last refill
	prev, next int32
}

// clientTable counts connections and new-connection tokens per client,
// bounded by max entries (LRU).
type clientTable struct {
	mu         sync.Mutex
	max        int
	idx        map[clientKey]int32
	ents       []clientEntry
	head, tail int32 // most and least recently used; -1 when empty
}

func newClientTable(max int) *clientTable {
	return &clientTable{max: max, idx: map[clientKey]int32{}, head: -1, tail: -1}
}

// Limits of relay_limit_rejections_total for per-client limits.
const (
	limitPerClientConns = "per_client_connections"
	limitPerClientRate  = "per_client_rate"
)

// admit counts a new connection of k under lim; when it is over a limit it
// counts nothing and returns that limit's name.
func (t *clientTable) admit(k clientKey, lim *config.PerClient, now time.Time) (ok bool, limit string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	burst := float32(lim.Burst)
	if burst == 0 {
		burst = float32(max(1, float64(lim.Rate)))
	}
	i, found := t.idx[k]
	if !found {
		i = t.insert(k)
		t.ents[i].tokens = burst
		t.ents[i].last = now.UnixNano()
	} else {
		t.touch(i)
	}
	e := &t.ents[i]
	if lim.Connections > 0 && int(e.conns) >= lim.Connections {
		return false, limitPerClientConns
	}
	if lim.Rate > 0 {
		n := now.UnixNano()
		e.tokens = min(burst, e.tokens+float32(float64(n-e.last)/1e9*float64(lim.Rate)))
		e.last = n
		if e.tokens < 1 {
			return false, limitPerClientRate
		}
		e.tokens--
	}
	e.conns++
	return true, ""
}

// done ends a connection counted by admit. A client forgotten meanwhile
// (LRU) is not counted any more.
func (t *clientTable) done(k clientKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.idx[k]; ok && t.ents[i].conns > 0 {
		t.ents[i].conns--
	}
}

// insert adds k at the head, reusing the least recently used entry when
// the table is full.
func (t *clientTable) insert(k clientKey) int32 {
	var i int32
	if len(t.ents) < t.max {
		t.ents = append(t.ents, clientEntry{})
		i = int32(len(t.ents) - 1)
	} else {
		i = t.tail
		t.unlink(i)
		delete(t.idx, t.ents[i].key)
	}
	t.ents[i] = clientEntry{key: k, prev: -1, next: -1}
	t.idx[k] = i
	t.pushFront(i)
	return i
}

func (t *clientTable) touch(i int32) {
	if t.head == i {
		return
	}
	t.unlink(i)
	t.pushFront(i)
}

func (t *clientTable) unlink(i int32) {
	e := &t.ents[i]
	if e.prev >= 0 {
		t.ents[e.prev].next = e.next
	} else {
		t.head = e.next
	}
	if e.next >= 0 {
		t.ents[e.next].prev = e.prev
	} else {
		t.tail = e.prev
	}
	e.prev, e.next = -1, -1
}

func (t *clientTable) pushFront(i int32) {
	e := &t.ents[i]
	e.prev, e.next = -1, t.head
	if t.head >= 0 {
		t.ents[t.head].prev = i
	}
	t.head = i
	if t.tail < 0 {
		t.tail = i
	}
}

// connClient is what the relay knows of a connection's client beyond its
// socket: the source a PROXY header gave, and the per-client key counted.
type connClient struct {
	src     netip.AddrPort // valid: from a PROXY header
	key     clientKey
	counted bool
}

// clients maps connections to their connClient. Only connections with
// one (PROXY in, or counted by limits.per_client) are in it.
type clients struct {
	once  sync.Once
	table atomic.Pointer[clientTable] // nil until first used
	mu    sync.Mutex
	conns map[net.Conn]connClient
}

func (cs *clients) init() {
	cs.once.Do(func() {
		cs.conns = map[net.Conn]connClient{}
		cs.table.Store(newClientTable(clientTableSize))
	})
}

// admitClient applies limits.per_client to a new connection; false: it is
// refused (counted; the caller releases it). Connections from
// listen.proxy_protocol_from peers are counted once their header names the
// client.
func (s *Server) admitClient(c net.Conn) bool {
	st := s.state.Load()
	if st.cfg.Limits.PerClient == nil {
		return true
	}
	ap, ok := addrPort(c.RemoteAddr())
	if !ok || st.fromProxy(ap.Addr()) {
		return true
	}
	return s.countClient(c, ap, netip.AddrPort{}, st.cfg.Limits.PerClient)
}

// countClient counts c for client a under lim; src is the PROXY source to
// remember (or invalid).
func (s *Server) countClient(c net.Conn, a, src netip.AddrPort, lim *config.PerClient) bool {
	cs := &s.clients
	cs.init()
	cc := connClient{src: src}
	if lim != nil {
		k := keyOf(a.Addr())
		ok, limit := cs.table.Load().admit(k, lim, time.Now())
		if !ok {
			s.m.limitRejections.WithLabelValues(limit).Inc()
			s.log.Debug("per-client limit reached: refusing", "client", a, "limit", limit)
			if s.alog.on() { // for fail2ban: a flood is one client's many lines (dropped past the queue)
				s.alog.add(&accessEntry{Time: time.Now(), Client: netip.AddrPortFrom(a.Addr().Unmap(), a.Port()), Result: resultRefused, Reason: limit})
			}
			return false
		}
		cc.key, cc.counted = k, true
	}
	cs.mu.Lock()
	cs.conns[c] = cc
	cs.mu.Unlock()
	return true
}

// clientGone forgets c and ends its per-client count.
func (s *Server) clientGone(c net.Conn) {
	cs := &s.clients
	t := cs.table.Load()
	if t == nil {
		return
	}
	cs.mu.Lock()
	cc, ok := cs.conns[c]
	delete(cs.conns, c)
	cs.mu.Unlock()
	if ok && cc.counted {
		t.done(cc.key)
	}
}

// clientAddr is the address of c's client: the PROXY header's source when
// it came through a trusted proxy, else the socket's peer.
func (s *Server) clientAddr(c net.Conn) netip.AddrPort {
	if src, ok := s.proxySource(c); ok {
		return src
	}
	ap, _ := addrPort(c.RemoteAddr())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// proxySource is the source a PROXY header gave for c, if any.
func (s *Server) proxySource(c net.Conn) (netip.AddrPort, bool) {
	cs := &s.clients
	if cs.table.Load() == nil {
		return netip.AddrPort{}, false
	}
	cs.mu.Lock()
	cc, ok := cs.conns[c]
	cs.mu.Unlock()
	return cc.src, ok && cc.src.IsValid()
}

// peer is clientAddr as a net.Addr, for logs, PROXY headers and
// X-Forwarded-For (the socket's own address when there was no PROXY
// header: nothing allocated).
func (s *Server) peer(c net.Conn) net.Addr {
	if src, ok := s.proxySource(c); ok {
		return net.TCPAddrFromAddrPort(src)
	}
	return c.RemoteAddr()
}
