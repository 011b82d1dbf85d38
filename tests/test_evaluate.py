"""evaluate.py and library/evaluation: CLIP style and aesthetic loaders in their real formats, the
metrics' pinned values, the skip lines, the report; CSIM with dlib's real network on real photos."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.evaluation.clip_scores import (
    ClipImageEmbedder,
    ScoreWeightsError,
    aesthetic_mlp,
    aesthetic_scores,
    load_aesthetic,
)
from library.evaluation.folders import EvalImage, FolderError, read_folder
from library.evaluation.metrics import evaluate_images

# the improved-aesthetic-predictor's state dict keys (simple_inference.py's MLP.layers)
AESTHETIC_KEYS = sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random-weight CLIP vision tower with projection, saved as transformers saves the real one."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, projection_dim=768)
    folder = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def aesthetic_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(aesthetic_mlp(768).state_dict(), path)
    return path


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _insightface_image(name: str) -> np.ndarray:
    import importlib.util

    from library.files.images import read_image

    folder = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data" / "images"
    return np.asarray(read_image(folder / name).image)


def _ellipse(shape, box) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    x0, y0, x1, y1 = box
    return ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1


ASTRONAUT_FACE = (165, 55, 285, 205)  # x0, y0, x1, y1: the astronaut's face in skimage's 512 px photo


def test_aesthetic_layout_and_value(aesthetic_file, clip_dir):
    """The head loads from the real key layout; its score is the five affine maps of the normalised embedding."""
    sd = torch.load(aesthetic_file, weights_only=True)
    assert sorted(sd) == AESTHETIC_KEYS
    clip = ClipImageEmbedder(clip_dir)
    assert clip.dim == 768
    mlp = load_aesthetic(aesthetic_file, clip.dim)
    emb = clip.embed([_astronaut()])
    assert abs(np.linalg.norm(emb[0]) - 1.0) < 1e-5
    x = emb[0].astype(np.float64)
    for i in (0, 2, 4, 6, 7):  # no activations between the layers, dropout is off in eval
        x = sd[f"layers.{i}.weight"].double().numpy() @ x + sd[f"layers.{i}.bias"].double().numpy()
    assert aesthetic_scores(mlp, emb)[0] == pytest.approx(x[0], abs=1e-4)


def test_aesthetic_bad_files(tmp_path, aesthetic_file):
    sd = torch.load(aesthetic_file, weights_only=True)
    torch.save({k.replace("layers", "net"): v for k, v in sd.items()}, tmp_path / "other.pth")
    with pytest.raises(ScoreWeightsError, match="not the improved aesthetic predictor's MLP"):
        load_aesthetic(tmp_path / "other.pth", 768)
    with pytest.raises(ScoreWeightsError, match="takes 768-d CLIP embeddings, the CLIP model gives 512-d"):
        load_aesthetic(aesthetic_file, 512)
    with pytest.raises(ScoreWeightsError, match="file not found"):
        load_aesthetic(tmp_path / "missing.pth", 768)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"layers.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ScoreWeightsError, match="refused"):
        load_aesthetic(tmp_path / "evil.pth", 768)


def test_clip_folder_errors(tmp_path):
    with pytest.raises(ScoreWeightsError, match="not a folder"):
        ClipImageEmbedder(tmp_path / "nothing")
    with pytest.raises(ScoreWeightsError, match="not a CLIP model folder"):
        ClipImageEmbedder(tmp_path)


def test_identical_images_style_one(clip_dir):
    clip = ClipImageEmbedder(clip_dir)
    rgb = _astronaut()
    item = EvalImage(Path("a.png"), rgb)
    ev = evaluate_images([item], [], [EvalImage(Path("r.png"), rgb.copy())], clip=clip, note=lambda _: None)
    assert ev.images[0].style == pytest.approx(1.0, abs=1e-6)
    other = EvalImage(Path("b.png"), np.ascontiguousarray(rgb[:, ::-1, [2, 0, 1]]))
    ev = evaluate_images([other], [], [EvalImage(Path("r.png"), rgb)], clip=clip, note=lambda _: None)
    assert ev.images[0].style < 0.999


@pytest.fixture(scope="module")
def dlib_net():
    """dlib's real face-recognition network (face_recognition_models), as evaluate.py loads it by default."""
    from library.evaluation.face_identity import load_identity_network

    return load_identity_network()


def _face_swapped() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(astronaut, astronaut with another person's face pasted in its face ellipse, that ellipse)."""
    rgb = _astronaut()
    other = _insightface_image("Tom_Hanks_54745.png")
    x0, y0, x1, y1 = ASTRONAUT_FACE
    pasted = np.asarray(Image.fromarray(other).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
    mask = _ellipse(rgb.shape[:2], ASTRONAUT_FACE)
    swapped = rgb.copy()
    region = swapped[y0:y1, x0:x1]
    inside = mask[y0:y1, x0:x1]
    region[inside] = pasted[inside]
    return rgb, swapped, mask


def test_face_change_moves_csim_not_masked_style(clip_dir, dlib_net):
    rgb, swapped, mask = _face_swapped()
    clip = ClipImageEmbedder(clip_dir)
    t1 = _insightface_image("t1.jpg")
    ref = [EvalImage(Path("r.png"), t1, face_mask=np.zeros(t1.shape[:2], bool))]  # as a prepared mask would give
    src = [EvalImage(Path("s.png"), rgb)]
    gen = [EvalImage(Path("same.png"), rgb), EvalImage(Path("swapped.png"), swapped)]
    ev = evaluate_images(gen, src, ref, identity=dlib_net, clip=clip, face_mask=lambda _: mask, note=lambda _: None)
    same, changed = ev.images
    assert same.style == pytest.approx(changed.style, abs=1e-6)
    assert same.csim == pytest.approx(1.0, abs=1e-6)
    assert changed.csim == pytest.approx(0.873, abs=0.02)  # measured 0.8727: another person's face
    # without the mask the style score sees the new face
    ev = evaluate_images(gen, src, ref, clip=clip, face_mask=None, note=lambda _: None)
    assert abs(ev.images[0].style - ev.images[1].style) > 1e-4


def _write_pngs(folder: Path, images: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in images.items():
        Image.fromarray(rgb).save(folder / f"{name}.png")
    return folder


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path, Path]:
    rgb, swapped, _ = _face_swapped()
    small = np.asarray(Image.fromarray(rgb).resize((256, 256)))
    gen = _write_pngs(tmp_path / "out" / "generated", {"0001": rgb, "0002": swapped, "grid-00000": rgb})
    src = _write_pngs(tmp_path / "source", {"a": rgb, "b": rgb[:, ::-1].copy()})
    ref = _write_pngs(tmp_path / "reference", {"r": small})
    return gen, src, ref


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.section = None
        self.figures: dict[str, list[str]] = {}
        self.table: list[list[str]] = []
        self._in_summary = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
        if tag == "figure" and self.section:
            self.figures.setdefault(self.section, []).append(a["data-name"])
        if tag == "img" and self.section:
            assert a["src"].startswith("data:image/jpeg;base64,")
        if tag == "table" and a.get("id") == "summary":
            self._in_summary = True
        if self._in_summary and tag == "tr":
            self.table.append([])
        if self._in_summary and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False
        if tag in ("td", "th") and self._cell is not None:
            self.table[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _run(argv, capsys):
    import evaluate

    rc = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_skips_and_report(folders, tmp_path, capsys):
    gen, src, ref = folders
    rc, out, err = _run(["--generated", gen, "--source", src, "--reference", ref], capsys)
    assert rc == 0, err
    skip_lines = [l for l in err.splitlines() if l.startswith("skipped")]
    assert skip_lines == [
        "skipped style: no CLIP weights ; give --clip FOLDER (openai/clip-vit-large-patch14 in transformers layout) "
        "or [evaluation] clip in the config",
        "skipped aesthetic: it needs the predictor and CLIP ViT-L/14 ; give --aesthetic "
        "sac+logos+ava1-l14-linearMSE.pth and --clip FOLDER",
    ]
    outdir = gen.parent / "evaluation"
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert [i["name"] for i in metrics["images"]] == ["0001.png", "0002.png"]  # the grid is not scored
    assert metrics["networks"] == {"identity": "dlib ResNet v1 (face_recognition_models)", "clip": None, "aesthetic": None}
    assert metrics["images"][0]["csim"] == pytest.approx(0.996, abs=0.01)  # the photo itself and its mirror
    assert metrics["images"][1]["csim"] == pytest.approx(0.873, abs=0.02)  # another person's face pasted in
    assert metrics["images"][0]["same_person"] is True and metrics["images"][1]["same_person"] is False
    assert metrics["summary"]["face_found"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert metrics["summary"]["same_person"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert metrics["summary"]["style"] == {"mean": None, "std": None, "n": 0}
    csv_rows = (outdir / "metrics.csv").read_text().splitlines()
    assert csv_rows[0] == "image,csim,identity,copy,copied,style,aesthetic,face_found,same_person,yaw,pitch,pose"
    first = csv_rows[1].split(",")
    assert first[0] == "0001.png" and first[1].startswith("0.99") and first[4:9] == ["1", "", "", "1", "1"]
    assert first[11] == "frontal" and csv_rows[2].split(",")[4] == "0" and csv_rows[3].startswith("mean,")
    # 0001 is source photo a itself: nearest 1 > the photos' own 0.9925 (a and its mirror b): copied; the
    # pasted face is not, so the copy share is 1/2
    likeness = metrics["likeness"]
    assert likeness["copy_share"] == 0.5 and likeness["ceiling"] == pytest.approx(0.9925, abs=0.002)
    assert metrics["images"][0]["nearest"] == "a.png" and metrics["images"][0]["copied"] is True
    assert [s["name"] for s in likeness["sources"]] == ["a.png", "b.png"]
    assert likeness["sources"][0]["leave_one_out"] == pytest.approx(likeness["ceiling"], abs=1e-6)  # two photos: each other
    assert f"copy share 50% (nearest source photo above the photos' own highest pairwise {likeness['ceiling']:.3f})" in out
    # the pasted face is Tom Hanks's, chin tucked: "down" (as in tests/test_likeness.py)
    assert "poses: frontal 1 (identity 0.99" in out and "left 0, right 0, up 0, down 1 (identity 0.87" in out
    page = (outdir / "report.html").read_text()
    assert 'id="likeness"' in page and "<td>50%</td>" in page and 'id="poses"' in page and 'id="sources"' in page
    report = _Report()
    report.feed((outdir / "report.html").read_text())
    assert report.figures == {"generated": ["0001.png", "0002.png"], "source": ["a.png", "b.png"], "reference": ["r.png"]}
    assert report.table[0] == ["Method", "CSIM ↑", "Masked CLIP (style) ↑", "Aesthetic ↑"]
    csim = metrics["summary"]["csim"]
    assert report.table[1] == ["this run", f"{csim['mean']:.3f} ± {csim['std']:.3f}", "skipped", "skipped"]
    assert "identity network: dlib ResNet v1 (face_recognition_models)" in out


def test_cli_all_metrics(folders, tmp_path, capsys, clip_dir, aesthetic_file):
    gen, src, ref = folders
    rc, out, err = _run(["--generated", gen, "--source", src, "--reference", ref, "--clip", clip_dir,
                         "--aesthetic", aesthetic_file, "--out", tmp_path / "ev"], capsys)
    assert rc == 0, err
    assert not [l for l in err.splitlines() if l.startswith("skipped")]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert all(i["style"] is not None and i["aesthetic"] is not None for i in metrics["images"])
    assert metrics["summary"]["aesthetic"]["n"] == 2
    # only the aesthetic file missing: exactly its line
    rc, out, err = _run(["--generated", gen, "--source", src, "--reference", ref, "--clip", clip_dir,
                         "--out", tmp_path / "ev2"], capsys)
    assert rc == 0
    assert [l for l in err.splitlines() if l.startswith("skipped")] == [
        "skipped aesthetic: it needs the predictor and CLIP ViT-L/14 ; give --aesthetic sac+logos+ava1-l14-linearMSE.pth"]


def test_cli_bad_folders(tmp_path, capsys, folders):
    gen, src, ref = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.mask.png").write_bytes(b"")
    for argv, message in (
        (["--generated", tmp_path / "nope", "--source", src, "--reference", ref], "nope: no such folder"),
        (["--generated", empty, "--source", src, "--reference", ref], "empty: no images"),
        (["--generated", gen, "--source", src / "a.png", "--reference", ref], "a.png: not a folder"),
        (["--generated", gen, "--source", src, "--reference", ref, "--aesthetic", tmp_path / "no.pth", "--clip", ref],
         "not a CLIP model folder"),
    ):
        rc, out, err = _run(argv, capsys)
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_unreadable_image_is_a_warning(tmp_path):
    folder = _write_pngs(tmp_path / "g", {"good": np.full((80, 80, 3), 100, np.uint8)})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    lines = []
    items = read_folder(folder, warn=lines.append)
    assert [i.path.name for i in items] == ["good.png"]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {folder / 'broken.png'}: ")
    (folder / "good.png").unlink()
    with pytest.raises(FolderError, match="no readable image"):
        read_folder(folder, warn=lambda _: None)


def test_prepared_reference_mask_is_the_face(tmp_path):
    from testkit.tiny import write_prepared

    folder = write_prepared(tmp_path / "ref", "reference", "mcv2", n=1)
    (item,) = read_folder(folder, reference_masks=True)
    mask = np.asarray(Image.open(folder / "img0.mask.png"))
    assert item.face_mask is not None and np.array_equal(item.face_mask, mask < 128)
    assert 0.05 < item.face_mask.mean() < 0.5


def test_real_photos_same_person_beats_every_other_person(tmp_path, capsys):
    """dlib's network through evaluate.py on folders of real photos: the astronaut's mirror, crop, half-size
    copy and EXIF-rotated JPEG (the source set) against the astronaut and six other people (t1.jpg's faces)
    and Tom Hanks (generated): the astronaut scores higher than every other person and is the only one
    the network calls the same person."""
    from dataset_tools.demo_photos import T1_CROPS

    rgb = _astronaut()
    src = _write_pngs(tmp_path / "source", {
        "mirror": rgb[:, ::-1].copy(), "crop": rgb[0:300, 80:380].copy(),
        "half": np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.LANCZOS)),
    })
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned, EXIF says turn it back: the reader must apply it
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270).save(src / "exif.jpg", quality=95, exif=exif.tobytes())
    t1 = _insightface_image("t1.jpg")
    others = {name: t1[y0:y1, x0:x1].copy() for name, (x0, y0, x1, y1) in T1_CROPS}
    gen = _write_pngs(tmp_path / "generated", {"astronaut": rgb, "t1_group": t1, "tom_hanks": _insightface_image(
        "Tom_Hanks_54745.png"), **others})
    rc, out, err = _run(["--generated", gen, "--source", src, "--reference", src, "--out", tmp_path / "ev"], capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["source_faces"] == 4
    scores = {i["name"]: i for i in metrics["images"]}
    assert scores["astronaut.png"]["csim"] > 0.98 and scores["astronaut.png"]["same_person"] is True
    for name, s in scores.items():
        if name != "astronaut.png":
            assert s["face_found"] is True and s["same_person"] is False, name
            assert 0.80 < s["csim"] < 0.90, (name, s["csim"])  # measured 0.82 to 0.89 (t1_group: its largest face)
    assert metrics["summary"]["face_found"]["mean"] == 1.0
    assert metrics["summary"]["same_person"]["mean"] == pytest.approx(1 / 6)


def test_a_45px_face_is_found_and_scored(dlib_net):
    """Issue 16, kind 7: evaluate scores a generated image whose face is 40-80 px (here 45 px in 1000 x 600,
    beside a larger stranger: the image is scored on its largest face, so the stranger's CSIM; the small
    face is found, and scored alone once the stranger is cropped off)."""
    astro = Image.fromarray(_astronaut())
    canvas = Image.new("RGB", (1000, 600), (120, 120, 120))
    canvas.paste(Image.fromarray(_insightface_image("t1.jpg")).crop((633, 255, 963, 585)).resize((520, 520)), (20, 40))
    canvas.paste(astro.crop((60, 0, 400, 340)).resize((170, 170), Image.Resampling.LANCZOS), (700, 200))
    group = np.asarray(canvas)
    src = [EvalImage(Path("s.png"), _astronaut())]
    gen = [EvalImage(Path("group.png"), group), EvalImage(Path("small.png"), group[:, 600:].copy())]
    lines: list[str] = []
    ev = evaluate_images(gen, src, [], identity=dlib_net, note=lines.append)
    both, alone = ev.images
    assert lines == ["copy share not measured: one source face, so no pair of source photos to compare with ; give "
                     "more photos"] and ev.source_faces == 1
    assert alone.copied is None and ev.likeness["copy_share"] is None and ev.likeness["ceiling"] is None
    assert both.face_found is True and both.csim == pytest.approx(0.86, abs=0.02) and both.same_person is False
    assert alone.face_found is True and alone.same_person is True
    assert alone.csim == pytest.approx(0.99, abs=0.01)  # measured 0.990: her own face at 45 px
    assert [round(v) for v in dlib_net.faces(group)[1].box] == pytest.approx([760, 242, 805, 287], abs=4)
