package kmod

import (
	"bytes"
	"strings"
	"testing"

	"github.com/shoenig/test/must"

	"github.com/deskcloud/deskcloud/driver/guestkit/kmod/kmodtest"
)

const sampleDep = `kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko kernel/fs/fscache/fscache.ko
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko: kernel/fs/fscache/fscache.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
`

func names(mods []Module) []string {
	var n []string
	for _, m := range mods {
		n = append(n, m.Name)
	}
	return n
}

func TestName(t *testing.T) {
	cases := map[string]string{
		"kernel/drivers/char/hw_random/virtio-rng.ko": "virtio_rng",
		"kernel/fs/9p/9p.ko.xz":                       "9p",
		"nls_iso8859-1.ko.zst":                        "nls_iso8859_1",
		"virtio_pci":                                  "virtio_pci",
	}
	for in, want := range cases {
		must.Eq(t, want, Name(in), must.Sprintf("Name(%q)", in))
	}
}

func TestLoadOrder(t *testing.T) {
	acyclic := strings.ReplaceAll(sampleDep, "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko", "kernel/fs/fscache/fscache.ko:")
	mods, err := ParseDep(strings.NewReader(acyclic))
	must.NoError(t, err)
	must.MapLen(t, 8, mods)
	must.Eq(t, "kernel/drivers/char/hw_random/virtio-rng.ko", mods["virtio_rng"].Path)

	cases := []struct {
		name    string
		want    []string
		order   []string
		missing []string
	}{
		{name: "deps first, as modprobe would", want: []string{"9p"}, order: []string{"fscache", "netfs", "9pnet", "9p"}},
		{name: "shared deps once", want: []string{"9pnet_virtio", "virtio-rng", "9p"},
			order: []string{"virtio", "virtio_ring", "9pnet", "9pnet_virtio", "virtio_rng", "fscache", "netfs", "9p"}},
		{name: "built in or absent", want: []string{"virtio_pci", "virtio"}, order: []string{"virtio"}, missing: []string{"virtio_pci"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			order, missing, err := LoadOrder(mods, tc.want)
			must.NoError(t, err)
			must.Eq(t, tc.order, names(order))
			must.Eq(t, tc.missing, missing)
			// Every module comes after all of its dependencies.
			pos := map[string]int{}
			for i, m := range order {
				pos[m.Name] = i
			}
			for i, m := range order {
				for _, d := range m.Deps {
					must.Less(t, i, pos[d], must.Sprintf("%s needs %s", m.Name, d))
				}
			}
		})
	}
}

func TestLoadOrderErrors(t *testing.T) {
	mods, err := ParseDep(strings.NewReader(sampleDep))
	must.NoError(t, err)
	_, _, err = LoadOrder(mods, []string{"9p"})
	must.ErrorContains(t, err, "module dependency cycle")

	mods, err = ParseDep(strings.NewReader("a.ko: b.ko\n"))
	must.NoError(t, err)
	_, _, err = LoadOrder(mods, []string{"a"})
	must.ErrorContains(t, err, "module a needs b, which is not in modules.dep")

	_, err = ParseDep(strings.NewReader("no colon here\n"))
	must.ErrorContains(t, err, "line 1")
}

func TestWriteDepRoundTrip(t *testing.T) {
	mods := map[string]Module{
		"9p":      {Name: "9p", Path: "kernel/fs/9p/9p.ko", Deps: []string{"9pnet", "netfs"}},
		"9pnet":   {Name: "9pnet", Path: "kernel/net/9p/9pnet.ko"},
		"netfs":   {Name: "netfs", Path: "kernel/fs/netfs/netfs.ko", Deps: []string{"fscache"}},
		"fscache": {Name: "fscache", Path: "kernel/fs/fscache/fscache.ko"},
	}
	var buf bytes.Buffer
	must.NoError(t, WriteDep(&buf, mods))
	// depmod's form: the whole closure, the module to load last first.
	must.StrContains(t, buf.String(), "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko kernel/fs/fscache/fscache.ko\n")
	must.StrContains(t, buf.String(), "kernel/net/9p/9pnet.ko:\n")

	back, err := ParseDep(&buf)
	must.NoError(t, err)
	order, _, err := LoadOrder(back, []string{"9p"})
	must.NoError(t, err)
	must.Eq(t, []string{"fscache", "netfs", "9pnet", "9p"}, names(order), must.Sprint("the order WriteDep meant"))
}

func TestKitModules(t *testing.T) {
	all := KitModules()
	for _, m := range append(CommandModules, ImageModules...) {
		must.SliceContains(t, all, m)
	}
	for i := 1; i < len(all); i++ {
		must.Less(t, all[i], all[i-1], must.Sprint("sorted without duplicates"))
	}
}

func TestModInfo(t *testing.T) {
	ko := kmodtest.ModuleELF(t, "license=GPL\x00depends=9pnet,netfs\x00alias=fs-9p\x00alias=9p\x00name=9p\x00")
	info, err := ModInfo(ko)
	must.NoError(t, err)
	must.Eq(t, []string{"9p"}, info["name"])
	must.Eq(t, []string{"fs-9p", "9p"}, info["alias"])
	must.Eq(t, []string{"9pnet", "netfs"}, Depends(info))

	_, err = ModInfo(kmodtest.ModuleELF(t, "")[:64])
	must.Error(t, err)
}

func TestModInfoNotELF(t *testing.T) {
	_, err := ModInfo([]byte("not an elf file"))
	must.ErrorContains(t, err, "parse module")
}

func TestDepends(t *testing.T) {
	info := map[string][]string{"depends": {"9pnet,netfs,fscache"}}
	must.Eq(t, []string{"9pnet", "netfs", "fscache"}, Depends(info))
	must.SliceEmpty(t, Depends(map[string][]string{"depends": {""}}))
}
