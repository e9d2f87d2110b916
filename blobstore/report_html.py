"""The dedup report as one self-contained HTML page: inline CSS, inline SVG
charts, no scripts, no external assets (it must open from an air-gapped node).
Pure: takes a DedupReport, returns text."""

from __future__ import annotations

import datetime as dt
from html import escape

from .dedup import DedupReport
from .progress import human_bytes

_ACCENT = "#4f46e5"
_SAVED = "#10b981"
_STORED = "#6366f1"
_MUTED = "#64748b"
_GRID = "#e2e8f0"
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
_SIDE_BY_SIDE = 8  # more apps than this: charts get the full width
_CHAR_PX = 7.0  # average glyph width of 12px text, to size label gutters

_CSS = f"""
*{{box-sizing:border-box}}
body{{margin:0;background:#f1f5f9;color:#0f172a;font:14px/1.5 {_FONT}}}
header{{background:linear-gradient(120deg,#1e1b4b,#312e81 55%,#4338ca);color:#fff;
  padding:28px 40px 72px}}
header h1{{margin:0;font-size:24px;font-weight:650;letter-spacing:-.01em}}
header p{{margin:4px 0 0;color:#c7d2fe;font-size:13px}}
main{{max-width:1240px;margin:-52px auto 40px;padding:0 40px}}
.cards{{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:16px}}
.card,.panel{{background:#fff;border-radius:12px;
  box-shadow:0 1px 2px rgba(15,23,42,.06),0 4px 16px rgba(15,23,42,.06)}}
.card{{padding:16px 20px}}
.card .k{{color:{_MUTED};font-size:12px;text-transform:uppercase;letter-spacing:.06em}}
.card .v{{font-size:26px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums}}
.card .s{{color:{_MUTED};font-size:12px}}
.card.good .v{{color:#047857}}
.grid{{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;margin-top:16px}}
.panel{{padding:20px 24px;margin-top:16px;overflow-x:auto}}
.grid .panel{{margin-top:0}}
.panel h2{{margin:0 0 2px;font-size:16px;font-weight:650}}
.panel .sub{{margin:0 0 14px;color:{_MUTED};font-size:12.5px}}
svg{{display:block;max-width:100%;height:auto}}
svg text{{font-family:{_FONT}}}
table{{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}}
th,td{{padding:7px 10px;border-bottom:1px solid {_GRID};text-align:left;vertical-align:top}}
th{{color:{_MUTED};font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em}}
td.n,th.n{{text-align:right;white-space:nowrap}}
tr:last-child td{{border-bottom:0}}
code{{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f5f9;
  padding:1px 5px;border-radius:4px;white-space:nowrap}}
code.hdr{{background:rgba(255,255,255,.14);color:#e0e7ff}}
.bar{{display:inline-block;width:64px;height:6px;background:#e0e7ff;border-radius:3px;
  margin-right:8px;vertical-align:middle;overflow:hidden}}
.bar i{{display:block;height:100%;background:{_ACCENT}}}
td.loc{{line-height:1.9;width:58%}}
td.loc code{{margin-left:4px}}
.ref{{font-weight:600}}
.pill{{display:inline-block;background:#eef2ff;color:#3730a3;border-radius:999px;
  padding:0 8px;font-size:12px;margin:1px 2px}}
.legend{{display:flex;gap:16px;color:{_MUTED};font-size:12px;margin-bottom:8px}}
.legend i{{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;
  vertical-align:-1px}}
footer{{text-align:center;color:{_MUTED};font-size:12px;margin:24px 0 8px}}
@media (max-width:900px){{.grid{{grid-template-columns:1fr}}}}
"""


def render_html(
    report: DedupReport, *, title: str = "blobstore dedup report", now: dt.datetime | None = None
) -> str:
    """Render ``report`` as one standalone HTML document."""
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    saved_pct = 100 * report.saved_bytes / report.logical_bytes if report.logical_bytes else 0.0
    refs = report.refs
    labels, pattern = display_names([r.ref for r in refs])
    naming = f" · apps shown as <code class=hdr>{escape(pattern)}</code>" if pattern else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{escape(title)}</h1>",
        f"<p>{len(refs)} ref{'s' if len(refs) != 1 else ''} · "
        f"{report.chunks:,} distinct chunks · generated {when}{naming}</p></header><main>",
        '<section class="cards">',
        _card("Logical bytes", human_bytes(report.logical_bytes), "what the files add up to"),
        _card("Stored bytes", human_bytes(report.stored_bytes), "distinct chunks, all refs"),
        _card(
            "Bytes saved",
            human_bytes(report.saved_bytes),
            f"{saved_pct:.1f}% of logical",
            good=True,
        ),
        _card("Dedup ratio", f"{report.ratio:.2f}×", "logical ÷ stored"),
        "</section>",
        '<div class="grid">' if len(refs) <= _SIDE_BY_SIDE else "<div>",
        _panel(
            "Savings per app",
            "Each bar is an app's logical size, split into what it costs in storage (its "
            "chunks; shared ones divided between the apps holding them) and what sharing saves.",
            _legend([(_STORED, "stored (attributed)"), (_SAVED, "saved by sharing")])
            + _savings_svg(report, labels, wide=len(refs) > _SIDE_BY_SIDE),
        ),
        _panel(
            "Shared bytes between apps",
            "Bytes of distinct chunks both apps hold. Colour: share of the row app's "
            "unique bytes; the diagonal is each app's unique bytes.",
            _heatmap_svg(report, labels, wide=len(refs) > _SIDE_BY_SIDE),
        ),
        "</div>",
        _panel(
            "Per app",
            "Unique: bytes of the app's distinct chunks. Exclusive: held by no other app "
            "(what deleting it would free). Attributed: shared chunks split between holders.",
            _refs_table(report),
        ),
        '<div class="grid">',
        _panel(
            "Chunk refcount histogram",
            "Distinct chunks by how many apps hold them; bar height is bytes, "
            "the label above a bar is its chunk count.",
            _histogram_svg(report),
        ),
        _panel(
            "Pairs that share the most",
            "Bytes of distinct chunks both apps hold.",
            _pairs_table(report, labels),
        ),
        "</div>",
        _panel(
            "Files that share the most",
            "Identical copies grouped; shared bytes are the chunks some other file also holds.",
            _files_table(report),
        ),
        "<footer>blobstore · content-addressed chunks (FastCDC + BLAKE3)</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- blocks


def _card(key: str, value: str, sub: str, *, good: bool = False) -> str:
    cls = "card good" if good else "card"
    return (
        f'<div class="{cls}"><div class="k">{escape(key)}</div>'
        f'<div class="v">{escape(value)}</div><div class="s">{escape(sub)}</div></div>'
    )


def _panel(title: str, sub: str, body: str) -> str:
    return (
        f'<section class="panel"><h2>{escape(title)}</h2>'
        f'<p class="sub">{escape(sub)}</p>{body}</section>'
    )


def _legend(items: list[tuple[str, str]]) -> str:
    spans = "".join(f'<span><i style="background:{c}"></i>{escape(t)}</span>' for c, t in items)
    return f'<div class="legend">{spans}</div>'


def display_names(names: list[str]) -> tuple[list[str], str]:
    """Drop the path components every name shares at the start and the end
    (``apps/x/data`` -> ``x``) so charts stay readable; return the short names and
    a pattern describing what was dropped (empty if nothing was)."""
    split = [n.split("/") for n in names]
    if len(split) < 2:
        return list(names), ""
    shortest = min(len(p) for p in split)
    head = 0
    while head < shortest - 1 and len({p[head] for p in split}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head - 1 and len({p[-1 - tail] for p in split}) == 1:
        tail += 1
    short = ["/".join(p[head : len(p) - tail]) for p in split]
    if len(set(short)) != len(short) or (head == 0 and tail == 0):
        return list(names), ""
    pattern = "/".join([*split[0][:head], "*", *split[0][len(split[0]) - tail :]])
    return short, pattern


def _short(name: str, limit: int) -> str:
    """Shorten in the middle: both the start and the end of a name tell apps apart."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) * 3 // 5
    return name[: limit - 1 - tail] + "…" + name[-tail:]


def _label(name: str, shown: str, limit: int) -> str:
    """An SVG label, shortened, with the full name as a tooltip."""
    return f"<title>{escape(name)}</title>{escape(_short(shown, limit))}"


def _empty(msg: str) -> str:
    return f'<p class="sub">{escape(msg)}</p>'


# --------------------------------------------------------------------------- charts


def _savings_svg(report: DedupReport, labels: list[str], *, wide: bool = False) -> str:
    refs = report.refs
    if not refs:
        return _empty("No refs.")
    limit = 26
    gutter = min(limit, max(len(t) for t in labels)) * _CHAR_PX + 16
    width, bar_h, gap, right = (1100 if wide else 560), 26, 16, 104
    plot = width - gutter - right
    top = max(r.logical_bytes for r in refs) or 1
    height = len(refs) * (bar_h + gap) + 8
    out = [_svg_open(width, height, "Savings per app")]
    for k, r in enumerate(refs):
        y = 4 + k * (bar_h + gap)
        stored_w = plot * r.attributed_bytes / top
        saved_w = plot * max(r.saved_bytes, 0) / top
        pct = 100 * r.saved_bytes / r.logical_bytes if r.logical_bytes else 0.0
        out.append(
            f'<text x="{gutter - 10:.0f}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="end" '
            f'font-size="12" fill="#0f172a">{_label(r.ref, labels[k], limit)}</text>'
        )
        out.append(
            f'<rect x="{gutter:.0f}" y="{y}" width="{plot:.1f}" height="{bar_h}" rx="4" '
            f'fill="#f1f5f9"/>'
        )
        tip = (
            f"{r.ref}: {human_bytes(r.logical_bytes)} logical, "
            f"{human_bytes(r.attributed_bytes)} stored, {human_bytes(r.saved_bytes)} saved"
        )
        out.append(
            f"<g><title>{escape(tip)}</title>"
            f'<rect x="{gutter:.0f}" y="{y}" width="{stored_w:.1f}" height="{bar_h}" rx="4" '
            f'fill="{_STORED}"/>'
            f'<rect x="{gutter + stored_w:.1f}" y="{y}" width="{saved_w:.1f}" height="{bar_h}" '
            f'rx="4" fill="{_SAVED}"/></g>'
        )
        out.append(
            f'<text x="{gutter + plot + 8:.0f}" y="{y + bar_h / 2 - 2:.1f}" font-size="12" '
            f'font-weight="600" fill="#047857">{escape(human_bytes(r.saved_bytes))}</text>'
            f'<text x="{gutter + plot + 8:.0f}" y="{y + bar_h / 2 + 11:.1f}" font-size="10.5" '
            f'fill="{_MUTED}">{pct:.0f}% of {escape(human_bytes(r.logical_bytes))}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _heat_colour(frac: float) -> str:
    """White -> indigo, perceptually even enough for a 0..1 share."""
    frac = min(max(frac, 0.0), 1.0)
    lo, hi = (238, 242, 255), (49, 46, 129)
    r, g, b = (round(a + (z - a) * frac**0.8) for a, z in zip(lo, hi, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _heatmap_svg(report: DedupReport, labels: list[str], *, wide: bool = False) -> str:
    refs = report.refs
    n = len(refs)
    if n == 0:
        return _empty("No refs.")
    limit = 22
    label_w = min(limit, max(len(t) for t in labels)) * _CHAR_PX + 12
    cell = max(28.0, min(72.0, (820 if wide else 420) / n))
    top = label_w * 0.72 + 8  # rotated column labels
    lw = 200.0  # legend width
    width = max(label_w + n * cell + label_w * 0.72 + 8, label_w + lw + 16)
    height = top + n * cell + 44
    out = [_svg_open(width, height, "Shared bytes between apps")]
    for j, r in enumerate(refs):
        x = label_w + j * cell + cell / 2
        out.append(
            f'<text transform="translate({x:.1f},{top - 8:.1f}) rotate(-45)" font-size="12" '
            f'fill="#0f172a">{_label(r.ref, labels[j], limit)}</text>'
        )
    for i, a in enumerate(refs):
        y = top + i * cell
        out.append(
            f'<text x="{label_w - 8:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="end" '
            f'font-size="12" fill="#0f172a">{_label(a.ref, labels[i], limit)}</text>'
        )
        for j, b in enumerate(refs):
            x = label_w + j * cell
            shared = report.shared[i][j]
            frac = shared / a.unique_bytes if a.unique_bytes else 0.0
            fill = "#e2e8f0" if i == j else _heat_colour(frac)
            ink = "#fff" if i != j and frac > 0.45 else "#0f172a"
            tip = (
                f"{a.ref}: {human_bytes(shared)} unique"
                if i == j
                else f"{a.ref} ∩ {b.ref}: {human_bytes(shared)} ({100 * frac:.1f}% of {a.ref})"
            )
            out.append(
                f'<g><title>{escape(tip)}</title><rect x="{x + 1:.1f}" y="{y + 1:.1f}" '
                f'width="{cell - 2:.1f}" height="{cell - 2:.1f}" rx="4" fill="{fill}"/>'
            )
            if cell >= 44:
                text = human_bytes(shared) if shared else "–"
                out.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                    f'text-anchor="middle" font-size="{10.5 if cell < 60 else 11.5}" '
                    f'fill="{ink}">{escape(text)}</text>'
                )
            out.append("</g>")
    # Legend: a gradient bar 0% .. 100% of the row app's unique bytes.
    ly = top + n * cell + 18
    lx = label_w
    steps = 20
    for s in range(steps):
        out.append(
            f'<rect x="{lx + s * lw / steps:.1f}" y="{ly:.1f}" width="{lw / steps + 0.5:.1f}" '
            f'height="8" fill="{_heat_colour(s / (steps - 1))}"/>'
        )
    out.append(
        f'<text x="{lx:.1f}" y="{ly + 22:.1f}" font-size="10.5" fill="{_MUTED}">0%</text>'
        f'<text x="{lx + lw:.1f}" y="{ly + 22:.1f}" font-size="10.5" text-anchor="end" '
        f'fill="{_MUTED}">100% of row app</text>'
    )
    out.append("</svg>")
    return "".join(out)


def _histogram_svg(report: DedupReport) -> str:
    bins = report.histogram
    if not bins:
        return _empty("No chunks.")
    width, height = 520, 250
    left, right, top, bottom = 64, 12, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = _nice_ceiling(max(b.bytes for b in bins) * 1.12)
    slot = plot_w / len(bins)
    bar_w = min(64.0, slot * 0.7)
    out = [_svg_open(width, height, "Chunk refcount histogram")]
    for t in range(5):
        v = peak * t / 4
        y = top + plot_h - plot_h * t / 4
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{_GRID}"/><text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" '
            f'font-size="10.5" fill="{_MUTED}">{escape(human_bytes(v))}</text>'
        )
    for k, b in enumerate(bins):
        h = plot_h * b.bytes / peak
        x = left + k * slot + (slot - bar_w) / 2
        y = top + plot_h - h
        fill = _MUTED if b.refcount == 1 else _ACCENT
        tip = f"held by {b.refcount}: {b.chunks:,} chunks, {human_bytes(b.bytes)}"
        out.append(
            f'<g><title>{escape(tip)}</title><rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
            f'height="{max(h, 1):.1f}" rx="3" fill="{fill}"/></g>'
            f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16:.1f}" text-anchor="middle" '
            f'font-size="12" fill="#0f172a">{b.refcount}</text>'
            f'<text x="{x + bar_w / 2:.1f}" y="{max(y - 5, top + 10):.1f}" text-anchor="middle" '
            f'font-size="10.5" fill="{_MUTED}">{b.chunks:,}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
        f'font-size="11.5" fill="{_MUTED}">apps holding the chunk (label above bar: '
        f"chunks)</text></svg>"
    )
    return "".join(out)


def _nice_ceiling(v: float) -> float:
    """The smallest round step x 1024^k x 10^m at or above ``v``: an axis top that
    four grid lines divide into round numbers."""
    if v <= 0:
        return 1.0
    unit = 1.0
    while v / unit >= 1024:
        unit *= 1024
    mag = 1.0
    while v / unit / mag >= 10:
        mag *= 10
    for step in (1, 1.2, 1.6, 2, 2.4, 3.2, 4, 6, 8, 10):
        if step * mag * unit >= v:
            return step * mag * unit
    return 10 * mag * unit


def _svg_open(width: float, height: float, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
    )


# --------------------------------------------------------------------------- tables


def _refs_table(report: DedupReport) -> str:
    rows = [
        "<table><tr><th>app</th><th class=n>files</th><th class=n>chunks</th>"
        "<th class=n>logical</th><th class=n>unique</th><th class=n>exclusive</th>"
        "<th class=n>attributed</th><th class=n>saved</th><th class=n>saved %</th></tr>"
    ]
    for r in report.refs:
        pct = 100 * r.saved_bytes / r.logical_bytes if r.logical_bytes else 0.0
        rows.append(
            f'<tr><td class="ref">{escape(r.ref)}</td>'
            f"<td class=n>{r.files:,}</td><td class=n>{r.chunks:,}</td>"
            f"<td class=n>{human_bytes(r.logical_bytes)}</td>"
            f"<td class=n>{human_bytes(r.unique_bytes)}</td>"
            f"<td class=n>{human_bytes(r.exclusive_bytes)}</td>"
            f"<td class=n>{human_bytes(r.attributed_bytes)}</td>"
            f"<td class=n>{human_bytes(r.saved_bytes)}</td>"
            f"<td class=n>{pct:.1f}%</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _pairs_table(report: DedupReport, labels: list[str], limit: int = 8) -> str:
    n = len(report.refs)
    pairs = sorted(
        ((report.shared[i][j], i, j) for i in range(n) for j in range(i + 1, n)),
        reverse=True,
    )
    pairs = [p for p in pairs if p[0] > 0][:limit]
    if not pairs:
        return _empty("No two apps share a chunk.")
    rows = ["<table><tr><th>apps</th><th class=n>shared</th><th class=n>of smaller</th></tr>"]
    for shared, i, j in pairs:
        smaller = min(report.refs[i].unique_bytes, report.refs[j].unique_bytes) or 1
        pct = 100 * shared / smaller
        rows.append(
            f'<tr><td><span class="ref" title="{escape(report.refs[i].ref)}">'
            f"{escape(_short(labels[i], 30))}</span> ↔ "
            f'<span class="ref" title="{escape(report.refs[j].ref)}">'
            f"{escape(_short(labels[j], 30))}</span></td>"
            f"<td class=n>{human_bytes(shared)}</td>"
            f'<td class=n><span class="bar"><i style="width:{pct:.0f}%"></i></span>'
            f"{pct:.0f}%</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _files_table(report: DedupReport) -> str:
    if not report.top_files:
        return _empty("No file shares a chunk with another file.")
    rows = [
        "<table><tr><th class=n>shared</th><th class=n>size</th><th class=n>copies</th>"
        "<th>where</th><th>also shares chunks with</th></tr>"
    ]
    for f in report.top_files:
        shown = f.locations[:4]
        where = "<br>".join(
            f'<span class="ref">{escape(r)}</span> <code>{escape(p)}</code>' for r, p in shown
        )
        if len(f.locations) > len(shown):
            where += f'<br><span class="sub">+{len(f.locations) - len(shown)} more</span>'
        pills = "".join(f'<span class="pill">{escape(r)}</span>' for r in f.shared_with) or "–"
        rows.append(
            f"<tr><td class=n>{human_bytes(f.shared_bytes)}</td>"
            f"<td class=n>{human_bytes(f.size)}</td><td class=n>{len(f.locations)}</td>"
            f'<td class="loc">{where}</td><td>{pills}</td></tr>'
        )
    rows.append("</table>")
    return "".join(rows)
