package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/relay-gw/relay/acme"
)

func init() {
	register("certs", "certs list|renew [-c FILE] [NAME]", cmdCerts)
}

func cmdCerts(e *env, args []string) error {
	fs, cfgPath := newConfigFlagSet(e, "certs")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 || (pos[0] != "list" && pos[0] != "renew") {
		return errUsage
	}
	cfg, err := loadConfig(e, *cfgPath)
	if err != nil {
		return err
	}
	infos, err := acme.ListStored(cfg.StateDir)
	if err != nil {
		return err
	}
	switch pos[0] {
	case "list":
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tISSUER\tNOT AFTER\tNEXT RENEWAL\tLAST ERROR")
		if b, err := os.ReadFile(filepath.Join(cfg.StateDir, "ca", acme.RootCertFile)); err == nil {
			if blk, _ := pem.Decode(b); blk != nil {
				if c, err := x509.ParseCertificate(blk.Bytes); err == nil {
					fmt.Fprintf(tw, "(internal CA root)\t%s\t%s\t-\t\n", c.Subject.CommonName, c.NotAfter.Format(time.DateOnly))
				}
			}
		}
		for _, i := range infos {
			na, nr := "-", "-"
			if !i.NotAfter.IsZero() {
				na = i.NotAfter.Format(time.RFC3339)
			}
			if !i.NextRenewal.IsZero() {
				nr = i.NextRenewal.Format(time.RFC3339)
			}
			last := i.LastError
			if len(last) > 120 {
				last = last[:117] + "..."
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", i.Name, i.Issuer, na, nr, last)
		}
		return tw.Flush()
	default: // renew
		names := pos[1:]
		if len(names) == 0 {
			names = acmeNames(cfg)
		}
		for _, n := range names {
			if err := acme.RequestRenewal(cfg.StateDir, n); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%s: renewal requested; the running relay orders it within a minute (see `relayctl certs list` and its log)\n", n)
		}
		return nil
	}
}
