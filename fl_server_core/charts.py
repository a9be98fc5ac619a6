"""A small server-rendered SVG line chart (no JavaScript, no external assets) for the admin."""

from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]], width: int = 640, height: int = 260, x_label: str = "round"
) -> str:
    """An SVG chart with one polyline (and points) per named series of (x, y) pairs."""
    points = [p for values in series.values() for p in values]
    if not points:
        return "<p>No metrics reported yet.</p>"
    left, right, top, bottom = 56, 150, 16, 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'style="font: 11px sans-serif; background: #fff">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{sy(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(value):.1f}" y2="{sy(value):.1f}" stroke="#eee"/>'
        )
    for x in sorted(set(xs)):
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>')
    for index, (name, values) in enumerate(sorted(series.items())):
        color = PALETTE[index % len(PALETTE)]
        ordered = sorted(values)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in ordered)
        legend_y = top + 14 * index + 8
        parts.append(f'<rect x="{width - right + 10}" y="{legend_y - 8}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{width - right + 24}" y="{legend_y + 1}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
