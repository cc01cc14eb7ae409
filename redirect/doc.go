// Package redirect installs, shows and removes the iptables/ip6tables nat
// rules that steer TCP 443/80 into the relay's unprivileged ports
// (REDIRECT), in chains of its own (RELAY-PREROUTING, RELAY-OUTPUT) reached
// by one jump each. It also runs the preflight checks of `relayctl rules`
// (privilege, backend mix, relay user, interfaces, forwarding).
//
//	fams, err := redirect.Families(ipv6)
//	changes, err := redirect.Apply(fams, redirect.Options{HTTPSPort: 8443, HTTPPort: 8080}, false)
//	...
//	_, err = redirect.Delete(fams, false)
//
// It knows nothing of TLS or the relay; cmd/relayctl wires it.
package redirect
