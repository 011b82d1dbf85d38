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
from library.evaluation.metrics import METRICS, Evaluation

THUMB = 192  # px, long side of the thumbnails in report.html
COMPARABILITY = ("CSIM figures are comparable with the paper's (0.566) only when the identity network is "
                 "ArcFace; dlib's network embeds faces differently and its figures are on another scale.")
TABLE_COLUMNS = (("csim", "CSIM ↑"), ("style", "Masked CLIP (style) ↑"), ("aesthetic", "Aesthetic ↑"))


def metrics_dict(ev: Evaluation, folders: dict[str, str]) -> dict:
    """What metrics.json holds: folders, networks, notes, the summary and the per-image scores."""
    return {
        "folders": folders,
        "networks": ev.networks,
        "comparability": COMPARABILITY,
        "source_faces": ev.source_faces,
        "summary": ev.summary,
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
    w.writerow(("image",) + METRICS)
    for s in ev.images:
        w.writerow([s.name] + ["" if getattr(s, m) is None else
                               (int(getattr(s, m)) if isinstance(getattr(s, m), bool) else f"{getattr(s, m):.6f}")
                               for m in METRICS])
    for stat in ("mean", "std"):
        w.writerow([stat] + ["" if ev.summary[m][stat] is None else f"{ev.summary[m][stat]:.6f}" for m in METRICS])
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
               f"{_fmt(s.aesthetic, 2)}<br>face {_fmt(s.face_found)} · same person {_fmt(s.same_person)}")
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
