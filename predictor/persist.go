package predictor

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"

	"github.com/deskcloud/deskcloud/internal/atomicfile"
)

// On-disk framing of a model or pool file:
//
//	magic   4 bytes  "DCPM" for a model, "DCPP" for a pool
//	version uint32   formatVersion
//	length  uint32   payload bytes
//	payload          the state, little-endian, fixed layout
//	crc     uint32   CRC-32C of everything before it
//
// A file that is short, has another magic or version, a length that does not match, or a
// checksum that does not match is torn or foreign: it is never loaded. The version changes
// whenever the layout does: version 2 added the cross of idle time with the hour of the day
// and the fleet calendar, so a version 1 model or pool is dropped rather than misread.
const formatVersion = 2

var (
	magicModel = [4]byte{'D', 'C', 'P', 'M'}
	magicPool  = [4]byte{'D', 'C', 'P', 'P'}
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

const frameOverhead = 4 + 4 + 4 + 4

// ErrCorrupt is returned for a state file that is torn, truncated or not a state file. The
// reader removes such a file: the caller starts afresh from the pool.
var ErrCorrupt = errors.New("state file is corrupt")

var stateSize = binary.Size(desktopState{})

// maxPayload bounds what a reader will believe a header's length field.
const maxPayload = 1 << 20

// WriteModelFile persists the model's state to path atomically: it writes a temporary file
// in the same directory, syncs it, renames it over path and syncs the directory, so after
// a crash path holds either the old state or the new one, never a mix.
func WriteModelFile(path string, m *Model) error {
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.LittleEndian, &m.st); err != nil {
		return fmt.Errorf("encode model state: %w", err)
	}
	return writeFramed(path, magicModel, buf.Bytes())
}

// ReadModelFile loads a model persisted by WriteModelFile, attached to pool and learning as
// learn says. A torn or foreign file is removed and ErrCorrupt returned; a missing file
// returns an error that matches fs.ErrNotExist.
func ReadModelFile(path string, pool *Pool, learn Learning) (*Model, error) {
	payload, err := readFramed(path, magicModel)
	if err != nil {
		return nil, err
	}
	m := NewModel(pool, learn)
	if err := binary.Read(bytes.NewReader(payload), binary.LittleEndian, &m.st); err != nil {
		return nil, dropCorrupt(path, fmt.Errorf("decode: %w", err))
	}
	if err := m.st.validate(); err != nil {
		return nil, dropCorrupt(path, err)
	}
	return m, nil
}

// WritePoolFile persists a pool atomically, as WriteModelFile does a model.
func WritePoolFile(path string, p *Pool) error {
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.LittleEndian, p); err != nil {
		return fmt.Errorf("encode pool: %w", err)
	}
	return writeFramed(path, magicPool, buf.Bytes())
}

// ReadPoolFile loads a pool persisted by WritePoolFile, with ReadModelFile's guarantees.
func ReadPoolFile(path string) (*Pool, error) {
	payload, err := readFramed(path, magicPool)
	if err != nil {
		return nil, err
	}
	p := &Pool{}
	if err := binary.Read(bytes.NewReader(payload), binary.LittleEndian, p); err != nil {
		return nil, dropCorrupt(path, fmt.Errorf("decode: %w", err))
	}
	return p, nil
}

func (st *desktopState) validate() error {
	switch {
	case st.ArrN > arrivalCap || st.ArrHead >= arrivalCap:
		return fmt.Errorf("arrival ring %d/%d out of range", st.ArrHead, st.ArrN)
	case st.PendN > pendingCap || st.PendHead >= pendingCap:
		return fmt.Errorf("pending ring %d/%d out of range", st.PendHead, st.PendN)
	case st.State >= numStates:
		return fmt.Errorf("state %d out of range", st.State)
	}
	for i := range st.Pend {
		f := &st.Pend[i].F
		for j, n := range f.N {
			if n > maxActive {
				return fmt.Errorf("sample %d has %d features", i, n)
			}
			for _, k := range f.Idx[j][:n] {
				if int(k) >= numFeatures {
					return fmt.Errorf("sample %d has feature %d of %d", i, k, numFeatures)
				}
			}
		}
	}
	return nil
}

func writeFramed(path string, magic [4]byte, payload []byte) error {
	frame := make([]byte, 0, len(payload)+frameOverhead)
	frame = append(frame, magic[:]...)
	frame = binary.LittleEndian.AppendUint32(frame, formatVersion)
	frame = binary.LittleEndian.AppendUint32(frame, uint32(len(payload)))
	frame = append(frame, payload...)
	frame = binary.LittleEndian.AppendUint32(frame, crc32.Checksum(frame, castagnoli))

	if err := atomicfile.WriteFile(path, frame, 0o600); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}

func readFramed(path string, magic [4]byte) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("read state %s: %w", path, err)
		}
		return nil, fmt.Errorf("read state %s: %w", path, err)
	}
	if len(b) < frameOverhead {
		return nil, dropCorrupt(path, fmt.Errorf("%d bytes, shorter than a header", len(b)))
	}
	if !bytes.Equal(b[:4], magic[:]) {
		return nil, dropCorrupt(path, fmt.Errorf("magic %q, want %q", b[:4], magic[:]))
	}
	if v := binary.LittleEndian.Uint32(b[4:8]); v != formatVersion {
		return nil, dropCorrupt(path, fmt.Errorf("version %d, want %d", v, formatVersion))
	}
	n := binary.LittleEndian.Uint32(b[8:12])
	if n > maxPayload || int(n) != len(b)-frameOverhead {
		return nil, dropCorrupt(path, fmt.Errorf("length %d does not match file size %d", n, len(b)))
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, dropCorrupt(path, errors.New("checksum mismatch"))
	}
	return b[12 : len(b)-4], nil
}

// dropCorrupt removes a corrupt state file so that it is never loaded, and says why.
func dropCorrupt(path string, why error) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read state %s: %w: %w (and removing it failed: %w)", path, ErrCorrupt, why, err)
	}
	return fmt.Errorf("read state %s: %w: %w", path, ErrCorrupt, why)
}
