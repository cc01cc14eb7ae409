// Package config is relay.yaml: types (config.go), loading with unknown
// keys rejected and every error as "FILE:LINE: what; fix" (load.go), and
// defaults and validation of meaning (validate.go). It checks syntax and
// meaning only; whether interfaces, users or state_dir exist on this
// machine is for `rules apply` and `serve` to check.
//
//	cfg, err := config.Load(config.ResolvePath(flagC, os.Getenv))
//	if err != nil { fmt.Fprintln(os.Stderr, err); os.Exit(1) }
package config
