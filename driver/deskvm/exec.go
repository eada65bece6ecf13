package deskvm

import (
	"bytes"
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/deskcloud/deskcloud/driver/guestctl"
	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"
)

var _ drivers.ExecTaskStreamingDriver = (*Driver)(nil)

// ExecTask runs a command inside the task's guest and collects its output (used for script
// checks).
func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	g, err := h.execGuest()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(d.ctx, timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code, err := g.Exec(ctx, guestctl.ExecRequest{Command: cmd, Env: h.taskConfig.EnvList()},
		guestctl.ExecIO{Stdin: bytes.NewReader(nil), Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return nil, fmt.Errorf("exec in vm %s: %w", h.spec.Name, err)
	}
	return &drivers.ExecTaskResult{
		Stdout:     stdout.Bytes(),
		Stderr:     stderr.Bytes(),
		ExitResult: &drivers.ExitResult{ExitCode: code},
	}, nil
}

// ExecTaskStreaming runs an interactive command inside the task's guest, as `nomad alloc
// exec` does.
func (d *Driver) ExecTaskStreaming(ctx context.Context, taskID string, opts *drivers.ExecOptions) (*drivers.ExitResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	g, err := h.execGuest()
	if err != nil {
		return nil, err
	}
	var resize chan guestctl.TermSize
	if opts.ResizeCh != nil {
		resize = make(chan guestctl.TermSize, 1)
		go func() {
			defer close(resize)
			for {
				select {
				case <-ctx.Done():
					return
				case s, ok := <-opts.ResizeCh:
					if !ok {
						return
					}
					select {
					case resize <- guestctl.TermSize{Rows: uint16(s.Height), Cols: uint16(s.Width)}:
					case <-ctx.Done():
						return
					}
				}
			}
		}()
	}
	code, err := g.Exec(ctx, guestctl.ExecRequest{Command: opts.Command, Env: h.taskConfig.EnvList(), TTY: opts.Tty},
		guestctl.ExecIO{Stdin: opts.Stdin, Stdout: opts.Stdout, Stderr: opts.Stderr, Resize: resize})
	if err != nil {
		return nil, fmt.Errorf("exec in vm %s: %w", h.spec.Name, err)
	}
	return &drivers.ExitResult{ExitCode: code}, nil
}

func (h *taskHandle) execGuest() (Guest, error) {
	if h.mode != modeCommand {
		return nil, fmt.Errorf("exec reaches only command-mode tasks; vm %s boots an image", h.spec.Name)
	}
	if !h.isRunning() {
		return nil, fmt.Errorf("vm %s is not running", h.spec.Name)
	}
	if h.isWaiting() {
		return nil, errWaitingOnDisk
	}
	g := h.currentGuest()
	if g == nil {
		return nil, fmt.Errorf("vm %s: guest agent not connected", h.spec.Name)
	}
	return g, nil
}

// parseSignal turns a signal name such as "SIGTERM" or "TERM" into a signal.
func parseSignal(name string) (syscall.Signal, error) {
	if s := unix.SignalNum(name); s != 0 {
		return s, nil
	}
	if s := unix.SignalNum("SIG" + name); s != 0 {
		return s, nil
	}
	return 0, fmt.Errorf("unknown signal %q", name)
}
