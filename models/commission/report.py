"""Stage 5 — report.json and a self-contained report.html (figures as inline PNGs, no external links).

The report says what data was used (counts and Series Instance UIDs only, never patient data), the
split, each gate signal's normal range at this site next to the shipped gate's, the false-flag rate
of the held-out normals with its exact 95 % CI, the segmenter's Dice, the candidate versions and the
exact next steps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any


def signal_ranges(site_gate: dict[str, Any], shipped_gate: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per signal: the normals' range (min, median, p95, max) and threshold here and in the shipped gate."""
    rows = []
    shipped_signals = (shipped_gate or {}).get("signals", {})
    for name, spec in site_gate.get("signals", {}).items():
        other = shipped_signals.get(name) or {}
        rows.append(
            {
                "signal": name,
                "site": {**spec.get("normals", {}), "threshold": spec.get("threshold"), "n": spec.get("n")},
                "shipped": {**other.get("normals", {}), "threshold": other.get("threshold"), "n": other.get("n")}
                if other
                else None,
            }
        )
    return rows


def next_steps(candidates: dict[str, str | None], shadow_days: int) -> list[str]:
    """The commands that take the candidates from here to the clinic, in order.

    Shadow mode runs the *active* models on live traffic and sends nothing, so the candidates are
    promoted with the service in shadow mode, judged after `shadow_days` days, then either the service
    goes live or the promotion is rolled back.
    """
    kinds = [k for k in ("detector", "gate", "segmenter") if candidates.get(k)]
    steps = [
        "Read this report and sign it off (medical physicist): the false-flag rate's upper CI bound must be "
        "acceptable for the clinic's manual-contouring capacity, and no held-out series with a poor Dice "
        "may have gone through the gate.",
        *(f"gatekeeper models list --kind {k}" for k in kinds),
        "Set GATEKEEPER_MODE=shadow and restart the service (nothing is sent to the PACS).",
        *(f"gatekeeper models promote {k} {candidates[k]} --by YOUR_NAME" for k in kinds if k != "segmenter"),
        f"Run in shadow mode for {shadow_days} days, with the dosimetrists answering the shadow reviews.",
        "gatekeeper report shadow",
        "If the shadow report is acceptable: GATEKEEPER_MODE=live and restart; otherwise "
        + " and ".join(f"gatekeeper models rollback {k} --by YOUR_NAME" for k in kinds if k != "segmenter")
        + ".",
    ]
    if candidates.get("segmenter"):
        steps.append(
            f"The fine-tuned segmenter {candidates['segmenter']} is a separate decision: the site's gate was "
            "calibrated with the active segmenter, so promoting it needs a gate calibrated on it "
            "(gatekeeper calibrate gate --segmenter FOLDER on the same gate-calibration series) and its own "
            "shadow period."
        )
    return steps


def _reasons(counts: dict[str, int]) -> str:
    """ "gate_evidence 2, metal 1" (escaped), or "none" when no normal was flagged."""
    return html.escape(", ".join(f"{k} {v}" for k, v in sorted(counts.items()))) if counts else "none"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figures(report: dict[str, Any], outcomes: list[dict[str, Any]]) -> dict[str, str]:
    """Base64 PNGs: the fused statistic of every reported series against the cut, and Dice per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(6, 3))
    for group, colour in (("normal", "tab:blue"), ("abnormal", "tab:red")):
        values = [o["fused"] for o in outcomes if o["group"] == group and o["fused"] is not None]
        if values:
            ax.hist(values, bins=20, alpha=0.6, color=colour, label=f"{group} ({len(values)})")
    cut = report["gate"].get("fused_threshold")
    if cut is not None:
        ax.axvline(cut, color="k", linestyle="--", label=f"cut {cut:.2f}")
    ax.set_xlabel("fused statistic (−log10 smallest tail probability)")
    ax.set_ylabel("series")
    ax.legend(fontsize=8)
    out["fused"] = _png(fig)
    plt.close(fig)
    rows = report["evaluation"]["segmenter"]["per_series"]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3))
        x = range(len(rows))
        ax.scatter(x, [r["dice"] for r in rows], label="active segmenter", marker="o")
        if any(r["candidate_dice"] is not None for r in rows):
            ax.scatter(x, [r["candidate_dice"] or math.nan for r in rows], label="fine-tuned", marker="x")
        for i, r in enumerate(rows):
            if r["gate"] == "manual":
                ax.annotate("manual", (i, r["dice"]), fontsize=7)
        ax.set_xlabel("held-out contoured series")
        ax.set_ylabel("Dice")
        ax.legend(fontsize=8)
        out["dice"] = _png(fig)
        plt.close(fig)
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return html.escape(str(v))


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def render_html(report: dict[str, Any], images: dict[str, str]) -> str:
    """report.html: one page, inline CSS and images, nothing fetched from elsewhere."""
    ev = report["evaluation"]
    split = report["split"]
    lo, hi = ev["false_flag_rate_ci95"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Commissioning report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}</style></head><body>",
        "<h1>Commissioning report</h1>",
        f"<p>Created {html.escape(report['created'])} by <code>{html.escape(report['command'])}</code>; "
        f"wall time {report['wall_seconds']:.0f} s.</p>",
        "<h2>Data and split (patient-wise)</h2>",
        f"<p>{report['data']['normal_series']} normal series, {report['data']['contoured_series']} with liver "
        f"contours, {report['data']['abnormal_series']} known-abnormal; {report['data']['skipped_series']} "
        f"unreadable left out. Protocol minimum: {html.escape(split['minimum'])}.</p>",
        "<table><tr><th>role</th><th>patients</th><th>series</th></tr>",
        *(
            f"<tr><td>{html.escape(r)}</td><td>{split['patients'][r]}</td><td>{split['series'][r]}</td></tr>"
            for r in split["series"]
        ),
        "</table>",
        "<h2>False flags of held-out normals</h2>",
        f"<p><b>{ev['false_flags']} of {ev['held_out_normals']}</b> held-out normal series were sent to manual "
        f"contouring: {_pct(ev['false_flag_rate'])} (exact 95 % CI {_pct(lo)} – {_pct(hi)}); target "
        f"{_pct(ev['target_false_flag_rate'])}. Reasons: {_reasons(ev['false_flag_reasons'])}.</p>",
    ]
    if "fused" in images:
        parts.append(f"<img alt='fused statistic' src='data:image/png;base64,{images['fused']}'>")
    if "abnormal" in ev:
        a = ev["abnormal"]
        parts.append(
            f"<p>Known-abnormal series: {a['sent_to_manual']} of {a['series']} sent to manual (recall "
            f"{_pct(a['recall'])}, 95 % CI {_pct(a['recall_ci95'][0])} – {_pct(a['recall_ci95'][1])}).</p>"
        )
    seg = ev["segmenter"]
    parts.append("<h2>Segmenter Dice against the site's contours (held-out)</h2>")
    if seg["contoured_held_out"]:
        parts.append(
            f"<p>Active segmenter: mean Dice {_fmt(seg['dice_mean'])} (min {_fmt(seg['dice_min'])}) on "
            f"{seg['contoured_held_out']} series.</p>"
        )
        if "difference_mean" in seg:
            ci = seg["difference_ci95"]
            parts.append(
                f"<p>Fine-tuned segmenter: mean Dice {_fmt(seg['candidate_dice_mean'])}; difference "
                f"{_fmt(seg['difference_mean'])} (paired bootstrap 95 % CI {_fmt(ci[0])} … {_fmt(ci[1])}).</p>"
            )
        parts.append("<table><tr><th>series</th><th>Dice</th><th>gate</th><th>reason</th><th>fine-tuned</th></tr>")
        for r in seg["per_series"]:
            parts.append(
                f"<tr><td>{html.escape(r['series_instance_uid'])}</td><td>{_fmt(r['dice'])}</td>"
                f"<td>{r['gate']}</td><td>{_fmt(r['reason'])}</td><td>{_fmt(r['candidate_dice'])}</td></tr>"
            )
        parts.append("</table>")
        if "dice" in images:
            parts.append(f"<img alt='Dice per series' src='data:image/png;base64,{images['dice']}'>")
    else:
        parts.append("<p>No held-out series has a contour (give --contours to measure Dice).</p>")
    parts.append("<h2>Each signal's normal range: this site and the shipped gate</h2>")
    parts.append(
        "<table><tr><th>signal</th><th>site min</th><th>median</th><th>p95</th><th>max</th><th>threshold</th>"
        "<th>shipped median</th><th>p95</th><th>threshold</th></tr>"
    )
    for row in report["signals"]:
        s, o = row["site"], row["shipped"] or {}
        parts.append(
            f"<tr><td>{html.escape(row['signal'])}</td><td>{_fmt(s.get('min'))}</td><td>{_fmt(s.get('p50'))}</td>"
            f"<td>{_fmt(s.get('p95'))}</td><td>{_fmt(s.get('max'))}</td><td>{_fmt(s.get('threshold'))}</td>"
            f"<td>{_fmt(o.get('p50'))}</td><td>{_fmt(o.get('p95'))}</td><td>{_fmt(o.get('threshold'))}</td></tr>"
        )
    parts.append("</table><h2>Candidate models (registered, not active)</h2><ul>")
    for kind, version in report["candidates"].items():
        why = report["not_trained"].get(kind, "")
        parts.append(f"<li>{kind}: <code>{_fmt(version)}</code> {html.escape(why)}</li>")
    parts.append("</ul><h2>No leakage</h2><p>" + html.escape(report["leakage"]) + "</p>")
    parts.append("<h2>Next steps</h2><ol>")
    parts += [f"<li><code>{html.escape(s)}</code></li>" if s.startswith("gatekeeper") else f"<li>{html.escape(s)}</li>"
              for s in report["next_steps"]]  # fmt: skip
    parts.append("</ol></body></html>\n")
    return "\n".join(parts)


def write_report(out: Path, report: dict[str, Any], outcomes: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write report.json (with every reported series' outcome) and report.html to `out`."""
    doc = {**report, "series": outcomes}
    json_path = out / "report.json"
    json_path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    html_path = out / "report.html"
    html_path.write_text(render_html(report, figures(report, outcomes)))
    return json_path, html_path
