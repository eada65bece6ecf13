// Package cluster starts a real single-machine Nomad agent (server and client) with the
// deskvm plugin, for the e2e tests and for `make dev`.
package cluster

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/hashicorp/nomad/api"
)

//go:embed agent.hcl.tmpl
var agentTemplate string

// Options configures an agent.
type Options struct {
	Name       string
	Dir        string // the agent's own dir: config, data, log
	PluginDir  string
	StateDir   string // deskvm's socket dir: keep it short
	ImagePaths []string
	HTTPPort   int
	RPCPort    int
	SerfPort   int
	LogLevel   string
	NomadBin   string
	// DeskvmConfig is HCL added to the deskvm plugin's config block, such as a yield or owner
	// block.
	DeskvmConfig string
	// Servers, when set, makes the agent a client only, joining these servers' RPC
	// addresses (host:port): a second node on the same machine.
	Servers []string
	// CgroupParent is the client's cgroup parent, so that two clients on one machine keep
	// their tasks' cgroups apart; empty means Nomad's default.
	CgroupParent string
	// StopWithParent stops the agent (SIGINT) when the process that started it dies, even by
	// a panic that skips cleanup: for tests. make dev leaves it unset so the agent outlives it.
	StopWithParent bool
}

// Agent is a running Nomad agent.
type Agent struct {
	opts   Options
	pid    int
	Client *api.Client
}

// RepoRoot finds the repository root by walking up from the working directory to go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Defaults fills the options a caller left empty, from the repository layout.
func Defaults(o Options) (Options, error) {
	root, err := RepoRoot()
	if err != nil {
		return o, err
	}
	if o.Name == "" {
		o.Name = "deskcloud"
	}
	if o.PluginDir == "" {
		o.PluginDir = filepath.Join(root, "bin", "plugins")
	}
	if o.NomadBin == "" {
		o.NomadBin = filepath.Join(root, ".deps", "bin", "nomad")
	}
	if o.ImagePaths == nil {
		o.ImagePaths = []string{filepath.Join(root, ".deps", "guest")}
	}
	if o.LogLevel == "" {
		o.LogLevel = "DEBUG"
	}
	if o.StateDir == "" {
		o.StateDir = "/run/deskvm"
	}
	if o.HTTPPort == 0 {
		ports, err := FreePorts(3)
		if err != nil {
			return o, err
		}
		o.HTTPPort, o.RPCPort, o.SerfPort = ports[0], ports[1], ports[2]
	}
	return o, nil
}

// FreePorts returns n TCP ports on 127.0.0.1 that were free a moment ago.
func FreePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// ConfigPath is the agent's rendered config file.
func (o Options) ConfigPath() string { return filepath.Join(o.Dir, "agent.hcl") }

// LogPath is the agent's log file.
func (o Options) LogPath() string { return filepath.Join(o.Dir, "nomad.log") }

// PIDPath is the agent's pid file.
func (o Options) PIDPath() string { return filepath.Join(o.Dir, "nomad.pid") }

// RPCAddress is the agent's RPC address, for a client that joins it (Servers).
func (o Options) RPCAddress() string { return "127.0.0.1:" + strconv.Itoa(o.RPCPort) }

// Address is the agent's HTTP address.
func (o Options) Address() string { return "http://127.0.0.1:" + strconv.Itoa(o.HTTPPort) }

// Render writes the agent config.
func (o Options) Render() error {
	tmpl, err := template.New("agent").Parse(agentTemplate)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	data := struct {
		Options
		DataDir string
	}{o, filepath.Join(o.Dir, "data")}
	if err := tmpl.Execute(&b, data); err != nil {
		return err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(o.ConfigPath(), b.Bytes(), 0o644)
}

// Start renders the config and starts the agent in its own session, so that it outlives the
// caller (make dev) and can be stopped by pid.
func Start(o Options) (*Agent, error) {
	if _, err := os.Stat(o.NomadBin); err != nil {
		return nil, fmt.Errorf("nomad binary: %w (run make deps)", err)
	}
	if _, err := os.Stat(filepath.Join(o.PluginDir, "nomad-driver-deskvm")); err != nil {
		return nil, fmt.Errorf("deskvm plugin: %w (run make build)", err)
	}
	if err := o.Render(); err != nil {
		return nil, fmt.Errorf("render agent config: %w", err)
	}
	logf, err := os.OpenFile(o.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(o.NomadBin, "agent", "-config", o.ConfigPath())
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if o.StopWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGINT
	}
	// The cloud fingerprinters are denied in the config; unsetting this too keeps older
	// Nomads from failing at start.
	cmd.Env = withoutEnv(os.Environ(), "AWS_CA_BUNDLE")
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start nomad: %w", err)
	}
	go func() { _ = cmd.Wait() }()
	if err := os.WriteFile(o.PIDPath(), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644); err != nil {
		return nil, err
	}
	return attach(o, cmd.Process.Pid)
}

// StartScratch starts an agent for a measurement: in temporary dirs (o.Dir and o.StateDir
// are made under /tmp), stopped with its caller, ready when it returns. stop stops the agent
// and removes the dirs.
func StartScratch(ctx context.Context, o Options) (a *Agent, stop func(), err error) {
	dir, err := os.MkdirTemp("", o.Name+"-")
	if err != nil {
		return nil, nil, err
	}
	// deskvm's sockets live under StateDir: a unix socket path has 108 bytes at most.
	state, err := os.MkdirTemp("/tmp", "dvm")
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	cleanup := func() { os.RemoveAll(state); os.RemoveAll(dir) }
	o.Dir, o.StateDir, o.StopWithParent = dir, state, true
	if o, err = Defaults(o); err != nil {
		cleanup()
		return nil, nil, err
	}
	if a, err = Start(o); err != nil {
		cleanup()
		return nil, nil, err
	}
	stop = func() { _ = a.Stop(30 * time.Second); cleanup() }
	if err := a.WaitReady(ctx); err != nil {
		stop()
		return nil, nil, err
	}
	return a, stop, nil
}

// Attach returns the agent recorded in o.Dir if it still runs.
func Attach(o Options) (*Agent, error) {
	b, err := os.ReadFile(o.PIDPath())
	if err != nil {
		return nil, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("pid file %s: %w", o.PIDPath(), err)
	}
	if syscall.Kill(pid, 0) != nil {
		return nil, fmt.Errorf("nomad pid %d is not running", pid)
	}
	return attach(o, pid)
}

func attach(o Options, pid int) (*Agent, error) {
	c, err := api.NewClient(&api.Config{Address: o.Address()})
	if err != nil {
		return nil, err
	}
	return &Agent{opts: o, pid: pid, Client: c}, nil
}

// PID is the agent's process id.
func (a *Agent) PID() int { return a.pid }

// Options returns the agent's options.
func (a *Agent) Options() Options { return a.opts }

// WaitReady waits until the cluster has a leader, the agent's own node is ready and its
// deskvm is healthy.
func (a *Agent) WaitReady(ctx context.Context) error {
	var last string
	for {
		ok, why := a.ready()
		if ok {
			return nil
		}
		last = why
		if syscall.Kill(a.pid, 0) != nil {
			return fmt.Errorf("nomad exited; see %s", a.opts.LogPath())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nomad not ready (%s): %w; see %s", last, ctx.Err(), a.opts.LogPath())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (a *Agent) ready() (bool, string) {
	if _, err := a.Client.Status().Leader(); err != nil {
		return false, "no leader: " + err.Error()
	}
	n, err := a.node()
	if err != nil {
		return false, err.Error()
	}
	if n.Status != "ready" {
		return false, "node " + n.Status
	}
	d, ok := n.Drivers["deskvm"]
	if !ok || !d.Healthy {
		desc := "not fingerprinted"
		if ok {
			desc = d.HealthDescription
		}
		return false, "deskvm: " + desc
	}
	return true, ""
}

// NodeID returns the agent's own client node's id.
func (a *Agent) NodeID() (string, error) {
	n, err := a.node()
	if err != nil {
		return "", err
	}
	return n.ID, nil
}

// node finds the agent's own client node among the cluster's: a node is named after the
// agent that runs it.
func (a *Agent) node() (*api.NodeListStub, error) {
	nodes, _, err := a.Client.Nodes().List(nil)
	if err != nil {
		return nil, err
	}
	for _, n := range nodes {
		if n.Name == a.opts.Name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("no client node named %s among %d", a.opts.Name, len(nodes))
}

// Stop stops the agent: SIGINT, then SIGKILL after timeout. VMs keep running.
func (a *Agent) Stop(timeout time.Duration) error {
	if err := syscall.Kill(a.pid, syscall.SIGINT); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		return err
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if syscall.Kill(a.pid, 0) != nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = syscall.Kill(a.pid, syscall.SIGKILL)
	return nil
}

// Healthy reports whether the HTTP API answers.
func (a *Agent) Healthy() bool {
	resp, err := http.Get(a.opts.Address() + "/v1/agent/health")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// PluginPIDs returns the pids of the deskvm plugin processes running from this agent's
// plugin dir.
func (a *Agent) PluginPIDs() ([]int, error) {
	want := filepath.Join(a.opts.PluginDir, "nomad-driver-deskvm")
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && (exe == want || strings.TrimSuffix(exe, " (deleted)") == want) {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

func withoutEnv(env []string, key string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, key+"=") {
			out = append(out, kv)
		}
	}
	return out
}
