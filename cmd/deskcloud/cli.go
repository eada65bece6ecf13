package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// command is one node of the command tree: either it runs, or it holds subcommands.
// Adding a command is adding an entry to commands (or to a parent's subs) and a file with
// its run function.
type command struct {
	name     string
	synopsis string
	run      func(ctx context.Context, args []string, stdout, stderr io.Writer) error
	subs     []*command
}

// commands is the command tree below `deskcloud`.
var commands = []*command{
	{
		name:     "predict",
		synopsis: "forecast when desktops' owners return",
		subs: []*command{
			{name: "eval", synopsis: "score the forecast on a trace against baselines", run: runPredictEval},
		},
	},
	{name: "simulate", synopsis: "replay a trace of owners through the harvest policies", run: runSimulate},
}

// errUsage marks an error that is the user's: it is printed with usage, exit status 2.
var errUsage = errors.New("usage")

// usageError wraps a message as a usage error.
func usageError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

// run dispatches args to a command and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	path := []string{"deskcloud"}
	level := commands
	for {
		if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
			out := stdout
			status := 0
			if len(args) == 0 {
				out, status = stderr, 2
			}
			writeCommands(out, path, level)
			return status
		}
		var next *command
		for _, c := range level {
			if c.name == args[0] {
				next = c
			}
		}
		if next == nil {
			fmt.Fprintf(stderr, "%s: unknown command %q\n", strings.Join(path, " "), args[0])
			writeCommands(stderr, path, level)
			return 2
		}
		path = append(path, next.name)
		args = args[1:]
		if next.run == nil {
			level = next.subs
			continue
		}
		err := next.run(ctx, args, stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "%s: %v\nrun `%s -h` for its flags\n", strings.Join(path, " "), err, strings.Join(path, " "))
			return 2
		default:
			fmt.Fprintf(stderr, "%s: %v\n", strings.Join(path, " "), err)
			return 1
		}
	}
}

func writeCommands(w io.Writer, path []string, level []*command) {
	fmt.Fprintf(w, "usage: %s <command> [flags]\n\ncommands:\n", strings.Join(path, " "))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, c := range level {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.synopsis)
	}
	_ = tw.Flush()
}

// newFlagSet returns a flag set for a command; usage is the command line's synopsis.
func newFlagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s\n\nflags:\n", usage)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args. On -h it prints the flags to stdout; a parse failure becomes a
// usage error.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return err
		}
		return usageError("%v", err)
	}
	if fs.NArg() > 0 {
		return usageError("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// listFlag collects a flag given several times or with comma-separated values.
type listFlag []string

// String returns the values comma-separated.
func (l *listFlag) String() string { return strings.Join(*l, ",") }

// Set adds the comma-separated values of one use of the flag.
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}
