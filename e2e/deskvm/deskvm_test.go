// Package deskvm_test runs the jobs in jobs/ on a real Nomad agent with the deskvm plugin and
// real QEMU, and checks what a Nomad user would see.
package deskvm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/deskcloud/deskcloud/e2e/cluster"
	"github.com/hashicorp/nomad/api"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/shoenig/test/must"
)

var (
	agentOnce sync.Once
	agentMu   sync.Mutex // serialises tests that restart the agent or its plugin
	theAgent  *cluster.Agent
	agentErr  error
	skipWhy   string
)

// agent returns the shared Nomad agent, starting it on first use, or skips the test with the
// reason the machine cannot run it.
func agent(t *testing.T) *cluster.Agent {
	t.Helper()
	agentOnce.Do(func() {
		root, err := cluster.RepoRoot()
		if err != nil {
			agentErr = err
			return
		}
		for _, need := range []string{".deps/bin/nomad", "bin/plugins/nomad-driver-deskvm", ".deps/guest/vmlinuz", ".deps/guest/initramfs.cpio.gz"} {
			if _, err := os.Stat(filepath.Join(root, need)); err != nil {
				skipWhy = "e2e needs " + need + " (make deps build): " + err.Error()
				return
			}
		}
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			skipWhy = "e2e needs qemu-system-x86_64 (make deps): " + err.Error()
			return
		}
		if os.Geteuid() != 0 {
			skipWhy = "e2e runs a Nomad client, which needs root"
			return
		}
		dir, err := os.MkdirTemp("", "deskcloud-e2e-")
		if err != nil {
			agentErr = err
			return
		}
		state, err := os.MkdirTemp("/tmp", "dvm-e2e")
		if err != nil {
			agentErr = err
			return
		}
		// Yield is off on the shared agent: tests of other features must not depend on what
		// else this machine runs. The owner is still sensed, for the node's attributes.
		// yield_test.go runs an agent of its own with yield on.
		o, err := cluster.Defaults(cluster.Options{Name: "deskcloud-e2e", Dir: dir, StateDir: state, StopWithParent: true,
			DeskvmConfig: fmt.Sprintf("    yield {\n      enabled = false\n    }\n    owner {\n      sources        = [\"proc\"]\n      forecast_state = %q\n    }",
				filepath.Join(dir, "forecast.model"))})
		if err != nil {
			agentErr = err
			return
		}
		theAgent, agentErr = cluster.Start(o)
		if agentErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		agentErr = theAgent.WaitReady(ctx)
	})
	if skipWhy != "" {
		t.Skip(skipWhy)
	}
	must.NoError(t, agentErr)
	return theAgent
}

func TestMain(m *testing.M) {
	code := m.Run()
	if theAgent != nil {
		// Stop what the tests left, then the agent; keep its dir when something failed.
		jobs, _, _ := theAgent.Client.Jobs().List(nil)
		for _, j := range jobs {
			_, _, _ = theAgent.Client.Jobs().Deregister(j.ID, true, nil)
		}
		time.Sleep(2 * time.Second)
		_ = theAgent.Stop(30 * time.Second)
		if code == 0 {
			unmountUnder(theAgent.Options().Dir)
			os.RemoveAll(theAgent.Options().Dir)
			os.RemoveAll(theAgent.Options().StateDir)
		} else {
			println("e2e: nomad agent dir kept at", theAgent.Options().Dir)
		}
	}
	os.Exit(code)
}

func repoPath(t *testing.T, rel string) string {
	root, err := cluster.RepoRoot()
	must.NoError(t, err)
	return filepath.Join(root, rel)
}

// runJob registers a jobs/ file under a unique id and deregisters it when the test ends.
func runJob(t *testing.T, a *cluster.Agent, file string, mutate func(*api.Job)) *api.Job {
	t.Helper()
	job, err := a.RunJobFile(repoPath(t, file), func(j *api.Job) {
		id := *j.ID + "-" + uuid.Short()
		j.ID, j.Name = &id, &id
		if mutate != nil {
			mutate(j)
		}
	})
	must.NoError(t, err)
	t.Cleanup(func() { _, _, _ = a.Client.Jobs().Deregister(*job.ID, true, nil) })
	return job
}

func waitAlloc(t *testing.T, a *cluster.Agent, job *api.Job, what string, timeout time.Duration, cond func(*api.Allocation) bool) *api.Allocation {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	alloc, err := a.WaitAlloc(ctx, *job.ID, what, cond)
	must.NoError(t, err)
	return alloc
}

func setCommand(command string, args ...string) func(*api.Job) {
	return func(j *api.Job) {
		j.TaskGroups[0].Tasks[0].Config["command"] = command
		j.TaskGroups[0].Tasks[0].Config["args"] = args
	}
}

func TestFingerprint(t *testing.T) {
	a := agent(t)
	id, err := a.NodeID()
	must.NoError(t, err)
	node, _, err := a.Client.Nodes().Info(id, nil)
	must.NoError(t, err)
	accel := node.Attributes["driver.deskvm.accelerator"]
	must.True(t, accel == "kvm" || accel == "tcg", must.Sprintf("accelerator must be kvm or tcg, got %q", accel))
	must.NotEq(t, "", node.Attributes["driver.deskvm.qemu_version"])
	must.NotEq(t, "", node.Attributes["driver.deskvm.version"])
	t.Logf("deskvm fingerprint: accelerator=%s qemu=%s", accel, node.Attributes["driver.deskvm.qemu_version"])

	// The owner's state and forecast, coarse: the shared agent senses this machine's CPU.
	deadline := time.Now().Add(90 * time.Second)
	for node.Attributes["driver.deskvm.owner.state"] == "" || node.Attributes["driver.deskvm.forecast.return_15m"] == "" {
		if time.Now().After(deadline) {
			t.Fatalf("no owner or forecast attributes within 90s; attributes: %v", node.Attributes)
		}
		time.Sleep(time.Second)
		node, _, err = a.Client.Nodes().Info(id, nil)
		must.NoError(t, err)
	}
	state := node.Attributes["driver.deskvm.owner.state"]
	must.True(t, state == "away" || state == "idle" || state == "active", must.Sprintf("owner.state must be away, idle or active, got %q", state))
	p, err := strconv.ParseFloat(node.Attributes["driver.deskvm.forecast.return_15m"], 64)
	must.NoError(t, err)
	must.True(t, p >= 0 && p <= 1, must.Sprintf("forecast.return_15m must be a probability, got %v", p))
	_, err = strconv.Atoi(node.Attributes["driver.deskvm.harvestable.cpu"])
	must.NoError(t, err, must.Sprint("harvestable.cpu must be a whole number of cores"))
	for k, v := range node.Attributes {
		if strings.HasPrefix(k, "driver.deskvm.owner.") || strings.HasPrefix(k, "driver.deskvm.forecast.") || strings.HasPrefix(k, "driver.deskvm.harvestable.") {
			t.Logf("%s = %s", k, v)
		}
	}
}

func TestHelloJob(t *testing.T) {
	a := agent(t)
	job := runJob(t, a, "jobs/hello.nomad.hcl", nil)
	alloc := waitAlloc(t, a, job, "completion", 3*time.Minute, cluster.Terminal)
	must.Eq(t, api.AllocClientStatusComplete, alloc.ClientStatus, must.Sprintf("events: %q", cluster.Events(alloc, "pi")))
	out, err := a.Logs(alloc, "pi", "stdout")
	must.NoError(t, err)
	must.StrContains(t, out, "pi is about 3.1415")
	must.StrContains(t, out, "task dir is /local, alloc "+alloc.ID)
	must.StrContains(t, out, "1 vCPU(s)")
}

func TestExitCodeFailsTask(t *testing.T) {
	a := agent(t)
	job := runJob(t, a, "jobs/hello.nomad.hcl", setCommand("/bin/sh", "-c", "echo failing >&2; exit 3"))
	alloc := waitAlloc(t, a, job, "failure", 3*time.Minute, cluster.Terminal)
	must.Eq(t, api.AllocClientStatusFailed, alloc.ClientStatus)
	events := strings.Join(cluster.Events(alloc, "pi"), "\n")
	must.StrContains(t, events, "Exit Code: 3")
	errOut, err := a.Logs(alloc, "pi", "stderr")
	must.NoError(t, err)
	must.StrContains(t, errOut, "failing")
}

func TestExecSignalStatsAndStop(t *testing.T) {
	a := agent(t)
	job := runJob(t, a, "jobs/hello.nomad.hcl", func(j *api.Job) {
		setCommand("/bin/sh", "-c", `trap 'echo got-usr1' USR1; trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.2; done`)(j)
		kt := 20 * time.Second
		j.TaskGroups[0].Tasks[0].KillTimeout = &kt
	})
	alloc := waitAlloc(t, a, job, "the task to run", 3*time.Minute, cluster.Running("pi"))
	waitLog(t, a, alloc, "ready", time.Minute)

	// nomad alloc exec
	var stdout, stderr bytes.Buffer
	code, err := a.Client.Allocations().Exec(t.Context(), alloc, "pi", false,
		[]string{"/bin/sh", "-c", "echo inside $(hostname) $NOMAD_ALLOC_ID"}, strings.NewReader(""), &stdout, &stderr, nil, nil)
	must.NoError(t, err)
	must.Eq(t, 0, code, must.Sprintf("stderr: %s", stderr.String()))
	must.StrContains(t, stdout.String(), "inside deskvm-"+alloc.ID[:8]+" "+alloc.ID)

	// nomad alloc signal
	must.NoError(t, a.Client.Allocations().Signal(alloc, nil, "pi", "SIGUSR1"))
	waitLog(t, a, alloc, "got-usr1", 30*time.Second)

	// nomad alloc status -stats: the VM's QEMU process, once the first sample is in.
	var rss uint64
	deadline := time.Now().Add(30 * time.Second)
	for rss == 0 && time.Now().Before(deadline) {
		usage, err := a.Client.Allocations().Stats(alloc, nil)
		if err == nil && usage.Tasks["pi"] != nil && usage.Tasks["pi"].ResourceUsage != nil && usage.Tasks["pi"].ResourceUsage.MemoryStats != nil {
			rss = usage.Tasks["pi"].ResourceUsage.MemoryStats.RSS
		}
		time.Sleep(200 * time.Millisecond)
	}
	must.Positive(t, rss, must.Sprint("the VM's memory must show in nomad alloc status -stats"))
	t.Logf("VM resident memory: %d MiB", rss>>20)

	// QEMU runs inside the task's cgroup.
	cg := qemuCgroups(t, alloc.ID)
	must.StrContains(t, cg, alloc.ID+".pi", must.Sprint("QEMU must run in the task's cgroup"))

	// nomad job stop: SIGTERM reaches the guest command, which exits 0.
	_, _, err = a.Client.Jobs().Deregister(*job.ID, false, nil)
	must.NoError(t, err)
	alloc = waitAlloc(t, a, job, "the task to stop", 2*time.Minute, cluster.Terminal)
	waitLog(t, a, alloc, "got-term", 30*time.Second)
}

// qemuCgroups returns /proc/PID/cgroup of the QEMU process serving allocID's task.
func qemuCgroups(t *testing.T, allocID string) string {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	must.NoError(t, err)
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte("qemu-system")) {
			continue
		}
		cg, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		if err == nil && bytes.Contains(cg, []byte(allocID)) {
			return string(cg)
		}
	}
	t.Fatalf("no QEMU process is in a cgroup of allocation %s", allocID)
	return ""
}

func waitLog(t *testing.T, a *cluster.Agent, alloc *api.Allocation, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var out string
	for time.Now().Before(deadline) {
		out, _ = a.Logs(alloc, "pi", "stdout")
		if strings.Contains(out, want) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("stdout never showed %q within %s; it has: %q", want, timeout, out)
}

// recoveryJob runs a job that counts to 30 over about 15 seconds and then prints the total.
func recoveryJob(t *testing.T, a *cluster.Agent) (*api.Job, *api.Allocation) {
	job := runJob(t, a, "jobs/hello.nomad.hcl", setCommand("/bin/sh", "-c",
		`i=0; s=0; while [ $i -lt 30 ]; do i=$((i+1)); s=$((s+i)); echo "step $i"; sleep 0.5; done; echo "total $s"`))
	alloc := waitAlloc(t, a, job, "the task to run", 3*time.Minute, cluster.Running("pi"))
	waitLog(t, a, alloc, "step 2", time.Minute)
	return job, alloc
}

func assertRecovered(t *testing.T, a *cluster.Agent, job *api.Job) {
	alloc := waitAlloc(t, a, job, "completion", 3*time.Minute, cluster.Terminal)
	must.Eq(t, api.AllocClientStatusComplete, alloc.ClientStatus, must.Sprintf("events: %q", cluster.Events(alloc, "pi")))
	must.Eq(t, uint64(0), alloc.TaskStates["pi"].Restarts, must.Sprint("the task must not have restarted"))
	out, err := a.Logs(alloc, "pi", "stdout")
	must.NoError(t, err)
	must.StrContains(t, out, "total 465")
	must.Eq(t, 1, strings.Count(out, "step 1\n"), must.Sprint("the command must have run once"))
}

func TestRecoverAfterPluginKill(t *testing.T) {
	a := agent(t)
	agentMu.Lock()
	defer agentMu.Unlock()
	job, _ := recoveryJob(t, a)
	pids, err := a.PluginPIDs()
	must.NoError(t, err)
	must.SliceNotEmpty(t, pids)
	for _, pid := range pids {
		must.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	}
	t.Logf("killed deskvm plugin pids %v", pids)
	assertRecovered(t, a, job)
}

func TestRecoverAfterAgentRestart(t *testing.T) {
	a := agent(t)
	agentMu.Lock()
	defer agentMu.Unlock()
	job, _ := recoveryJob(t, a)
	must.NoError(t, a.Stop(30*time.Second))
	restarted, err := cluster.Start(a.Options())
	must.NoError(t, err)
	*a = *restarted
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	must.NoError(t, a.WaitReady(ctx))
	assertRecovered(t, a, job)
}

// TestPortForward serves HTTP from inside the guest on a Nomad-assigned host port.
func TestPortForward(t *testing.T) {
	a := agent(t)
	job := runJob(t, a, "jobs/hello.nomad.hcl", func(j *api.Job) {
		tg := j.TaskGroups[0]
		tg.Networks = []*api.NetworkResource{{DynamicPorts: []api.Port{{Label: "http", To: 8080}}}}
		task := tg.Tasks[0]
		task.Config["command"] = "/bin/sh"
		task.Config["args"] = []string{"-c", `mkdir -p /tmp/www && echo "served from $(hostname)" > /tmp/www/index.html && echo ready && exec httpd -f -p 8080 -h /tmp/www`}
		task.Config["network"] = "user"
		task.Config["ports"] = []string{"http"}
	})
	alloc := waitAlloc(t, a, job, "the task to run", 3*time.Minute, cluster.Running("pi"))
	waitLog(t, a, alloc, "ready", time.Minute)
	var port int
	for _, p := range alloc.AllocatedResources.Shared.Ports {
		if p.Label == "http" {
			port = p.Value
		}
	}
	must.Positive(t, port, must.Sprint("the http port must be allocated"))
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/"
	var body string
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = string(b)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	must.StrContains(t, body, "served from deskvm-"+alloc.ID[:8], must.Sprintf("GET %s", url))
}

func TestImageJob(t *testing.T) {
	a := agent(t)
	image := repoPath(t, ".deps/guest/test-image.qcow2")
	if _, err := os.Stat(image); err != nil {
		t.Skipf("image mode needs the test image (make deps builds it): %v", err)
	}
	before := fileSum(t, image)
	src, err := os.ReadFile(repoPath(t, "jobs/image.nomad.hcl"))
	must.NoError(t, err)
	job, err := a.Client.Jobs().ParseHCLOpts(&api.JobsParseRequest{
		JobHCL:       string(src),
		Variables:    `image = "` + image + `"`,
		Canonicalize: true,
	})
	must.NoError(t, err)
	id := "image-" + uuid.Short()
	job.ID, job.Name = &id, &id
	_, _, err = a.Client.Jobs().Register(job, nil)
	must.NoError(t, err)
	t.Cleanup(func() { _, _, _ = a.Client.Jobs().Deregister(id, true, nil) })

	alloc := waitAlloc(t, a, job, "completion", 3*time.Minute, cluster.Terminal)
	must.Eq(t, api.AllocClientStatusComplete, alloc.ClientStatus, must.Sprintf("events: %q", cluster.Events(alloc, "vm")))
	r, err := a.Client.AllocFS().Cat(alloc, "alloc/logs/vm.stdout.0", nil)
	must.NoError(t, err)
	var out bytes.Buffer
	_, _ = out.ReadFrom(r)
	r.Close()
	must.StrContains(t, out.String(), "hello from user-data")
	must.Eq(t, before, fileSum(t, image), must.Sprint("the base image must never be written"))
}

func fileSum(t *testing.T, path string) [32]byte {
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	return sha256.Sum256(b)
}
