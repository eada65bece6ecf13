package trace

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// BenchmarkReader measures reading a plain trace in the library layout, per row.
func BenchmarkReader(b *testing.B) {
	var sb strings.Builder
	sb.WriteString(bomStr)
	at := time.Date(2014, 5, 19, 6, 0, 0, 0, time.UTC)
	states := []string{"in-use", "available", "offline", "restarted"}
	const rows = 100000
	for i := range rows {
		at = at.Add(time.Duration(i%7) * time.Second)
		fmt.Fprintf(&sb, "PC%03d,%s,%s\r\n", i%300, states[i%4], at.Format("2006-01-02 15:04:05.000"))
	}
	dir := b.TempDir()
	path := dir + "/trace.csv"
	if err := writeFile(path, sb.String()); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(sb.Len()))
	b.ReportAllocs()
	for b.Loop() {
		r, err := Open([]string{path}, Options{})
		if err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := r.Next(); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				b.Fatal(err)
			}
		}
		_ = r.Close()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/rows, "ns/row")
}
