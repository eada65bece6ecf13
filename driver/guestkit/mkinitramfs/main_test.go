package main

import (
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/driver/guestkit/kmod"
	"github.com/deskcloud/deskcloud/driver/guestkit/kmod/kmodtest"
)

// modTree writes a lib/modules/VERSION tree: 9p needs 9pnet and netfs,
// netfs is xz-compressed when xz is installed, and virtio_pci is built in.
func modTree(t *testing.T) (dir string, compressed bool) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "6.1.0-test-amd64")
	write := func(rel string, data []byte) {
		p := filepath.Join(dir, rel)
		must.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		must.NoError(t, os.WriteFile(p, data, 0o644))
	}
	write("kernel/fs/9p/9p.ko", kmodtest.ModuleELF(t, "depends=9pnet,netfs\x00name=9p\x00"))
	write("kernel/net/9p/9pnet.ko", kmodtest.ModuleELF(t, "depends=\x00name=9pnet\x00"))
	write("kernel/fs/netfs/netfs.ko", kmodtest.ModuleELF(t, "depends=\x00name=netfs\x00"))
	write("kernel/drivers/char/virtio_console.ko", kmodtest.ModuleELF(t, "depends=\x00name=virtio_console\x00"))
	write("modules.builtin", []byte("kernel/drivers/virtio/virtio_pci.ko\n"))
	if xz, err := exec.LookPath("xz"); err == nil {
		p := filepath.Join(dir, "kernel/fs/netfs/netfs.ko")
		out, err := exec.Command(xz, p).CombinedOutput()
		must.NoError(t, err, must.Sprint(string(out)))
		compressed = true
	}
	return dir, compressed
}

func TestResolveModules(t *testing.T) {
	dir, compressed := modTree(t)
	mods, data, err := resolveModules(dir, []string{"9p", "virtio_pci", "virtio_rng"})
	must.NoError(t, err)
	must.MapLen(t, 3, mods, must.Sprintf("modules %v", mods))
	must.Eq(t, "kernel/fs/netfs/netfs.ko", mods["netfs"].Path, must.Sprintf("compressed %v: shipped decompressed", compressed))
	must.Eq(t, []string{"9pnet", "netfs"}, mods["9p"].Deps)
	info, err := kmod.ModInfo(data["netfs"])
	must.NoError(t, err, must.Sprint("a shipped module is a plain ELF"))
	must.Eq(t, []string{"netfs"}, info["name"])

	_, _, err = resolveModules(dir, []string{"9p"})
	must.NoError(t, err)
	must.NoError(t, os.Remove(filepath.Join(dir, "kernel/net/9p/9pnet.ko")))
	_, _, err = resolveModules(dir, []string{"9p"})
	must.ErrorContains(t, err, "module dependency 9pnet not found")
}

// TestRun builds a whole initramfs from a fake kernel tree and checks what
// the agent relies on.
func TestRun(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox not installed (busybox-static, scripts/deps.sh apt)")
	}
	dir, _ := modTree(t)
	agent := filepath.Join(t.TempDir(), "agent")
	must.NoError(t, os.WriteFile(agent, []byte("agent binary"), 0o755))
	out := filepath.Join(t.TempDir(), "initramfs.cpio.gz")
	must.NoError(t, run(dir, agent, bb, out))

	f, err := os.Open(out)
	must.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	must.NoError(t, err)
	raw, err := io.ReadAll(zr)
	must.NoError(t, err)
	files := readNewc(t, raw)

	must.Eq(t, "agent binary", files["init"].data)
	must.Eq(t, uint32(0o100755), files["init"].mode)
	must.Eq(t, uint32(0o020600), files["dev/console"].mode)
	must.Eq(t, "busybox", files["bin/sh"].data, must.Sprint("/bin/sh is a busybox applet"))
	for _, name := range []string{"bin/init", "bin/poweroff", "bin/reboot", "bin/halt"} {
		_, ok := files[name]
		must.False(t, ok, must.Sprintf("%s would talk to an init that is not busybox", name))
	}
	dep := files["lib/modules/6.1.0-test-amd64/modules.dep"].data
	mods, err := kmod.ParseDep(strings.NewReader(dep))
	must.NoError(t, err)
	order, _, err := kmod.LoadOrder(mods, kmod.CommandModules)
	must.NoError(t, err)
	var names []string
	for _, m := range order {
		names = append(names, m.Name)
		_, ok := files["lib/modules/6.1.0-test-amd64/"+m.Path]
		must.True(t, ok, must.Sprintf("%s is shipped at %s", m.Name, m.Path))
	}
	must.Eq(t, []string{"virtio_console", "netfs", "9pnet", "9p"}, names)
}

type newcFile struct {
	mode uint32
	data string
}

// readNewc parses a newc archive into its entries by name.
func readNewc(t *testing.T, b []byte) map[string]newcFile {
	t.Helper()
	files := map[string]newcFile{}
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		must.Eq(t, "070701", string(b[off:off+6]))
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			must.NoError(t, err)
			return int(v)
		}
		mode, size, nameSize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+nameSize-1])
		data := align(off + 110 + nameSize)
		if name == "TRAILER!!!" {
			return files
		}
		files[name] = newcFile{mode: uint32(mode), data: string(b[data : data+size])}
		off = align(data + size)
	}
}
