package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// defaultPath is the PATH a command gets when its environment has none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// reaper starts processes and collects every exited child, as PID 1 must:
// orphans that the kernel re-parents to us are reaped and forgotten, the
// processes we started have their status delivered on their channel. One
// wait4(-1) loop serves both, so no other code may wait for children.
type reaper struct {
	mu      sync.Mutex // held while starting a process and while reaping
	waiters map[int]chan unix.WaitStatus
	sigchld chan os.Signal
}

// newReaper subscribes to SIGCHLD at once, so no exit is missed.
func newReaper() *reaper {
	r := &reaper{
		waiters: make(map[int]chan unix.WaitStatus),
		sigchld: make(chan os.Signal, 1),
	}
	signal.Notify(r.sigchld, unix.SIGCHLD)
	return r
}

// run reaps children until ctx ends.
func (r *reaper) run(ctx context.Context) {
	for {
		r.reap()
		select {
		case <-ctx.Done():
			return
		case <-r.sigchld:
		}
	}
}

func (r *reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if ws.Stopped() || ws.Continued() {
			continue
		}
		if ch, ok := r.waiters[pid]; ok {
			ch <- ws
			delete(r.waiters, pid)
		}
	}
}

// startError is a process that could not start, with the exit code a shell
// would give: 127 when the command is not found, 126 otherwise.
type startError struct {
	code int
	err  error
}

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// start resolves argv[0] on env's PATH (relative to dir) and starts it with
// files as its descriptors 0, 1, 2. The returned channel delivers its status
// once. A failure to start is a *startError.
func (r *reaper) start(argv, env []string, dir string, files []uintptr, sys *syscall.SysProcAttr) (int, <-chan unix.WaitStatus, error) {
	if len(argv) == 0 || argv[0] == "" {
		return 0, nil, &startError{code: 127, err: errors.New("empty command")}
	}
	if st, err := os.Stat(dir); err != nil {
		return 0, nil, &startError{code: 126, err: fmt.Errorf("working directory: %w", err)}
	} else if !st.IsDir() {
		return 0, nil, &startError{code: 126, err: fmt.Errorf("working directory %s is not a directory", dir)}
	}
	prog, err := lookPath(argv[0], envValue(env, "PATH"), dir)
	if err != nil {
		return 0, nil, err
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := syscall.ForkExec(prog, argv, &syscall.ProcAttr{Dir: dir, Env: env, Files: files, Sys: sys})
	if err != nil {
		return 0, nil, &startError{code: 126, err: fmt.Errorf("%s: %w", argv[0], err)}
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[pid] = ch
	return pid, ch, nil
}

// lookPath finds the program to run like a shell does: a name with a slash
// is a path (relative to dir), anything else is looked up on pathEnv.
func lookPath(name, pathEnv, dir string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		st, err := os.Stat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return "", &startError{code: 127, err: fmt.Errorf("%s: no such file or directory", name)}
		case err != nil:
			return "", &startError{code: 126, err: fmt.Errorf("%s: %w", name, err)}
		case st.IsDir():
			return "", &startError{code: 126, err: fmt.Errorf("%s: is a directory", name)}
		case st.Mode().Perm()&0o111 == 0:
			return "", &startError{code: 126, err: fmt.Errorf("%s: permission denied", name)}
		}
		return p, nil
	}
	if pathEnv == "" {
		pathEnv = defaultPath
	}
	var notExec string
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		p := filepath.Join(d, name)
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		st, err := os.Stat(p)
		if err != nil || st.IsDir() {
			continue
		}
		if st.Mode().Perm()&0o111 == 0 {
			if notExec == "" {
				notExec = p
			}
			continue
		}
		return p, nil
	}
	if notExec != "" {
		return "", &startError{code: 126, err: fmt.Errorf("%s: permission denied", notExec)}
	}
	return "", &startError{code: 127, err: fmt.Errorf("%s: command not found", name)}
}

// envValue is the value of key in a KEY=VALUE list; the last one wins.
func envValue(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val
		}
	}
	return v
}

// withDefaultPath returns env with PATH added when it has none.
func withDefaultPath(env []string) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, "PATH=") {
			return env
		}
	}
	return append(append([]string(nil), env...), "PATH="+defaultPath)
}

// exitStatus converts a wait status into an exit code and signal, the code
// being 128+signal for a killed process.
func exitStatus(ws unix.WaitStatus) (code, sig int) {
	if ws.Signaled() {
		return 128 + int(ws.Signal()), int(ws.Signal())
	}
	return ws.ExitStatus(), 0
}
