// Command relayctl runs and manages relay: `serve` (unprivileged), `rules`
// (root: steering), `check`, `stats`, `certs`, `version`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// version is set by the Makefile with -ldflags "-X main.version=...".
var version = "dev"

// env is what a command may touch, injected so commands are testable in-process.
type env struct {
	ctx    context.Context
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

type command struct {
	run   func(e *env, args []string) error
	usage string
}

// errUsage makes main print the command's usage and exit 2.
var errUsage = errors.New("usage")

// exitError carries an exit status without further printing (the command
// printed its own diagnostics).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

var commands = map[string]command{}

func register(name, usage string, run func(e *env, args []string) error) {
	commands[name] = command{run: run, usage: usage}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	e := &env{ctx: ctx, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	os.Exit(run(e, os.Args[1:]))
}

func run(e *env, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printUsage(e.stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(e.stderr, "relayctl: unknown command %q\n\n", args[0])
		printUsage(e.stderr)
		return 2
	}
	err := cmd.run(e, args[1:])
	var ee exitError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(e.stderr, "usage: relayctl %s\n", cmd.usage)
		return 2
	case errors.As(err, &ee):
		return ee.code
	default:
		fmt.Fprintf(e.stderr, "relayctl %s: %v\n", args[0], err)
		return 1
	}
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "relayctl: transparent TLS relay for Linux gateways")
	fmt.Fprintln(w, "\nusage:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  relayctl %s\n", commands[n].usage)
	}
	fmt.Fprintln(w, "\n-c defaults to $RELAY_CONFIG, then /etc/relay/relay.yaml.")
}

// newFlagSet returns a FlagSet that reports errors to e.stderr and does not exit.
func newFlagSet(e *env, name string) *flag.FlagSet {
	fs := flag.NewFlagSet("relayctl "+name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	return fs
}

func init() {
	register("version", "version", func(e *env, args []string) error {
		fmt.Fprintf(e.stdout, "relayctl %s\n", version)
		return nil
	})
}

// newConfigFlagSet is newFlagSet with the -c flag every config-reading
// command takes.
func newConfigFlagSet(e *env, name string) (*flag.FlagSet, *string) {
	fs := newFlagSet(e, name)
	return fs, fs.String("c", "", "config file (default $RELAY_CONFIG, then /etc/relay/relay.yaml)")
}

// parseInterspersed parses flags that may come before or after positional
// arguments (`rules apply -c F` and `rules -c F apply` both work) and
// returns the positionals.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
