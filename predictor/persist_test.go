package predictor_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/predictor"
	"github.com/deskcloud/deskcloud/predictor/internal/synth"
)

// trained returns a pool and a model that have learned a few weeks of a desktop, and the
// time of its last event.
func trained(t *testing.T) (*predictor.Pool, *predictor.Model, time.Time) {
	t.Helper()
	pool := predictor.NewPool()
	m := predictor.NewModel(pool, predictor.LearnFleet)
	evs := synth.Office(7, "desk007", monday, 5)
	for _, e := range evs {
		must.NoError(t, m.Observe(e.Time, e.State))
	}
	m.SetLearning(predictor.LearnDesktop)
	return pool, m, evs[len(evs)-1].Time
}

func TestModelFileRoundTrip(t *testing.T) {
	pool, m, last := trained(t)
	path := filepath.Join(t.TempDir(), "desk007.state")
	must.NoError(t, predictor.WriteModelFile(path, m))

	fi, err := os.Stat(path)
	must.NoError(t, err)
	must.LessEq(t, int64(1<<20), fi.Size(), must.Sprint("a model's state must stay under 1 MB"))

	got, err := predictor.ReadModelFile(path, pool, predictor.LearnDesktop)
	must.NoError(t, err)
	must.Eq(t, m.Samples(), got.Samples())

	// Both copies must behave identically from here on.
	steps := []struct {
		after time.Duration
		state predictor.State
	}{{30 * time.Minute, predictor.Available}, {3 * time.Hour, predictor.InUse}, {20 * time.Minute, predictor.Available}}
	at := last
	for _, s := range steps {
		at = at.Add(s.after)
		want, err := m.Forecast(at)
		must.NoError(t, err)
		have, err := got.Forecast(at)
		must.NoError(t, err)
		must.Eq(t, want, have)
		must.NoError(t, m.Observe(at, s.state))
		must.NoError(t, got.Observe(at, s.state))
	}
	must.Eq(t, m.Samples(), got.Samples())
}

func TestWriteModelFileIsAtomic(t *testing.T) {
	_, m, _ := trained(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "desk.state")
	for range 3 { // overwriting leaves one file and no temporary ones
		must.NoError(t, predictor.WriteModelFile(path, m))
	}
	entries, err := os.ReadDir(dir)
	must.NoError(t, err)
	must.SliceLen(t, 1, entries, must.Sprintf("want only the state file, got %v", entries))
}

func TestReadModelFileDropsTornFiles(t *testing.T) {
	pool, m, _ := trained(t)
	good := filepath.Join(t.TempDir(), "good.state")
	must.NoError(t, predictor.WriteModelFile(good, m))
	valid, err := os.ReadFile(good)
	must.NoError(t, err)
	poolFile := filepath.Join(t.TempDir(), "pool")
	must.NoError(t, predictor.WritePoolFile(poolFile, pool))
	poolBytes, err := os.ReadFile(poolFile)
	must.NoError(t, err)

	flip := func(i int) []byte {
		b := append([]byte(nil), valid...)
		b[i] ^= 0x40
		return b
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"cut in the header", valid[:6]},
		{"cut after the header", valid[:16]},
		{"cut in the middle", valid[:len(valid)/2]},
		{"last byte missing", valid[:len(valid)-1]},
		{"byte flipped in the payload", flip(len(valid) / 3)},
		{"byte flipped in the checksum", flip(len(valid) - 2)},
		{"length field changed", flip(9)},
		{"trailing garbage", append(append([]byte(nil), valid...), 0)},
		{"a pool file", poolBytes},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "desk.state")
			must.NoError(t, os.WriteFile(path, tc.data, 0o600))
			got, err := predictor.ReadModelFile(path, pool, predictor.LearnDesktop)
			must.Nil(t, got)
			must.True(t, errors.Is(err, predictor.ErrCorrupt), must.Sprintf("want ErrCorrupt, got %v", err))
			_, err = os.Stat(path)
			must.True(t, errors.Is(err, fs.ErrNotExist), must.Sprint("a torn file must be removed, never loaded later"))
		})
	}
}

// withVersion returns a copy of a state file with its version field set to v and its
// checksum made good again: what an older or newer release wrote, intact.
func withVersion(b []byte, v uint32) []byte {
	b = append([]byte(nil), b...)
	binary.LittleEndian.PutUint32(b[4:8], v)
	n := len(b) - 4
	binary.LittleEndian.PutUint32(b[n:], crc32.Checksum(b[:n], crc32.MakeTable(crc32.Castagnoli)))
	return b
}

func TestReadDropsOtherVersions(t *testing.T) {
	// A file another release wrote, intact, is not misread as this layout: it is dropped,
	// and the desktop starts afresh.
	pool, m, _ := trained(t)
	dir := t.TempDir()
	modelFile, poolFile := filepath.Join(dir, "model"), filepath.Join(dir, "pool")
	must.NoError(t, predictor.WriteModelFile(modelFile, m))
	must.NoError(t, predictor.WritePoolFile(poolFile, pool))
	read := map[string]func(path string) error{
		"model": func(path string) error {
			_, err := predictor.ReadModelFile(path, pool, predictor.LearnDesktop)
			return err
		},
		"pool": func(path string) error { _, err := predictor.ReadPoolFile(path); return err },
	}
	for kind, src := range map[string]string{"model": modelFile, "pool": poolFile} {
		valid, err := os.ReadFile(src)
		must.NoError(t, err)
		for _, v := range []uint32{1, 3} {
			t.Run(fmt.Sprintf("%s version %d", kind, v), func(t *testing.T) {
				path := filepath.Join(t.TempDir(), kind)
				must.NoError(t, os.WriteFile(path, withVersion(valid, v), 0o600))
				err := read[kind](path)
				must.True(t, errors.Is(err, predictor.ErrCorrupt), must.Sprintf("want ErrCorrupt, got %v", err))
				_, err = os.Stat(path)
				must.True(t, errors.Is(err, fs.ErrNotExist), must.Sprint("a file of another version must be removed"))
			})
		}
		t.Run(kind+" this version", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), kind)
			must.NoError(t, os.WriteFile(path, withVersion(valid, binary.LittleEndian.Uint32(valid[4:8])), 0o600))
			must.NoError(t, read[kind](path), must.Sprint("rewriting the same version must leave a readable file"))
		})
	}
}

func TestReadModelFileMissing(t *testing.T) {
	_, err := predictor.ReadModelFile(filepath.Join(t.TempDir(), "none"), predictor.NewPool(), predictor.LearnDesktop)
	must.True(t, errors.Is(err, fs.ErrNotExist), must.Sprintf("want not-exist, got %v", err))
	must.False(t, errors.Is(err, predictor.ErrCorrupt))
}

func TestPoolFileRoundTrip(t *testing.T) {
	pool, _, last := trained(t)
	path := filepath.Join(t.TempDir(), "pool")
	must.NoError(t, predictor.WritePoolFile(path, pool))
	got, err := predictor.ReadPoolFile(path)
	must.NoError(t, err)
	must.Eq(t, *pool, *got)

	// A new desktop forecasts the same from either copy.
	a := predictor.NewModel(pool, predictor.LearnNone)
	b := predictor.NewModel(got, predictor.LearnNone)
	for _, x := range []*predictor.Model{a, b} {
		must.NoError(t, x.Observe(last, predictor.Available))
	}
	fa, err := a.Forecast(last.Add(time.Hour))
	must.NoError(t, err)
	fb, err := b.Forecast(last.Add(time.Hour))
	must.NoError(t, err)
	must.Eq(t, fa, fb)
}
