// Command mkinitramfs builds the guest kit's initramfs: the guest agent as
// /init, a static busybox with its applets, and the kernel modules the agent
// loads with their dependencies and a modules.dep. scripts/guestkit.sh runs
// it; nothing else needs it.
//
//	mkinitramfs -modules <lib/modules/VERSION> -agent <binary> -busybox <binary> -out <initramfs.cpio.gz>
package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/deskcloud/deskcloud/driver/guestkit/cpio"
	"github.com/deskcloud/deskcloud/driver/guestkit/kmod"
)

// skipApplets are busybox applets that would talk to an init that is not
// busybox: our agent is PID 1.
var skipApplets = map[string]bool{"init": true, "linuxrc": true, "halt": true, "poweroff": true, "reboot": true}

func main() {
	var (
		modDir  = flag.String("modules", "", "the kernel's lib/modules/VERSION directory")
		agent   = flag.String("agent", "", "the guest agent binary, installed as /init")
		busybox = flag.String("busybox", "/bin/busybox", "a static busybox binary")
		out     = flag.String("out", "", "the initramfs to write (newc cpio, gzip)")
	)
	flag.Parse()
	if *modDir == "" || *agent == "" || *out == "" {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*modDir, *agent, *busybox, *out); err != nil {
		fmt.Fprintf(os.Stderr, "mkinitramfs: %v\n", err)
		os.Exit(1)
	}
}

type file struct {
	mode   fs.FileMode
	data   []byte
	link   string
	char   bool
	major  uint32
	minor  uint32
	isLink bool
}

func run(modDir, agentPath, busyboxPath, out string) error {
	version := filepath.Base(filepath.Clean(modDir))
	files := map[string]file{}
	dirs := map[string]bool{}
	add := func(name string, f file) {
		files[name] = f
		for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	for _, d := range []string{"bin", "dev", "etc", "lib", "proc", "sys", "tmp", "run", "root", "mnt", "usr", "var"} {
		dirs[d] = true
	}

	agent, err := os.ReadFile(agentPath)
	if err != nil {
		return fmt.Errorf("read agent: %w", err)
	}
	add("init", file{mode: 0o755, data: agent})

	bb, err := os.ReadFile(busyboxPath)
	if err != nil {
		return fmt.Errorf("read busybox: %w", err)
	}
	add("bin/busybox", file{mode: 0o755, data: bb})
	applets, err := exec.Command(busyboxPath, "--list").Output()
	if err != nil {
		return fmt.Errorf("list busybox applets: %w", err)
	}
	nApplets := 0
	for _, a := range strings.Fields(string(applets)) {
		if skipApplets[a] || a == "busybox" || strings.Contains(a, "/") {
			continue
		}
		add("bin/"+a, file{isLink: true, link: "busybox"})
		nApplets++
	}
	add("sbin", file{isLink: true, link: "bin"})
	add("usr/bin", file{isLink: true, link: "../bin"})
	add("usr/sbin", file{isLink: true, link: "../bin"})
	add("etc/passwd", file{mode: 0o644, data: []byte("root:x:0:0:root:/root:/bin/sh\n")})
	add("etc/group", file{mode: 0o644, data: []byte("root:x:0:\n")})
	add("etc/hosts", file{mode: 0o644, data: []byte("127.0.0.1\tlocalhost\n::1\tlocalhost\n")})
	add("dev/console", file{mode: 0o600, char: true, major: 5, minor: 1})
	add("dev/null", file{mode: 0o666, char: true, major: 1, minor: 3})

	mods, data, err := resolveModules(modDir, kmod.KitModules())
	if err != nil {
		return err
	}
	var dep bytes.Buffer
	if err := kmod.WriteDep(&dep, mods); err != nil {
		return err
	}
	base := "lib/modules/" + version
	dirs[base] = true
	add(base+"/modules.dep", file{mode: 0o644, data: dep.Bytes()})
	modBytes := 0
	for name, m := range mods {
		add(base+"/"+m.Path, file{mode: 0o644, data: data[name]})
		modBytes += len(data[name])
	}

	var raw bytes.Buffer
	cw := cpio.NewWriter(&raw)
	dirList := make([]string, 0, len(dirs))
	for d := range dirs {
		if _, isFile := files[d]; !isFile {
			dirList = append(dirList, d)
		}
	}
	sort.Strings(dirList)
	for _, d := range dirList {
		if err := cw.Dir(d, 0o755); err != nil {
			return err
		}
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		f := files[n]
		switch {
		case f.isLink:
			err = cw.Symlink(n, f.link)
		case f.char:
			err = cw.CharDev(n, f.mode, f.major, f.minor)
		default:
			err = cw.File(n, f.mode, f.data)
		}
		if err != nil {
			return err
		}
	}
	if err := cw.Close(); err != nil {
		return err
	}

	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("create initramfs: %w", err)
	}
	defer os.Remove(tmp)
	zw, err := gzip.NewWriterLevel(f, gzip.BestCompression)
	if err != nil {
		f.Close()
		return err
	}
	if _, err := zw.Write(raw.Bytes()); err != nil {
		f.Close()
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("install initramfs: %w", err)
	}
	modNames := make([]string, 0, len(mods))
	for n := range mods {
		modNames = append(modNames, n)
	}
	slices.Sort(modNames)
	fmt.Fprintf(os.Stderr, "mkinitramfs: %d modules (%d KiB): %s\n", len(mods), modBytes>>10, strings.Join(modNames, " "))
	fmt.Fprintf(os.Stderr, "mkinitramfs: %d busybox applets; cpio %d KiB, agent %d KiB, busybox %d KiB\n",
		nApplets, raw.Len()>>10, len(agent)>>10, len(bb)>>10)
	return nil
}

// resolveModules finds the wanted modules under modDir and everything they
// depend on (from each module's .modinfo), decompressing compressed modules
// so the agent can load them as they are. Wanted modules that the kernel has
// built in, or does not have, are reported and skipped; a missing dependency
// is an error.
func resolveModules(modDir string, want []string) (map[string]kmod.Module, map[string][]byte, error) {
	index := map[string]string{}
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			rel, err := filepath.Rel(modDir, p)
			if err != nil {
				return err
			}
			index[kmod.Name(rel)] = filepath.ToSlash(rel)
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("index modules: %w", err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			builtin[kmod.Name(sc.Text())] = true
		}
	}

	mods := map[string]kmod.Module{}
	data := map[string][]byte{}
	queue := slices.Clone(want)
	wanted := map[string]bool{}
	for _, w := range want {
		wanted[kmod.Name(w)] = true
	}
	for len(queue) > 0 {
		name := kmod.Name(queue[0])
		queue = queue[1:]
		if _, ok := mods[name]; ok {
			continue
		}
		rel, ok := index[name]
		if !ok {
			switch {
			case builtin[name]:
				fmt.Fprintf(os.Stderr, "mkinitramfs: %s is built into the kernel\n", name)
				continue
			case wanted[name]:
				fmt.Fprintf(os.Stderr, "mkinitramfs: %s is not in this kernel, skipped\n", name)
				continue
			default:
				return nil, nil, fmt.Errorf("module dependency %s not found under %s", name, modDir)
			}
		}
		ko, err := readModule(filepath.Join(modDir, rel))
		if err != nil {
			return nil, nil, err
		}
		info, err := kmod.ModInfo(ko)
		if err != nil {
			return nil, nil, fmt.Errorf("module %s: %w", rel, err)
		}
		deps := kmod.Depends(info)
		plain := rel[:strings.Index(rel, ".ko")+len(".ko")]
		mods[name] = kmod.Module{Name: name, Path: plain, Deps: deps}
		data[name] = ko
		queue = append(queue, deps...)
	}
	return mods, data, nil
}

// readModule reads a module, decompressing .ko.xz, .ko.zst and .ko.gz with
// the host's xz, zstd and gzip.
func readModule(p string) ([]byte, error) {
	var tool string
	switch {
	case strings.HasSuffix(p, ".ko"):
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read module: %w", err)
		}
		return b, nil
	case strings.HasSuffix(p, ".xz"):
		tool = "xz"
	case strings.HasSuffix(p, ".zst"):
		tool = "zstd"
	case strings.HasSuffix(p, ".gz"):
		tool = "gzip"
	default:
		return nil, fmt.Errorf("module %s: unknown compression", p)
	}
	b, err := exec.Command(tool, "-dc", p).Output()
	if err != nil {
		return nil, fmt.Errorf("decompress module %s with %s: %w", p, tool, err)
	}
	return b, nil
}
