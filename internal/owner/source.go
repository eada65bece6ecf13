package owner

import (
	"context"
	"errors"
)

// Source is one stream of owner observations.
type Source interface {
	// Name identifies the source in logs.
	Name() string
	// Run observes until ctx ends or the source runs out, calling emit for each sample. It
	// fills only the fields it observes and says so in Sample.Has. Calls to emit come from
	// one goroutine at a time. Run returns nil when ctx ends or a finite source is done, and
	// an error wrapping ErrUnavailable when the node lacks what the source reads.
	Run(ctx context.Context, emit func(Sample)) error
}

// ErrUnavailable means the node lacks what a source needs: no /dev/input, no system bus, no
// logind. That is a fact about the node rather than a failure, and a Sampler carries on
// without the source.
var ErrUnavailable = errors.New("not available on this node")
