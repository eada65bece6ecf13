package cpio

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/shoenig/test/must"
)

// entry is one parsed newc record.
type entry struct {
	name         string
	mode         uint32
	data         string
	rmaj, rmin   uint32
	nameOff, off int
}

// parse reads a newc archive independently of the writer.
func parse(t *testing.T, b []byte) []entry {
	t.Helper()
	var out []entry
	off := 0
	hex := func(i int) uint32 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+6+8*i+8]), 16, 32)
		must.NoError(t, err)
		return uint32(v)
	}
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		must.Eq(t, "070701", string(b[off:off+6]), must.Sprintf("magic at offset %d", off))
		mode, size, rmaj, rmin, nameSize := hex(1), hex(6), hex(9), hex(10), hex(11)
		name := string(b[off+110 : off+110+int(nameSize)-1])
		must.Eq(t, byte(0), b[off+110+int(nameSize)-1], must.Sprint("name is NUL-terminated"))
		dataOff := align(off + 110 + int(nameSize))
		e := entry{name: name, mode: mode, data: string(b[dataOff : dataOff+int(size)]), rmaj: rmaj, rmin: rmin, off: off}
		off = align(dataOff + int(size))
		if name == "TRAILER!!!" {
			must.Eq(t, len(b), off, must.Sprint("nothing after the trailer"))
			return out
		}
		out = append(out, e)
	}
}

func build(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	must.NoError(t, w.Dir("bin", 0o755))
	must.NoError(t, w.Dir("dev", 0o755))
	must.NoError(t, w.File("/init", 0o755, []byte("#!/bin/sh\necho hi\n")))
	must.NoError(t, w.File("bin/odd", 0o644, []byte("12345")))
	must.NoError(t, w.Symlink("bin/sh", "busybox"))
	must.NoError(t, w.CharDev("dev/console", 0o600, 5, 1))
	must.NoError(t, w.Close())
	must.NoError(t, w.Close(), must.Sprint("close twice"))
	return buf.Bytes()
}

func TestWriter(t *testing.T) {
	b := build(t)
	must.Eq(t, 0, len(b)%4, must.Sprint("archive is 4-byte aligned"))
	got := parse(t, b)
	want := []struct {
		name string
		mode uint32
		data string
	}{
		{"bin", 0o040755, ""},
		{"dev", 0o040755, ""},
		{"init", 0o100755, "#!/bin/sh\necho hi\n"},
		{"bin/odd", 0o100644, "12345"},
		{"bin/sh", 0o120777, "busybox"},
		{"dev/console", 0o020600, ""},
	}
	must.SliceLen(t, len(want), got)
	for i, w := range want {
		must.Eq(t, w.name, got[i].name)
		must.Eq(t, w.mode, got[i].mode, must.Sprintf("mode of %s", w.name))
		must.Eq(t, w.data, got[i].data, must.Sprintf("data of %s", w.name))
	}
	must.Eq(t, uint32(5), got[5].rmaj)
	must.Eq(t, uint32(1), got[5].rmin)
	must.Eq(t, b, build(t), must.Sprint("the same input gives the same bytes"))
}

func TestWriterEmptyName(t *testing.T) {
	w := NewWriter(&bytes.Buffer{})
	must.Error(t, w.File("/", 0o644, nil))
}

// TestBusyboxReadsIt extracts the archive with busybox's cpio, an
// independent reader.
func TestBusyboxReadsIt(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox not installed (busybox-static, scripts/deps.sh apt)")
	}
	dir := t.TempDir()
	cmd := exec.Command(bb, "cpio", "-i", "-d")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(build(t))
	out, err := cmd.CombinedOutput()
	// Creating the device node needs privileges the test may lack; files
	// and links must come out regardless.
	t.Logf("busybox cpio: %v %s", err, out)
	b, err := os.ReadFile(filepath.Join(dir, "init"))
	must.NoError(t, err)
	must.Eq(t, "#!/bin/sh\necho hi\n", string(b))
	target, err := os.Readlink(filepath.Join(dir, "bin", "sh"))
	must.NoError(t, err)
	must.Eq(t, "busybox", target)
	st, err := os.Stat(filepath.Join(dir, "init"))
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o755), st.Mode().Perm())
}
