// Package kmod resolves kernel module dependencies for the guest kit: at kit
// build time from each module's own .modinfo section, and inside the guest
// from the modules.dep that the kit ships. It also names the modules the
// guest agent loads, so the kit and the agent cannot disagree.
package kmod

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"path"
	"slices"
	"sort"
	"strings"
)

// Modules the guest agent loads in each mode. A module that the kernel has
// built in, or that the kit lacks, is skipped.
var (
	// CommandModules serve command mode: virtio-serial for the control and
	// stdio ports, 9p for shares, the NIC, the balloon and an entropy source.
	CommandModules = []string{
		"virtio_pci", "virtio_console", "virtio_rng", "virtio_balloon",
		"virtio_net", "9pnet_virtio", "9p",
	}
	// ImageModules serve image mode: disks on virtio-blk, virtio-scsi or
	// AHCI (QEMU's -cdrom on q35) and the ISO9660 and FAT filesystems a
	// cloud-init seed uses.
	ImageModules = []string{
		"virtio_pci", "virtio_rng", "virtio_blk", "virtio_scsi", "ahci",
		"sd_mod", "sr_mod", "isofs", "vfat", "nls_cp437", "nls_iso8859_1",
		"nls_utf8",
	}
)

// KitModules is every module the kit ships before dependencies: the union
// of the modes' lists, sorted.
func KitModules() []string {
	all := slices.Concat(CommandModules, ImageModules)
	slices.Sort(all)
	return slices.Compact(all)
}

// Name is the module name of a module file path: its base name without the
// .ko and compression suffixes, with dashes as underscores, as the kernel
// names it.
func Name(file string) string {
	base := path.Base(file)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		base = strings.TrimSuffix(base, ext)
	}
	base = strings.TrimSuffix(base, ".ko")
	return strings.ReplaceAll(base, "-", "_")
}

// Module is one module of a modules.dep: its path relative to the modules
// directory and the names of the modules it needs.
type Module struct {
	Name string
	Path string
	Deps []string
}

// ParseDep parses a modules.dep ("path: dep-path dep-path ...") into modules
// by name.
func ParseDep(r io.Reader) (map[string]Module, error) {
	mods := make(map[string]Module)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		file, deps, ok := strings.Cut(text, ":")
		if !ok {
			return nil, fmt.Errorf("modules.dep line %d: no colon in %q", line, text)
		}
		m := Module{Name: Name(file), Path: strings.TrimSpace(file)}
		for _, d := range strings.Fields(deps) {
			m.Deps = append(m.Deps, Name(d))
		}
		mods[m.Name] = m
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return mods, nil
}

// LoadOrder returns the modules to load for want, every module after the
// modules it needs and each once. Wanted names not in mods are returned in
// missing (built in or not shipped); a dependency not in mods, or a cycle,
// is an error.
func LoadOrder(mods map[string]Module, want []string) (order []Module, missing []string, err error) {
	const (
		visiting = 1
		done     = 2
	)
	state := make(map[string]int)
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, name), " -> "))
		}
		m, ok := mods[name]
		if !ok {
			return fmt.Errorf("module %s needs %s, which is not in modules.dep", chain[len(chain)-1], name)
		}
		state[name] = visiting
		// modules.dep lists a module's dependencies the last to load first.
		for _, d := range slices.Backward(m.Deps) {
			if err := visit(d, append(slices.Clip(chain), name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, m)
		return nil
	}
	for _, w := range want {
		w = Name(w)
		if _, ok := mods[w]; !ok {
			missing = append(missing, w)
			continue
		}
		if err := visit(w, nil); err != nil {
			return nil, nil, err
		}
	}
	return order, missing, nil
}

// WriteDep writes mods as a modules.dep whose lines list every module's
// whole dependency closure, the last to be loaded first, as depmod does.
func WriteDep(w io.Writer, mods map[string]Module) error {
	names := make([]string, 0, len(mods))
	for n := range mods {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return mods[names[i]].Path < mods[names[j]].Path })
	bw := bufio.NewWriter(w)
	for _, n := range names {
		order, _, err := LoadOrder(mods, []string{n})
		if err != nil {
			return err
		}
		fmt.Fprintf(bw, "%s:", mods[n].Path)
		for i := len(order) - 2; i >= 0; i-- {
			fmt.Fprintf(bw, " %s", order[i].Path)
		}
		fmt.Fprintln(bw)
	}
	return bw.Flush()
}

// ModInfo reads the key=value pairs of an ELF module's .modinfo section.
// Keys may repeat (alias, firmware), so values are lists.
func ModInfo(ko []byte) (map[string][]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("parse module: %w", err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module has no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo: %w", err)
	}
	info := make(map[string][]string)
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if ok {
			info[k] = append(info[k], v)
		}
	}
	return info, nil
}

// Depends is the module names a module's .modinfo says it needs.
func Depends(info map[string][]string) []string {
	var deps []string
	for _, v := range info["depends"] {
		for _, d := range strings.Split(v, ",") {
			if d = strings.TrimSpace(d); d != "" {
				deps = append(deps, Name(d))
			}
		}
	}
	return deps
}
