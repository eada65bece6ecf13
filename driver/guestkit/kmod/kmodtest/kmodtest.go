// Package kmodtest builds fake kernel modules for the tests of the kit's module handling.
package kmodtest

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"testing"
)

// ModuleELF builds a minimal relocatable ELF64 whose .modinfo section holds modinfo, as a
// kernel module's does.
func ModuleELF(tb testing.TB, modinfo string) []byte {
	tb.Helper()
	shstrtab := "\x00.modinfo\x00.shstrtab\x00"
	const ehsize, shentsize = 64, 64
	modOff := uint64(ehsize)
	strOff := modOff + uint64(len(modinfo))
	shOff := strOff + uint64(len(shstrtab))
	var buf bytes.Buffer
	hdr := elf.Header64{
		Type: uint16(elf.ET_REL), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Shoff: shOff, Ehsize: ehsize, Shentsize: shentsize, Shnum: 3, Shstrndx: 2,
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	write := func(v any) {
		if err := binary.Write(&buf, binary.LittleEndian, v); err != nil {
			tb.Fatalf("build fake module: %v", err)
		}
	}
	write(hdr)
	buf.WriteString(modinfo)
	buf.WriteString(shstrtab)
	for _, sh := range []elf.Section64{
		{},
		{Name: 1, Type: uint32(elf.SHT_PROGBITS), Off: modOff, Size: uint64(len(modinfo)), Addralign: 1},
		{Name: 10, Type: uint32(elf.SHT_STRTAB), Off: strOff, Size: uint64(len(shstrtab)), Addralign: 1},
	} {
		write(sh)
	}
	return buf.Bytes()
}
