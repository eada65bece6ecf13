// Package cpio writes the "newc" cpio archives that the Linux kernel unpacks
// as an initramfs. Entries carry no owner and no time, so the same input
// gives the same bytes.
package cpio

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// Writer writes a newc archive. Parents must be added before their children,
// as the kernel does not create missing directories.
type Writer struct {
	w      io.Writer
	ino    uint32
	off    int64
	closed bool
}

// NewWriter returns a Writer that writes to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w, ino: 1}
}

// Dir adds a directory.
func (cw *Writer) Dir(name string, perm fs.FileMode) error {
	return cw.entry(name, 0o040000|uint32(perm.Perm()), nil, 0, 0)
}

// File adds a regular file.
func (cw *Writer) File(name string, perm fs.FileMode, data []byte) error {
	return cw.entry(name, 0o100000|uint32(perm.Perm()), data, 0, 0)
}

// Symlink adds a symbolic link to target.
func (cw *Writer) Symlink(name, target string) error {
	return cw.entry(name, 0o120000|0o777, []byte(target), 0, 0)
}

// CharDev adds a character device node.
func (cw *Writer) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return cw.entry(name, 0o020000|uint32(perm.Perm()), nil, major, minor)
}

// Close writes the trailer. It does not close the underlying writer.
func (cw *Writer) Close() error {
	if cw.closed {
		return nil
	}
	cw.closed = true
	return cw.header("TRAILER!!!", 0, 0, 0, 0, 0)
}

func (cw *Writer) entry(name string, mode uint32, data []byte, rmajor, rminor uint32) error {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		return fmt.Errorf("cpio entry with empty name")
	}
	cw.ino++
	if err := cw.header(name, cw.ino, mode, uint32(len(data)), rmajor, rminor); err != nil {
		return err
	}
	if err := cw.write(data); err != nil {
		return err
	}
	return cw.pad()
}

func (cw *Writer) header(name string, ino, mode, size, rmajor, rminor uint32) error {
	nlink := uint32(1)
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	if err := cw.write([]byte(hdr + name + "\x00")); err != nil {
		return err
	}
	return cw.pad()
}

func (cw *Writer) write(b []byte) error {
	n, err := cw.w.Write(b)
	cw.off += int64(n)
	if err != nil {
		return fmt.Errorf("write cpio: %w", err)
	}
	return nil
}

// pad aligns the archive to four bytes.
func (cw *Writer) pad() error {
	if r := cw.off % 4; r != 0 {
		return cw.write(make([]byte, 4-r))
	}
	return nil
}
