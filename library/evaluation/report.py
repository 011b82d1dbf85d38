"""`metrics.json`, `metrics.csv` and `report.html` of an evaluation, each written atomically.

report.html is one self-contained file: thumbnails are embedded as JPEG data URIs, so it can be moved
or mailed alone. Its summary table has the paper's Table 1 layout (a row per method, columns CSIM,
masked-CLIP style, aesthetic; mean ± std).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from library.files.atomic import write_text
from library.evaluation.folders import EvalImage
from library.evaluation.head_pose import PITCH_EDGE, YAW_EDGE
from library.evaluation.metrics import METRICS, Evaluation

POSE_COLUMNS = ("yaw", "pitch", "pose")
THUMB = 192  # px, long side of the thumbnails in report.html
COMPARABILITY = ("CSIM figures are comparable with the paper's (0.566) only when the identity network is "
                 "ArcFace; dlib's network embeds faces differently and its figures are on another scale.")
POSE_NOTE = (f"Pose bins: left/right when |yaw| >= {YAW_EDGE:g} degrees (the nose towards the image's left/right), "
             f"up/down when |pitch| >= {PITCH_EDGE:g}, else frontal; from dlib's 5 points, pitch within about 15 degrees.")
TABLE_COLUMNS = (("csim", "CSIM ↑"), ("style", "Masked CLIP (style) ↑"), ("aesthetic", "Aesthetic ↑"))


def metrics_dict(ev: Evaluation, folders: dict[str, str]) -> dict:
    """What metrics.json holds: folders, networks, notes, the summary and the per-image scores."""
    return {
        "folders": folders,
        "networks": ev.networks,
        "comparability": COMPARABILITY,
        "source_faces": ev.source_faces,
        "summary": ev.summary,
        "likeness": ev.likeness,
        "images": [vars(s) for s in ev.images],
        "notes": ev.notes,
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}"


def _mean_std(entry: dict) -> str:
    return "skipped" if entry["mean"] is None else f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def write_csv(path: Path, ev: Evaluation) -> None:
    """One row per generated image, then `mean` and `std` rows; empty cells where a metric was skipped."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("image",) + METRICS + POSE_COLUMNS)
    for s in ev.images:
        w.writerow([s.name] + ["" if getattr(s, m) is None else
                               (int(getattr(s, m)) if isinstance(getattr(s, m), bool) else f"{getattr(s, m):.6f}")
                               for m in METRICS]
                   + ["" if s.yaw is None else f"{s.yaw:.1f}", "" if s.pitch is None else f"{s.pitch:.1f}", s.pose or ""])
    for stat in ("mean", "std"):
        w.writerow([stat] + ["" if ev.summary[m][stat] is None else f"{ev.summary[m][stat]:.6f}" for m in METRICS]
                   + [""] * len(POSE_COLUMNS))
    write_text(path, buf.getvalue())


def _thumb(rgb: np.ndarray) -> str:
    im = Image.fromarray(rgb)
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(item: EvalImage, caption: str) -> str:
    name = html.escape(item.path.name)
    return (f'<figure data-name="{name}"><img src="{_thumb(item.rgb)}" alt="{name}">'
            f"<figcaption>{caption}</figcaption></figure>")


def likeness_lines(likeness: dict) -> list[str]:
    """evaluate.py's printed likeness: identity, copy score and share, identity per pose bin, the least
    consistent source photo; [] without."""
    if not likeness or likeness["identity"] is None:
        return []
    share = likeness["copy_share"]
    lines = [f"identity (centroid): {likeness['identity']:.3f} | copy score {likeness['copy']:.3f} | copy share "
             + ("not measured (one source face)" if share is None else  # faces exist here: None means no ceiling
                f"{share:.0%} (nearest source photo above the photos' own highest pairwise {likeness['ceiling']:.3f})")]
    lines.append("poses: " + ", ".join(f"{name} {b['n']}" + ("" if b["identity"] is None else f" (identity {b['identity']:.3f})")
                                       for name, b in likeness["poses"].items()))
    loo = [s for s in likeness["sources"] if s["leave_one_out"] is not None]
    if loo:
        low = min(loo, key=lambda s: s["leave_one_out"])
        lines.append(f"source photos against the others' centroid: {min(s['leave_one_out'] for s in loo):.3f} to "
                     f"{max(s['leave_one_out'] for s in loo):.3f} (least consistent: {low['name']})")
    return lines


def likeness_html(likeness: dict) -> str:
    """report.html's likeness part: centroid identity, copy score and share (table id="likeness"), identity
    per pose bin (id="poses") and each source photo's leave-one-out identity (id="sources"); "" without."""
    if not likeness:
        return ""
    e = html.escape
    ceiling = likeness["ceiling"]
    share = likeness["copy_share"]
    rows = [("identity (cosine with the source faces' centroid)", _fmt(likeness["identity"])),
            ("copy score (nearest source face minus centroid)", _fmt(likeness["copy"])),
            ("copy share (nearer to one source photo than any two source photos are)",
             "not measured (one source face)" if ceiling is None else ("-" if share is None else f"{share:.0%}")),
            ("source photos' highest pairwise cosine (the copy ceiling)", _fmt(ceiling))]
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    poses = "".join(f"<tr><th>{e(name)}</th><td>{b['n']}</td><td>{_fmt(b['identity'])}</td></tr>"
                    for name, b in likeness["poses"].items())
    sources = "".join(f"<tr><th>{e(s['name'])}</th><td>{_fmt(s['leave_one_out'])}</td></tr>" for s in likeness["sources"])
    return (f'<h2>Likeness</h2><table id="likeness">{table}</table>'
            f'<p>{e(POSE_NOTE)}</p><table id="poses"><tr><th>pose</th><th>faces</th><th>identity</th></tr>{poses}</table>'
            f'<p>Each source photo against the centroid of the others (how consistent the photos are):</p>'
            f'<table id="sources">{sources}</table>')


def render_html(ev: Evaluation, generated: list[EvalImage], source: list[EvalImage], reference: list[EvalImage],
                folders: dict[str, str], method: str = "this run") -> str:
    """report.html's text: the summary table (id="summary"), then every generated image with its scores
    (section id="generated"), the source and the reference sets."""
    e = html.escape
    head = "".join(f"<th>{e(title)}</th>" for _, title in TABLE_COLUMNS)
    row = "".join(f"<td>{e(_mean_std(ev.summary[key]))}</td>" for key, _ in TABLE_COLUMNS)
    shares = ""
    for key, label in (("face_found", "face found"), ("same_person", "same person (network's threshold)")):
        mean = ev.summary[key]["mean"]
        shares += f"<tr><th>{e(label)}</th><td>{'skipped' if mean is None else f'{mean:.0%}'}</td></tr>"
    nets = "".join(f"<li>{e(k)}: {e(v or 'skipped')}</li>" for k, v in ev.networks.items())
    notes = "".join(f"<li>{e(n)}</li>" for n in ev.notes)
    by_name = {s.name: s for s in ev.images}
    figs = []
    for item in generated:
        s = by_name[item.path.name]
        cap = (f"{e(item.path.name)}<br>CSIM {_fmt(s.csim)} · style {_fmt(s.style)} · aesthetic "
               f"{_fmt(s.aesthetic, 2)}<br>face {_fmt(s.face_found)} · same person {_fmt(s.same_person)}"
               f"<br>identity {_fmt(s.identity)} · copy {_fmt(s.copy)}{' (copied: ' + e(s.nearest or '') + ')' if s.copied else ''}"
               f"<br>pose {e(s.pose or '-')} (yaw {_fmt(s.yaw, 0)}°, pitch {_fmt(s.pitch, 0)}°)")
        figs.append(_figure(item, cap))
    src = "".join(_figure(i, e(i.path.name)) for i in source)
    ref = "".join(_figure(i, e(i.path.name)) for i in reference)
    where = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in folders.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>MagiCapture evaluation</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}} td,th{{border:1px solid #999;padding:4px 8px}}
figure{{display:inline-block;margin:4px;vertical-align:top;font-size:12px;max-width:{THUMB}px}}</style></head><body>
<h1>MagiCapture evaluation</h1>
<table id="summary"><thead><tr><th>Method</th>{head}</tr></thead><tbody><tr><th>{e(method)}</th>{row}</tr></tbody></table>
<table id="shares">{shares}</table>
<p>Networks:</p><ul id="networks">{nets}</ul>
<p>{e(COMPARABILITY)}</p>
<ul id="folders">{where}</ul>
<ul id="notes">{notes}</ul>
{likeness_html(ev.likeness)}
<h2>Generated ({len(generated)})</h2><section id="generated">{''.join(figs)}</section>
<h2>Source ({len(source)})</h2><section id="source">{src}</section>
<h2>Reference ({len(reference)})</h2><section id="reference">{ref}</section>
</body></html>
"""


def write_outputs(out_dir: str | os.PathLike, ev: Evaluation, generated: list[EvalImage], source: list[EvalImage],
                  reference: list[EvalImage], folders: dict[str, str]) -> list[Path]:
    """Write metrics.json, metrics.csv and report.html into `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "metrics.json", out / "metrics.csv", out / "report.html"]
    write_text(paths[0], json.dumps(metrics_dict(ev, folders), indent=2, ensure_ascii=False) + "\n")
    write_csv(paths[1], ev)
    write_text(paths[2], render_html(ev, generated, source, reference, folders))
    return paths
