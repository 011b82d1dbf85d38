"""Fuzzing with hypothesis (issue 8, item 11; issue 16): random input never gives a traceback, only the
loader's own one-line error, and a bad file never stops a folder. 12,500 examples in all:

- 2,500 TOML documents (real section and key names with random values, random names, random edits) and
  2,500 lists of ``section.key=value`` overrides through ``library.config.load_config``, with and without
  its path checks: a Config or a one-line ConfigError;
- 3,000 random and mutated image files (11 small seeds: PNG in four modes, JPEG, progressive JPEG with
  EXIF, WebP, BMP, GIF, PPM, TIFF; bits flipped, runs replaced, junk inserted, size fields rewritten,
  cuts; or noise) through ``dataset_tools.images.load_image``: an RGB image or a one-line ImageLoadError;
  and 3 folders of four such files and a good one through ``dataset_tools.prepare``: every file read,
  each bad one one line, the good one prepared;
- 2,000 safetensors files (a valid length prefix and random JSON, a header of random dtypes, shapes and
  offsets, or a truthful header with one lie) through every safetensors loader (model, LoRA, embedding,
  generate.py's two readers, checkpoint, upscaler): a result or its one-line error naming the file;
- 2,500 base-model files, each saved as ``model.safetensors`` and as ``model.ckpt``, through
  ``library.models.loading.identify`` (library.models.kind's reading of headers, pickled state dicts and
  A1111's sidecar ``model.yaml``) and ``check_trainable``: SD 1.x, SD 2.x, SDXL and LoRA headers, zip and
  legacy torch.save checkpoints, a Git LFS pointer, an HTML page, cut files and a header length of 2 GB,
  as they are or mutated, with no sidecar or a random, edited or deeply nested one: a ModelKind or a
  one-line ModelLoadError naming the file it read.

Each test asserts how many examples it ran (``pytest -s`` prints the counts and outcomes). Runs are
derandomized: the same examples on every run of this file, on any machine. (Hypothesis also draws now and
then from the constants of the project modules imported so far, so a test run alone with ``-k``, or a run
after a library module changed, gets other examples; a failure prints its ``@reproduce_failure`` blob.)
The file takes about 60 to 80 s on 2 shared cores, nearly all of it hypothesis generating examples: the
inputs are small and written over the same temp files, and the readers take well under 2 ms an example.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_inputs import encoded, photo_like, safetensors_bytes  # noqa: E402

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# examples per test (derandomized: the same ones on every run); 10,000 or more in all
DOCUMENTS, OVERRIDES, IMAGES, HEADERS, MODEL_FILES = 2500, 2500, 3000, 2000, 2500


def run_counted(name: str, test, examples: int, minimum: float = 0.9) -> int:
    """Run a @given function (no arguments left), check it ran at least `minimum` x `examples` examples."""
    count = {"n": 0}
    test(count)
    print(f"{name}: {count['n']} examples")
    assert count["n"] >= minimum * examples, count
    return count["n"]


def is_one_line(msg: str) -> bool:
    return bool(msg) and len(msg.splitlines()) == 1


# ------------------------------------------------------------------------------------------ config

def _config_schema() -> dict[str, list[str]]:
    import dataclasses
    import typing

    from library.config import Config

    cfg = Config()
    return {f.name: list(typing.get_type_hints(type(getattr(cfg, f.name))))
            for f in dataclasses.fields(cfg) if not f.metadata.get("internal")}


SCHEMA = _config_schema()
names = st.text(min_size=0, max_size=12)
toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=20), st.datetimes(), st.dates(), st.times(),
)
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=3),
                           max_leaves=8)


def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's


def _toml_value(value) -> str:
    """TOML text of a value (inline tables and arrays; floats as TOML spells nan and inf)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # datetime, date, time


@st.composite
def toml_documents(draw) -> str:
    """Real sections with real or random keys and random values; sometimes a random section or a top-level key."""
    lines = []
    if draw(st.booleans()):
        lines.append(f"{_toml_key(draw(names))} = {_toml_value(draw(toml_values))}")
    sections = draw(st.lists(st.sampled_from(sorted(SCHEMA)) | names, max_size=4, unique=True))
    for section in sections:
        lines.append(f"[{_toml_key(section)}]")
        keys = SCHEMA.get(section, [])
        for key in draw(st.lists(st.sampled_from(keys) | names if keys else names, max_size=4, unique=True)):
            lines.append(f"{_toml_key(key)} = {_toml_value(draw(toml_values))}")
    text = "\n".join(lines) + "\n"
    edits = draw(st.lists(st.tuples(st.integers(0, max(len(text), 1)), st.text(max_size=3)), max_size=2))
    for pos, junk in edits:  # random edits: most make the TOML invalid, some only change a value
        text = text[:pos] + junk + text[pos + 1:]
    return text


def _check_config(path, overrides, check_paths):
    from library.config import Config, ConfigError, load_config

    try:
        cfg = load_config(path, overrides, check_paths=check_paths)
    except ConfigError as err:
        assert is_one_line(str(err)), repr(str(err))
        return
    assert isinstance(cfg, Config)


def test_random_toml_documents_give_a_config_or_one_line(tmp_path):
    path = tmp_path / "fuzz.toml"

    @settings(FUZZ, max_examples=DOCUMENTS)
    @given(text=toml_documents(), check_paths=st.booleans())
    def documents(count, text, check_paths):
        count["n"] += 1
        path.write_text(text, encoding="utf-8")
        _check_config(path, [], check_paths)

    run_counted("toml documents", documents, DOCUMENTS)


overrides = st.one_of(
    st.builds(lambda s, k, v: f"{s}.{k}={v}",
              st.sampled_from(sorted(SCHEMA)) | names,
              st.sampled_from(sorted({k for keys in SCHEMA.values() for k in keys})) | names,
              st.one_of(toml_values.map(_toml_value), st.text(max_size=20))),
    st.text(max_size=30),
)


def test_random_overrides_give_a_config_or_one_line():
    @settings(FUZZ, max_examples=OVERRIDES)
    @given(items=st.lists(overrides, min_size=1, max_size=3), check_paths=st.booleans())
    def command_lines(count, items, check_paths):
        count["n"] += 1
        _check_config(None, items, check_paths)

    run_counted("overrides", command_lines, OVERRIDES)


def test_config_messages_stay_one_line_for_hostile_names(tmp_path):
    """The kind the fuzzer found first: a quoted key, section or value holding a line break."""
    from library.config import ConfigError, load_config

    cases = {
        '[phase1]\n"ste\\nps" = 1\n': "unknown key 'phase1.ste / ps'",
        '["phase\\r\\n1"]\nsteps = 1\n': "unknown section [phase / 1]",
        '[phase1]\nsteps = "1\\n2"\n': "expected int, got '1\\n2'",
        '[model]\npretrained = "x"\n[data]\nsource_dir = "a\\u2028b"\nreference_dir = "c"\n': f"data.source_dir = '{Path.cwd()}/a / b' is not a folder",  # paths are made absolute
        "[model]\npretrained = " + "[" * 3000 + "]" * 3000 + "\n": "not valid TOML",
    }
    for text, expected in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert is_one_line(str(info.value)) and expected in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["phase1.steps=" + "[" * 3000])
    assert is_one_line(str(info.value)) and "phase1.steps: expected int" in str(info.value)


# ------------------------------------------------------------------------------------------ images

def _seed_images() -> dict[str, bytes]:
    from PIL import Image

    photo = photo_like((80, 72))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {
        "png": encoded(photo, "PNG"),
        "png_rgba": encoded(rgba, "PNG"),
        "png_palette": encoded(photo.convert("P"), "PNG"),
        "png_16bit": encoded(Image.fromarray((torch.arange(80 * 72).reshape(72, 80) * 11).numpy().astype("uint16")), "PNG"),
        "jpeg": encoded(photo, "JPEG", quality=80),
        "jpeg_progressive_exif": encoded(photo, "JPEG", quality=70, progressive=True, exif=exif.tobytes()),
        "webp": encoded(photo, "WEBP", quality=60),
        "bmp": encoded(photo, "BMP"),
        "gif": encoded(photo.convert("P"), "GIF"),
        # not among the extensions prepare reads, but load_image opens whatever PIL recognises: PPM's header
        # parser raises ValueError, TIFF's tags and EXIF have their own readers
        "ppm": encoded(photo, "PPM"),
        "tiff_exif": encoded(photo, "TIFF", exif=exif.tobytes()),
    }


SEEDS = _seed_images()


def _tiff_with_a_broken_second_frame() -> bytes:
    """The TIFF seed whose first IFD links to a second one without a width or height: counting the frames
    raised TypeError "Missing dimensions" past read_image (the fuzzer found it with 3,000 examples)."""
    data = bytearray(SEEDS["tiff_exif"])
    first = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0], len(data))
    return bytes(data + struct.pack("<HHHIII", 1, 0x0103, 3, 1, 1, 0))  # one entry (compression: none), no next IFD


def _mutate(draw, data: bytearray, edits: int, head: int, size_field) -> bytearray:
    """`edits` edits of `data`: a bit flipped, a run replaced, junk inserted, or a size field written (the
    bytes `size_field(pos)` returns); half of them land in the first `head` bytes, where the sizes live."""
    for _ in range(edits):
        kind = draw(st.sampled_from(["flip", "run", "insert", "size"]))
        pos = draw(st.integers(0, min(head - 1, len(data) - 1)) | st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "run":
            run = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(run)] = run
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            field = size_field(pos)
            data[pos:pos + len(field)] = field
    return data


@st.composite
def image_bytes(draw) -> bytes:
    """A valid small image (11 seeds: 7 formats, several modes) with a few bytes flipped, a run replaced,
    a cut, or junk inserted; or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    sizes = st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**32 - 1])
    data = _mutate(draw, data, draw(st.integers(0, 4)), 64, lambda pos: struct.pack(">I", draw(sizes)))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def test_mutated_image_bytes_give_an_image_or_one_line():
    from dataset_tools.images import ImageLoadError, load_image

    outcomes = {"loaded": 0, "refused": 0}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.img"

        @settings(FUZZ, max_examples=IMAGES)
        @given(data=image_bytes())
        @example(data=_tiff_with_a_broken_second_frame())
        def images(count, data):
            count["n"] += 1
            path.write_bytes(data)
            try:
                loaded = load_image(path, max_short_side=128)
            except ImageLoadError as err:
                assert is_one_line(str(err)), repr(str(err))
                outcomes["refused"] += 1
                return
            assert loaded.image.mode == "RGB" and min(loaded.image.size) >= 64
            assert max(loaded.image.size) <= 4 * 128 or min(loaded.image.size) <= 128
            outcomes["loaded"] += 1

        run_counted("image bytes", images, IMAGES)
    print(f"images: {outcomes}")
    # both branches really ran (3,000 examples: 389 loaded, 2,612 refused)
    assert outcomes["loaded"] >= IMAGES // 20 and outcomes["refused"] >= IMAGES // 5, outcomes


def test_a_folder_of_mutated_images_is_prepared_file_by_file(tmp_path):
    from dataset_tools.prepare import prepare_folder

    @settings(FUZZ, max_examples=3, suppress_health_check=list(HealthCheck))
    @given(files=st.lists(image_bytes(), min_size=4, max_size=4))
    def folders(count, files):
        count["n"] += 1
        src, out = tmp_path / f"in{count['n']}", tmp_path / f"out{count['n']}"
        src.mkdir()
        names = [f"f{i}.{ext}" for i, ext in enumerate(["png", "jpg", "webp", "bmp"])]
        for name, data in zip(names, files):
            (src / name).write_bytes(data)
        photo_like((96, 96), seed=3).save(src / "zz_good.png")
        summary = prepare_folder("reference", src, out)
        assert sorted(summary.read) == sorted(names + ["zz_good.png"])  # never stopped early
        assert sorted(summary.used + [n for n, _ in summary.skipped]) == sorted(summary.read)
        assert "zz_good.png" in summary.used and (out / "zz_good.json").is_file()
        for name, reason in summary.skipped:
            assert is_one_line(reason), (name, reason)
            assert not (out / f"{Path(name).stem}.json").exists()
        assert all(is_one_line(line) for line in summary.format().splitlines())

    run_counted("prepare folders", folders, 3, minimum=1.0)


# ------------------------------------------------------------------------------------- safetensors

json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
TENSOR_NAMES = ["emb_params", "bundle_emb.mcv1.emb_params", "lora_unet_down.lora_down.weight", "string_to_param.*",
                "params_ema.conv_first.weight", "x\ny"]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
          "U64", "C64", "F4", "X"]


@st.composite
def tensor_entries(draw) -> dict:
    shape = draw(st.lists(st.integers(0, 6) | st.sampled_from([2**31, 2**40, -1]), max_size=3))
    start = draw(st.integers(0, 64) | st.sampled_from([2**32, 2**62]))
    end = start + draw(st.integers(-4, 96) | st.sampled_from([2**40]))
    entry = {"dtype": draw(st.sampled_from(DTYPES)), "shape": shape, "data_offsets": [start, end]}
    if draw(st.integers(0, 4)) == 0:  # a missing or extra field
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry


DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def consistent_tensors(draw) -> tuple[dict, bytes]:
    """A header that tells the truth (shapes, dtypes and back-to-back offsets) and its data."""
    header, offset = {}, 0
    for name in draw(st.lists(st.sampled_from(TENSOR_NAMES) | st.text(max_size=6), max_size=3, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = DTYPE_SIZES[dtype] * int(torch.tensor(shape, dtype=torch.int64).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, draw(st.binary(min_size=offset, max_size=offset))


@st.composite
def safetensors_files(draw) -> bytes:
    """A valid 8-byte length prefix, then random JSON, a header of random entries, or a truthful header
    with one lie (a field of a random entry, data cut short or extended)."""
    kind = draw(st.sampled_from(["json", "random", "truthful"]))
    data = draw(st.binary(max_size=96))
    if kind == "json":
        header = draw(json_values)
    elif kind == "random":
        header = draw(st.dictionaries(st.sampled_from(TENSOR_NAMES) | st.text(max_size=6), tensor_entries(), max_size=3))
    else:
        header, data = draw(consistent_tensors())
        lie = draw(st.sampled_from(["none", "none", "field", "cut", "extend"]))
        if lie == "field" and header:
            name = draw(st.sampled_from(sorted(header)))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[name][field] = draw(tensor_entries()).get(field)
        elif lie == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif lie == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
    if isinstance(header, dict) and draw(st.integers(0, 3)) == 0:
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | json_values, max_size=2))
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 8))
    return safetensors_bytes(raw, data)


# safetensors quotes a tensor's name in some errors ("invalid offset for tensor `x<newline>y`"): one
# such file is always among the examples
NAME_WITH_A_LINE_BREAK = safetensors_bytes({"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                            "x\ny": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12))


def _safetensors_loaders(root: Path):
    from library.training.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint
    from library.config import load_config
    from library.export.kohya import load_embedding, load_lora
    from library.files.weights import WeightsFileError
    from library.generation.pipeline import GenerationError
    from library.models.loading import ModelLoadError, load_stable_diffusion
    from library.postprocess import load_upscaler
    from library.generation.trained_files import find_trained_files, read_embedding

    ckpt = root / "checkpoint-p1-000001"
    ckpt.mkdir()
    torch.save({"optimizer": {}, "scheduler": {}, "sampler": {}, "generator": torch.zeros(1)}, ckpt / "state.pt")
    cfg = load_config(None, [f'output.dir="{root.as_posix()}"', 'output.name="fuzz"'], check_paths=False)
    for word in ("mcv1", "mcv2"):
        torch.save(torch.zeros(1, 4), root / f"{word}.pt")
    path = ckpt / "trainable.safetensors"
    lora = root / "fuzz.safetensors"
    return path, lora, {
        "model": (ModelLoadError, lambda: load_stable_diffusion(str(path))),
        "lora": (WeightsFileError, lambda: load_lora(path)),
        "embedding": (ValueError, lambda: load_embedding(path)),
        "generate_embedding": (GenerationError, lambda: read_embedding("mcv1", path, None)),
        "generate_lora": (GenerationError, lambda: find_trained_files(cfg)),
        "checkpoint": (CheckpointError, lambda: load_checkpoint(CheckpointInfo(ckpt, 1, 1))),
        "upscaler": (ValueError, lambda: load_upscaler(path)),
    }


def test_random_safetensors_headers_give_one_clean_error(tmp_path):
    path, lora, loaders = _safetensors_loaders(tmp_path)
    outcomes: dict[str, int] = {}

    @settings(FUZZ, max_examples=HEADERS)
    @given(data=safetensors_files())
    @example(data=NAME_WITH_A_LINE_BREAK)
    def headers(count, data):
        count["n"] += 1
        path.write_bytes(data)
        lora.write_bytes(data)
        for name, (error, load) in loaders.items():
            try:
                load()
                outcomes[f"{name} loaded"] = outcomes.get(f"{name} loaded", 0) + 1
            except error as err:
                msg = str(err)
                assert is_one_line(msg), (name, msg)
                assert ".safetensors" in msg, (name, msg)
                outcomes[f"{name} refused"] = outcomes.get(f"{name} refused", 0) + 1

    run_counted("safetensors headers", headers, HEADERS)
    print(f"safetensors: {dict(sorted(outcomes.items()))}")
    for name in ("lora", "checkpoint", "generate_lora"):  # both branches really ran (2,000: 620 and 1,381)
        loaded, refused = outcomes.get(f"{name} loaded", 0), outcomes.get(f"{name} refused", 0)
        assert loaded >= HEADERS // 6 and refused >= HEADERS // 3, outcomes


# ------------------------------------------------------------------------------------------ model files


def _model_seeds() -> dict[str, bytes]:
    """What a base-model path can hold: headers of SD 1.x, SD 2.x, SDXL and LoRA files (zero-size tensors:
    identification reads keys and shapes only), small pickled checkpoints (zip and legacy torch.save), and
    what a failed download leaves under a model's name: a Git LFS pointer, an HTML page, a cut file, a
    header-length field claiming 2 GB."""
    import io

    def header(shapes: dict[str, list[int]], metadata: dict | None = None) -> dict:
        """Zero-size tensors, and the last one's 8 bytes of data (so that a cut can land in the data)."""
        entries = {k: {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}
        entries[list(shapes)[-1]] = {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}
        return {**entries, **({"__metadata__": metadata} if metadata else {})}

    attn2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    sd1 = header({conv_in: [0, 4, 3, 3], attn2: [0, 768], "first_stage_model.encoder.conv_in.weight": [0, 3, 3, 3],
                  "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [0, 768]})
    sd2 = header({conv_in: [0, 4, 3, 3], attn2: [0, 1024], "v_pred": [0],
                  "cond_stage_model.model.token_embedding.weight": [0, 1024]})
    sdxl = header({conv_in: [0, 9, 3, 3], attn2: [0, 2048], "conditioner.embedders.0.transformer.text_model.x": [0],
                   "conditioner.embedders.1.model.token_embedding.weight": [0, 1280],
                   "first_stage_model.decoder.x": [0]},
                  {"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    lora = header({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [0, 320]}, {"ss_network_dim": "4"})
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"state_dict": state, "global_step": 1}, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    sd1_file = safetensors_bytes(sd1, bytes(8))
    return {
        "sd1": sd1_file, "sd2_v": safetensors_bytes(sd2, bytes(8)), "sdxl_inpaint": safetensors_bytes(sdxl, bytes(8)),
        "lora": safetensors_bytes(lora, bytes(8)), "ckpt_zip": zipped.getvalue(), "ckpt_legacy": legacy.getvalue(),
        "lfs_pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"4f2a" * 16
                        + b"\nsize 4265146304\n"),
        "html": (b"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in</title></head>"
                 b"<body><h1>Access to model runwayml/stable-diffusion-v1-5 is restricted</h1></body></html>\n"),
        "truncated_header": sd1_file[:200], "truncated_data": sd1_file[:-3],
        "length_2gb": struct.pack("<Q", 2**31) + sd1_file[8:],
    }


MODEL_SEEDS = _model_seeds()
# drawn more often: the files whose header passes, so that the sidecar is read
MODELS = ["sd1", "sd2_v", "sdxl_inpaint", "lora", "ckpt_zip", "ckpt_legacy"]
SIDECAR_SEEDS = ['model:\n  params:\n    parameterization: "v"\n    unet_config: {}\n',
                 "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"
                 "    parameterization: eps\n    first_stage_key: jpg\n    scale_factor: 0.18215\n"]
yaml_scalars = st.sampled_from(["v", "eps", "~", "[]", "{}", "*a", "&a [*a]", "!!binary xx", "!!float x", "!!int 0xZZ",
                                "2001-12-14", "2001-13-45", "12:30:45", "0o17", ".nan", "'v'", '"v\\n"', "- v"])


@st.composite
def sidecars(draw) -> bytes | None:
    """A1111's NAME.yaml next to the model, or none: a real one with its value replaced, random edits, nesting,
    random text or bytes."""
    kind = draw(st.sampled_from(["none", "seed", "value", "nested", "text", "bytes"]))
    if kind == "none" or draw(st.integers(0, 2)) == 0:  # most models have no sidecar
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "text":
        text = draw(st.text(max_size=40))
    elif kind == "nested":  # parameterization, params or model as a flow collection nested `depth` deep
        depth = draw(st.integers(0, 20) | st.integers(0, 3000))
        where = draw(st.sampled_from(["model: ", "model:\n  params: ", "model:\n  params:\n    parameterization: ",
                                      ""]))
        text = where + draw(st.sampled_from(["[", "{a: ", "- "])) * depth + "\n"
    else:
        text = draw(st.sampled_from(SIDECAR_SEEDS))
        if kind == "value":
            text = text.replace(draw(st.sampled_from(['"v"', "eps", "{}", "0.00085", "jpg"])), draw(yaml_scalars), 1)
        for pos, junk in draw(st.lists(st.tuples(st.integers(0, len(text)), st.text(max_size=3)), max_size=2)):
            text = text[:pos] + junk + text[pos + 1:]
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16"])))


@st.composite
def model_bytes(draw) -> bytes:
    """A seed (half the time a model) as it is, or with a few edits (`_mutate`; a rewritten length field is
    the safetensors header length at offset 0), or cut; or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(MODEL_SEEDS[draw(st.sampled_from(sorted(MODEL_SEEDS)) | st.sampled_from(MODELS))])
    if draw(st.integers(0, 3)) == 0:  # as it is: the readers' ordinary paths
        return bytes(data)
    sizes = st.sampled_from([0, 1, 7, 2**31, 2**32 - 1, 100_000_001, 2**63]) | st.integers(0, 2 * len(data))

    def size_field(pos: int) -> bytes:  # safetensors' little-endian u64 header length, or any 4-byte size
        size = draw(sizes)
        return struct.pack("<Q", size) if pos == 0 else struct.pack("<I", size % 2**32)

    data = _mutate(draw, data, draw(st.integers(1, 3)), 16, size_field)
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def test_model_files_are_identified_or_refused_in_one_line(tmp_path):
    """identify (library.models.loading, before anything is built; library.models.kind reads the headers and the
    sidecar) and check_trainable: a ModelKind, or a one-line ModelLoadError naming the file it read."""
    from library.models.kind import ModelLoadError, check_trainable
    from library.models.loading import identify

    paths = [tmp_path / "model.safetensors", tmp_path / "model.ckpt"]
    sidecar_path = tmp_path / "model.yaml"
    outcomes: dict[str, int] = {}

    @settings(FUZZ, max_examples=MODEL_FILES)
    @given(data=model_bytes(), sidecar=sidecars())
    # what the fuzzer found in sidecar_parameterization: a traceback (RecursionError, ValueError, AttributeError)
    @example(data=MODEL_SEEDS["sd1"], sidecar=b"model:\n  params: " + b"{a: " * 3000 + b"\n")
    @example(data=MODEL_SEEDS["ckpt_zip"], sidecar=b"model:\n  params:\n    parameterization: 2001-13-45\n")
    @example(data=MODEL_SEEDS["sdxl_inpaint"], sidecar=b"model: [v]\n")
    def model_files(count, data, sidecar):
        count["n"] += 1
        if sidecar is None:
            sidecar_path.unlink(missing_ok=True)
        else:
            sidecar_path.write_bytes(sidecar)
        for path in paths:
            path.write_bytes(data)
            suffix = path.suffix
            try:
                kind, _ = identify(path)
            except ModelLoadError as err:
                msg = str(err)
                assert is_one_line(msg), (suffix, msg)
                assert str(path) in msg or str(sidecar_path) in msg, (suffix, msg)
                outcome = "sidecar refused" if str(sidecar_path) in msg else f"{suffix} refused"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                continue
            for outcome in (f"{suffix} {kind.family}", kind.prediction):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            assert is_one_line(kind.describe()), kind
            try:
                check_trainable(kind, str(path))
            except ModelLoadError as err:
                assert is_one_line(str(err)) and str(err).startswith(f"{path}: "), str(err)

    run_counted("model files", model_files, MODEL_FILES)
    print(f"model files: {dict(sorted(outcomes.items()))}")
    # both readers identified and refused files, the headers reached every family, the sidecar was read
    # (a "v" in it or a v_pred key made v-prediction) and refused (2,500 examples: 32 to 2,354 each)
    for key in (".safetensors refused", ".ckpt refused", ".safetensors sd1", ".safetensors sd2", ".safetensors sdxl",
                ".safetensors other", ".ckpt sd1", "v_prediction", "sidecar refused"):
        assert outcomes.get(key, 0) >= MODEL_FILES // 200, (key, outcomes)
