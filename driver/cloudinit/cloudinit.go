// Package cloudinit writes cloud-init NoCloud seed disks: an ISO9660 image
// labelled "cidata" holding user-data and meta-data, which a guest image's
// cloud-init (or the guest kit's image mode) finds and reads at boot.
package cloudinit

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kdomanski/iso9660"
)

// Label is the volume label by which NoCloud finds its seed.
const Label = "cidata"

// WriteSeed writes a NoCloud seed ISO with the files user-data and
// meta-data to path, replacing it atomically. The image has plain ISO9660
// names (no Rock Ridge or Joliet), which Linux shows in lower case as
// "user-data" and "meta-data".
func WriteSeed(path string, userData, metaData []byte) error {
	w, err := iso9660.NewWriter()
	if err != nil {
		return fmt.Errorf("write seed %s: %w", path, err)
	}
	defer w.Cleanup()
	for _, f := range []struct {
		name string
		data []byte
	}{{"user-data", userData}, {"meta-data", metaData}} {
		if err := w.AddFile(bytes.NewReader(f.data), f.name); err != nil {
			return fmt.Errorf("write seed %s: add %s: %w", path, f.name, err)
		}
	}

	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write seed %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := w.WriteTo(tmp, Label); err != nil {
		tmp.Close()
		return fmt.Errorf("write seed %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write seed %s: %w", path, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("write seed %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write seed %s: %w", path, err)
	}
	return nil
}
