package redirect

import (
	"context"
	"fmt"
	"net"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// WatchLinks calls event (from one goroutine) when an interface named in
// names (any but lo when names is empty) appears or comes up, or gets an
// address, in this network namespace, until ctx ends. It returns an
// error only when it cannot subscribe.
func WatchLinks(ctx context.Context, names []string, event func(what string)) error {
	links := make(chan netlink.LinkUpdate, 16)
	addrs := make(chan netlink.AddrUpdate, 16)
	done := make(chan struct{})
	errs := make(chan error, 2)
	onErr := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		close(done)
		return fmt.Errorf("subscribe to link events: %w", err)
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		close(done)
		return fmt.Errorf("subscribe to address events: %w", err)
	}
	wanted := func(name string) bool {
		return name != "lo" && (len(names) == 0 || slices.Contains(names, name))
	}
	// Known interfaces and whether they are up, to tell "appeared" and
	// "came up" from the many other link messages.
	up := map[string]bool{}
	if ls, err := netlink.LinkList(); err == nil {
		for _, l := range ls {
			up[l.Attrs().Name] = l.Attrs().Flags&net.FlagUp != 0
		}
	}
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case err := <-errs:
				event("netlink error (checking now): " + err.Error())
			case u, ok := <-links:
				if !ok {
					return
				}
				a := u.Attrs()
				if !wanted(a.Name) {
					continue
				}
				was, known := up[a.Name]
				isUp := a.Flags&net.FlagUp != 0
				switch {
				case u.Header.Type == unix.RTM_DELLINK:
					delete(up, a.Name)
					event("interface " + a.Name + " removed")
				case !known:
					up[a.Name] = isUp
					event("interface " + a.Name + " appeared")
				case isUp && !was:
					up[a.Name] = true
					event("interface " + a.Name + " came up")
				default:
					up[a.Name] = isUp
				}
			case u, ok := <-addrs:
				if !ok {
					return
				}
				if !u.NewAddr {
					continue
				}
				name := ""
				if l, err := netlink.LinkByIndex(u.LinkIndex); err == nil {
					name = l.Attrs().Name
				}
				if name != "lo" { // sk_lookup and the LOCAL exclusion cover every address
					event("address " + u.LinkAddress.String() + " added on " + name)
				}
			}
		}
	}()
	return nil
}

// DefaultGateway returns the next hop of this network namespace's IPv4
// default route, as a LAN host sees its gateway.
func DefaultGateway() (net.IP, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.Gw != nil {
			return r.Gw, nil
		}
	}
	return nil, fmt.Errorf("no IPv4 default route in this network namespace: give the gateway's address with --addr")
}
