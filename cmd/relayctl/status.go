package main

import (
	"time"

	"github.com/relay-gw/relay/acme"
	"github.com/relay-gw/relay/relay"
)

// statusHook completes the relay's /status document with what only the
// CLI knows: the version, the ACME renewal state stored in state_dir and
// the steering watcher's detail per part.
func statusHook(certs *certSources, steeringState string) func(*relay.Status) {
	return func(st *relay.Status) {
		st.Version = version
		certs.mu.Lock()
		dir := certs.stateDir
		certs.mu.Unlock()
		if infos, err := acme.ListStored(dir); err == nil {
			byName := map[string]acme.CertInfo{}
			for _, i := range infos {
				byName[i.Name] = i
			}
			for k := range st.Certificates {
				c := &st.Certificates[k]
				i, ok := byName[c.Name]
				if !ok {
					continue
				}
				if !i.NextRenewal.IsZero() {
					t := i.NextRenewal.UTC()
					c.NextRenewal = &t
				}
				c.LastError, c.NextAttempt = i.LastError, i.NextAttempt
			}
		}
		ws, why := loadSteerHealth(steeringState, time.Now())
		for k := range st.Steering.Parts {
			p := &st.Steering.Parts[k]
			switch {
			case why != "":
				p.State, p.Error = "unknown", why
			case ws.Parts[p.Name] != nil:
				ps := ws.Parts[p.Name]
				p.State, p.Error, p.LastDrift = ps.State, ps.Error, ps.LastDrift
			}
		}
	}
}
