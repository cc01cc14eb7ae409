package main

import (
	"fmt"

	"github.com/go-acme/lego/v4/challenge"
	"github.com/go-acme/lego/v4/providers/dns/cloudflare"
	"github.com/go-acme/lego/v4/providers/dns/desec"
	"github.com/go-acme/lego/v4/providers/dns/digitalocean"
	"github.com/go-acme/lego/v4/providers/dns/duckdns"
	"github.com/go-acme/lego/v4/providers/dns/exec"
	"github.com/go-acme/lego/v4/providers/dns/hetzner"
	"github.com/go-acme/lego/v4/providers/dns/httpreq"
)

// dnsProviders are the lego DNS-01 providers built in. All 180 of lego's
// would add tens of MB to a binary meant for 128 MB routers; these cover
// DNS host through a script or a webhook.
var dnsProviders = map[string]func() (challenge.Provider, error){
	"cloudflare":   func() (challenge.Provider, error) { return cloudflare.NewDNSProvider() },
	"desec":        func() (challenge.Provider, error) { return desec.NewDNSProvider() },
	"digitalocean": func() (challenge.Provider, error) { return digitalocean.NewDNSProvider() },
	"duckdns":      func() (challenge.Provider, error) { return duckdns.NewDNSProvider() },
	"exec":         func() (challenge.Provider, error) { return exec.NewDNSProvider() },
	"hetzner":      func() (challenge.Provider, error) { return hetzner.NewDNSProvider() },
	"httpreq":      func() (challenge.Provider, error) { return httpreq.NewDNSProvider() },
}

// dnsProvider builds acme.dns's provider from its usual environment
// variables (e.g. CLOUDFLARE_DNS_API_TOKEN).
func dnsProvider(name string) (challenge.Provider, error) {
	if name == "" {
		return nil, nil
	}
	mk, ok := dnsProviders[name]
	if !ok {
		return nil, fmt.Errorf("acme.dns %q is not built in (built in: cloudflare, desec, digitalocean, duckdns, exec, hetzner, httpreq; exec and httpreq reach any DNS host)", name)
	}
	p, err := mk()
	if err != nil {
		return nil, fmt.Errorf("acme.dns %s: %w (set the provider's environment variables, see the lego documentation)", name, err)
	}
	return p, nil
}
