package cloudinit

import (
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/kdomanski/iso9660"
	"github.com/shoenig/test/must"
)

func TestWriteSeed(t *testing.T) {
	cases := []struct {
		name     string
		userData []byte
		metaData []byte
	}{
		{"script", []byte("#!/bin/sh\necho hello\n"), []byte("instance-id: i-1\nlocal-hostname: vm1\n")},
		{"empty", nil, nil},
		{"large", make([]byte, 3<<20), []byte("instance-id: big\n")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "seed.iso")
			must.NoError(t, WriteSeed(path, tc.userData, tc.metaData))

			f, err := os.Open(path)
			must.NoError(t, err)
			defer f.Close()
			img, err := iso9660.OpenImage(f)
			must.NoError(t, err)
			label, err := img.Label()
			must.NoError(t, err)
			must.Eq(t, Label, label, must.Sprint("volume label"))

			root, err := img.RootDir()
			must.NoError(t, err)
			children, err := root.GetChildren()
			must.NoError(t, err)
			got := map[string][]byte{}
			for _, c := range children {
				b, err := io.ReadAll(c.Reader())
				must.NoError(t, err)
				got[c.Name()] = b
			}
			must.MapLen(t, 2, got, must.Sprintf("files on the seed: %v", keys(got)))
			must.Eq(t, string(tc.userData), string(got["user-data"]), must.Sprint("user-data"))
			must.Eq(t, string(tc.metaData), string(got["meta-data"]), must.Sprint("meta-data"))

			// The raw volume descriptor carries the label that blkid and the
			// guest agent read.
			pvd := make([]byte, 2048)
			_, err = f.ReadAt(pvd, 16*2048)
			must.NoError(t, err)
			must.Eq(t, "CD001", string(pvd[1:6]))
			must.StrHasPrefix(t, "cidata ", string(pvd[40:72]))
		})
	}
}

func TestWriteSeedReplaces(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seed.iso")
	must.NoError(t, WriteSeed(path, []byte("old"), nil))
	must.NoError(t, WriteSeed(path, []byte("new"), nil))
	entries, err := os.ReadDir(filepath.Dir(path))
	must.NoError(t, err)
	must.SliceLen(t, 1, entries, must.Sprint("no temporary file may be left behind"))
}

func TestWriteSeedBadDir(t *testing.T) {
	err := WriteSeed(filepath.Join(t.TempDir(), "missing", "seed.iso"), nil, nil)
	must.ErrorContains(t, err, "write seed")
}

func keys(m map[string][]byte) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	return k
}
