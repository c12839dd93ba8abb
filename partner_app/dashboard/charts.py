"""Charts drawn on the server as inline SVG: no script, no external service, no inline
style (colours come from classes in ``static/app.css``, which the CSP allows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape


@dataclass(frozen=True)
class Bar:
    label: str  # under the bar (may be empty to thin out the axis)
    value: int
    title: str  # the tooltip and the accessible text of the bar


def bar_chart(bars: Sequence[Bar], *, caption: str, width: int = 720,
              height: int = 180) -> Markup:
    """A bar chart scaled to its largest value, with a labelled y-axis maximum.

    Each bar carries a ``<title>`` (hover text, read by screen readers) and the whole
    chart an ``aria-label`` naming what it shows and its total.
    """
    top, bottom, left, right = 12, 22, 36, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((b.value for b in bars), default=0)
    scale_max = max(peak, 1)
    slot = plot_w / max(len(bars), 1)
    gap = min(4.0, slot * 0.2)
    total = sum(b.value for b in bars)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(caption)}: {total} in total">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" '
        f'y2="{top + plot_h}"/>',
        f'<text class="tick" x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    if peak:
        parts.append(f'<text class="tick" x="{left - 6}" y="{top + 4}" '
                     f'text-anchor="end">{peak}</text>')
    for i, bar in enumerate(bars):
        h = plot_h * bar.value / scale_max
        x = left + i * slot + gap / 2
        y = top + plot_h - h
        parts.append(
            f'<g class="bar-group"><title>{escape(bar.title)}</title>'
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot - gap:.1f}" '
            f'height="{max(h, 0):.1f}" data-value="{bar.value}"/></g>')
        if bar.label:
            parts.append(f'<text class="tick" x="{x + (slot - gap) / 2:.1f}" '
                         f'y="{height - 6}" text-anchor="middle">{escape(bar.label)}</text>')
    parts.append("</svg>")
    # Every interpolated text went through escape(); the rest is numbers and constants.
    return Markup("".join(parts))  # noqa: S704
