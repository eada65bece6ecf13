package eval

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"strconv"

	"github.com/deskcloud/deskcloud/predictor/metrics"
)

// Layout of the reliability diagram, in SVG user units.
const (
	plotPanel  = 240.0 // side of one panel's square plotting area
	plotMargin = 64.0  // room for axes and labels around a panel
	plotTop    = 56.0  // room for the title
	plotMinP   = 1e-4  // the axes run from plotMinP to 1, logarithmically
)

// WriteReliabilitySVG draws the forecast's reliability diagram, one panel per horizon: the
// observed frequency of arrivals against the mean forecast in each bin, on log axes, for
// the forecast (solid) and the hour-of-week baseline (dashed). A calibrated forecast lies
// on the diagonal; a point's area grows with the number of moments in its bin.
func (r *Result) WriteReliabilitySVG(w io.Writer) error {
	n := len(r.Horizons)
	width := float64(n)*(plotPanel+plotMargin) + plotMargin
	height := plotTop + plotMargin/2 + plotPanel + 48
	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="11">`+"\n",
		width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	mode := "own history only"
	if r.FleetContext {
		mode = "with fleet context"
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="22" font-size="14" font-weight="bold">Reliability of the owner-return forecast, test %s to %s (%s)</text>`+"\n",
		plotMargin, r.TestFrom, or(r.TestTo, "end"), mode)
	fmt.Fprintf(&b, `<text x="%.0f" y="40" fill="#555">observed frequency of an arrival within h against the forecast probability; solid: forecast, dashed: hour-of-week baseline</text>`+"\n", plotMargin)
	for i, hr := range r.Horizons {
		x0 := plotMargin + float64(i)*(plotPanel+plotMargin)
		panel(&b, x0, plotTop+plotMargin/2, hr)
	}
	b.WriteString("</svg>\n")
	_, err := w.Write(b.Bytes())
	return err
}

// panel draws one horizon's reliability diagram with its top-left corner at (x0, y0).
func panel(b *bytes.Buffer, x0, y0 float64, hr HorizonResult) {
	sx := func(p float64) float64 {
		return x0 + plotPanel*(math.Log10(max(p, plotMinP))-math.Log10(plotMinP))/-math.Log10(plotMinP)
	}
	sy := func(p float64) float64 {
		return y0 + plotPanel - plotPanel*(math.Log10(max(p, plotMinP))-math.Log10(plotMinP))/-math.Log10(plotMinP)
	}
	fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#999"/>`+"\n", x0, y0, plotPanel, plotPanel)
	for e := int(math.Log10(plotMinP)); e <= 0; e++ {
		p := math.Pow10(e)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", sx(p), y0, sx(p), y0+plotPanel)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", x0, sy(p), x0+plotPanel, sy(p))
		label := strconv.FormatFloat(p, 'f', -1, 64)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#555">%s</text>`+"\n", sx(p), y0+plotPanel+14, label)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="end" fill="#555">%s</text>`+"\n", x0-4, sy(p)+4, label)
	}
	fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#999" stroke-dasharray="2,3"/>`+"\n", sx(plotMinP), sy(plotMinP), sx(1), sy(1))
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" font-weight="bold">h = %s</text>`+"\n", x0+plotPanel/2, y0-6, hr.Horizon)
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#555">forecast</text>`+"\n", x0+plotPanel/2, y0+plotPanel+30)
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle" fill="#555" transform="rotate(-90 %.1f %.1f)">observed</text>`+"\n",
		x0-48, y0+plotPanel/2, x0-48, y0+plotPanel/2)
	for _, m := range hr.Methods {
		style, color := "", "#1f77b4"
		switch m.Method {
		case Methods[mForecast]:
		case Methods[mHourOfWeek]:
			style, color = ` stroke-dasharray="5,4"`, "#ff7f0e"
		default:
			continue
		}
		series(b, m.Reliability, sx, sy, style, color)
	}
}

// series draws one method's reliability bins as a line with points.
func series(b *bytes.Buffer, bins []metrics.ReliabilityBin, sx, sy func(float64) float64, style, color string) {
	var total int64
	for _, bin := range bins {
		total += bin.N
	}
	if total == 0 {
		return
	}
	b.WriteString(`<polyline fill="none" stroke="` + color + `" stroke-width="1.5"` + style + ` points="`)
	for _, bin := range bins {
		if bin.Observed > 0 {
			fmt.Fprintf(b, "%.1f,%.1f ", sx(bin.MeanForecast), sy(bin.Observed))
		}
	}
	b.WriteString(`"/>` + "\n")
	for _, bin := range bins {
		if bin.Observed <= 0 {
			continue
		}
		radius := 1.5 + 4*math.Sqrt(float64(bin.N)/float64(total))
		fmt.Fprintf(b, `<circle cx="%.1f" cy="%.1f" r="%.1f" fill="%s" fill-opacity="0.6"><title>forecast %.4f, observed %.4f, %d moments</title></circle>`+"\n",
			sx(bin.MeanForecast), sy(bin.Observed), radius, color, bin.MeanForecast, bin.Observed, bin.N)
	}
}
