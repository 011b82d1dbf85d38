"""Write toy-world scenes as prepared folders, in the format ``dataset_tools.prepare`` writes (NAME.png,
NAME.mask.png with 255 = the region that trains, NAME.txt, NAME.json last), so the trainer reads them
unchanged; plus the ground truth of each scene (its objects) in the sidecar's ``"toyworld"`` record.

    python -m testkit.toyworld DEST [--seed 0] [--n 8]

writes DEST/source (the subject on plain backgrounds; mask = the subject), DEST/reference (other objects
in the style; mask = the background) and DEST/composed (the subject in the style, ground truth for what a
composed prompt should draw; mask = the subject).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from library.files.atomic import atomic_folder, write_atomic
from testkit.toyworld.sampling import composed_scene, reference_scene, source_scene
from testkit.toyworld.scenes import Scene, caption, render

TOKENS = {"source": "mcv1", "reference": "mcv2"}


def _png(path: Path, arr: np.ndarray) -> None:
    write_atomic(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def scene_record(scene: Scene, masks: list[np.ndarray]) -> list[dict]:
    """The ground truth of a rendered scene: per object its caption words ("" for the subject), shape,
    pattern, centre and half-size in pixels, and its pixel count."""
    return [
        {"words": t.words, "shape": t.look.shape, "pattern": t.look.pattern, "center": [round(t.center[0], 2), round(t.center[1], 2)],
         "half": round(t.half, 2), "pixels": int(m.sum())}
        for t, m in zip(scene.things, masks)
    ]


def write_item(folder: Path, stem: str, kind: str, scene: Scene, token: str) -> dict:
    """Render `scene` and write its four files into `folder`; returns the NAME.json record.

    The trained region: the subject's pixels for "source" and "composed", the background for
    "reference" (as ``prepare`` masks the face for a source photo and everything but the face for a
    reference one). No face is recorded (``face_box``/``landmarks`` null): the toy world has none.
    """
    image, masks, background = render(scene)
    region = background if kind == "reference" else masks[[t.words for t in scene.things].index("")]
    mask = np.where(region, 255, 0).astype(np.uint8)
    tokens = {"subject_token": TOKENS["source"]} if kind != "reference" else {}
    if kind != "source":
        tokens["style_token"] = TOKENS["reference"]
    record = {
        "image": f"{stem}.png", "kind": "source" if kind == "composed" else kind, "token": token,
        "width": image.shape[1], "height": image.shape[0], "face_box": None, "score": None, "landmarks": None,
        "mask_coverage": round(float(region.mean()), 5), "num_faces": 0, "detector": "toyworld", "rotation": 0,
        "face_angle": None, "warnings": [], "source_file": f"{stem}.png", "mask_method": "toyworld",
        "toyworld": {"objects": scene_record(scene, masks), "background_pixels": int(background.sum())},
    }
    _png(folder / f"{stem}.png", image)
    _png(folder / f"{stem}.mask.png", mask)
    write_atomic(folder / f"{stem}.txt", lambda tmp: tmp.write_text(caption(scene, **tokens), encoding="utf-8"))
    write_atomic(folder / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1), encoding="utf-8"))
    return record


MAKERS = {"source": source_scene, "reference": reference_scene, "composed": composed_scene}


def write_sets(dest: str | Path, seed: int = 0, n: int = 8) -> dict[str, Path]:
    """Write DEST/source, DEST/reference and DEST/composed with `n` scenes each from `seed` (each folder
    replaced whole, atomically); returns the three folders."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    folders = {}
    for offset, (kind, make) in enumerate(MAKERS.items()):
        rng = np.random.default_rng([seed, offset])
        token = TOKENS["reference" if kind == "reference" else "source"]
        with atomic_folder(dest / kind) as tmp:
            for i in range(n):
                write_item(tmp, f"{kind}_{i:03d}", kind, make(rng), token)
        folders[kind] = dest / kind
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the toy world's source, reference and composed sets.")
    parser.add_argument("dest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=8, help="scenes per set")
    args = parser.parse_args(argv)
    for kind, folder in write_sets(args.dest, args.seed, args.n).items():
        print(f"{kind}: {folder}")
    return 0
