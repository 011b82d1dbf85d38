"""Issue 8, item 1: every text file goes through library/files/text.py.

Fault kinds, each with the answer a user should get: a file saved by a Windows editor as Windows-1252
(byte 0x92, the curly apostrophe), as UTF-16 LE or BE with a byte-order mark, or as UTF-8 with a mark;
UTF-16 without a mark; UTF-32; truncated UTF-16; a folder where a file should be. Readers covered: TOML
configs (train_magicapture.py, generate.py), caption and JSON sidecars (library/training/data.py, the trainer),
the scheduler JSON (library/generation/samplers.py) and prepare's check of earlier items.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from library.config import ConfigError, load_config
from library.training.data import DatasetError, load_prepared_folder
from library.files.text import TextFileError, read_text_file
from testkit.tiny import write_prepared

CLEAN = "a photo of a mcv1 person, smiling\nsecond line"
ENCODINGS_ACCEPTED = {
    "utf-8": CLEAN.encode("utf-8"),
    "utf-8 with BOM": codecs.BOM_UTF8 + CLEAN.encode("utf-8"),
    "utf-16 LE with BOM": codecs.BOM_UTF16_LE + CLEAN.encode("utf-16-le"),
    "utf-16 BE with BOM": codecs.BOM_UTF16_BE + CLEAN.encode("utf-16-be"),
    "utf-8, CRLF line ends": CLEAN.replace("\n", "\r\n").encode("utf-8"),
    "utf-16 LE with BOM, CRLF": codecs.BOM_UTF16_LE + CLEAN.replace("\n", "\r\n").encode("utf-16-le"),
}
FIX = "re-save it as UTF-8"


@pytest.mark.parametrize("kind", list(ENCODINGS_ACCEPTED))
def test_reader_decodes_utf8_and_utf16_with_bom(tmp_path, kind):
    path = tmp_path / "c.txt"
    path.write_bytes(ENCODINGS_ACCEPTED[kind])
    assert read_text_file(path) == CLEAN


REFUSED = {
    # name: (bytes, what the message says after the file name)
    "cp1252 apostrophe": (b"a photo of mcv1\x92s face", "not UTF-8 text (byte 0x92 at offset 15 is invalid)"),
    "latin-1 e acute": (b"caf\xe9 au lait", "not UTF-8 text (byte 0xe9 at offset 3 is invalid)"),
    "bad byte after UTF-8 BOM": (codecs.BOM_UTF8 + b"ab\xff", "not UTF-8 text (byte 0xff at offset 5 is invalid)"),
    "utf-16 LE without BOM": (
        "mcv1".encode("utf-16-le"),
        "not text (a NUL character at character 1: binary data, or UTF-16 without a byte-order mark)",
    ),
    "utf-16 truncated": (codecs.BOM_UTF16_LE + b"a\x00b", "broken UTF-16 text (truncated data at offset 4)"),
    "utf-32 with BOM": ("mcv1".encode("utf-32"), "UTF-32 text is not supported"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_reader_refuses_everything_else_in_one_line(tmp_path, kind):
    data, what = REFUSED[kind]
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    with pytest.raises(TextFileError) as err:
        read_text_file(path)
    assert str(err.value) == f"{path}: {what}; {FIX}"


def test_reader_on_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(TextFileError) as err:
        read_text_file(tmp_path)
    assert str(err.value) == f"{tmp_path}: cannot be read (Is a directory); check that it is a readable file"
    with pytest.raises(FileNotFoundError):  # callers decide whether a missing file is an error
        read_text_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------- configs

CONFIG = "# Tom’s run\n[phase2]\nsteps = 7\n[sample]\nprompt = \"a photo of a mcv1 person — café\"\n"


@pytest.mark.parametrize("encoding", ["utf-16 LE with BOM", "utf-16 BE with BOM", "utf-8 with BOM"])
def test_config_in_utf16_or_with_bom_loads(tmp_path, encoding):
    codec, bom = {"utf-16 LE with BOM": ("utf-16-le", codecs.BOM_UTF16_LE),
                  "utf-16 BE with BOM": ("utf-16-be", codecs.BOM_UTF16_BE),
                  "utf-8 with BOM": ("utf-8", codecs.BOM_UTF8)}[encoding]
    path = tmp_path / "run.toml"
    path.write_bytes(bom + CONFIG.encode(codec))
    cfg = load_config(path, check_paths=False)
    assert cfg.phase2.steps == 7 and cfg.sample.prompt == "a photo of a mcv1 person — café"


def _cp1252_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_bytes(CONFIG.encode("cp1252", errors="replace"))  # ’ -> 0x92 at offset 5
    return path


def test_config_in_cp1252_is_one_line_from_both_entry_points(tmp_path, capsys):
    import generate
    import train_magicapture

    path = _cp1252_config(tmp_path)
    expected = f"error: {path}: not UTF-8 text (byte 0x92 at offset 5 is invalid); {FIX}\n"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"error: {err.value}\n" == expected
    assert train_magicapture.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == expected
    assert generate.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == expected


# ------------------------------------------------------------------------------- captions and sidecars


def _error_lines(stderr: str) -> list[str]:
    """The `error:` lines of an entry point's stderr (model loading draws progress bars there too). The
    entry points run in this process, so a traceback would have propagated into the test instead."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _tiny_run_args(tiny_model, source: Path, reference: Path, out: Path, *extra: str) -> list[str]:
    folder, _ = tiny_model
    return ["--config", "configs/test_tiny.toml", f'model.pretrained="{folder}"', f'data.source_dir="{source}"',
            f'data.reference_dir="{reference}"', f'output.dir="{out}"', "logging.tensorboard=false", *extra]


def test_cp1252_caption_stops_sidecar_mode_and_is_never_read_in_template_mode(
        tiny_model, prepared_data, tmp_path, capsys, monkeypatch):
    import library.training.data
    import train_magicapture

    source, reference = prepared_data
    caption = source / "img1.txt"
    caption.write_bytes(b"a photo of mcv1\x92s face")
    args = _tiny_run_args(tiny_model, source, reference, tmp_path / "out")
    assert train_magicapture.main([*args, 'data.captions="sidecar"']) == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"error: {caption}: not UTF-8 text (byte 0x92 at offset 15 is invalid); {FIX}"]
    assert not (tmp_path / "out" / "mcv1.safetensors").exists()

    opened = []
    real = library.training.data.read_text_file
    monkeypatch.setattr(library.training.data, "read_text_file", lambda p: opened.append(Path(p).name) or real(p))
    assert train_magicapture.main([*args, "--max_steps", "1"]) == 0  # data.captions = "template"
    assert _error_lines(capsys.readouterr().err) == []
    assert (tmp_path / "out" / "mcv1.safetensors").is_file()
    # sidecar JSONs only, each set's read twice: by check_prepared_sets before the model loads, then by loading
    assert sorted(opened) == sorted(["img0.json", "img1.json", "img2.json"] * 4)


@pytest.mark.parametrize("encoding", ["utf-8 with BOM", "utf-16 LE with BOM", "utf-16 BE with BOM"])
def test_caption_with_bom_tokenizes_like_the_clean_caption(tmp_path, encoding):
    from transformers import CLIPTokenizer

    from testkit.tiny import CONFIG_DIR
    from library.models.prompts import prompt_input_ids

    clean = "a photo of a mcv1 person, smiling"
    codec, bom = {"utf-8 with BOM": ("utf-8", codecs.BOM_UTF8), "utf-16 LE with BOM": ("utf-16-le", codecs.BOM_UTF16_LE),
                  "utf-16 BE with BOM": ("utf-16-be", codecs.BOM_UTF16_BE)}[encoding]
    folder = write_prepared(tmp_path / "s", "source", "mcv1", n=1, size=32)
    (folder / "img0.txt").write_bytes(bom + (clean + "\r\n").encode(codec))
    (item,) = load_prepared_folder(folder, "source", 32, captions=True)
    assert item.caption == clean
    tokenizer = CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer")
    tokenizer.add_tokens(["mcv1"])
    ids = prompt_input_ids(tokenizer, item.caption, {"mcv1": 1})
    # BOS, a photo of a, mcv1 (the added token), person , smiling, EOS then padding: no junk in front
    assert ids[:10].tolist() == [49406, 320, 1125, 539, 320, 49408, 2533, 267, 9200, 49407]
    assert ids.tolist() == prompt_input_ids(tokenizer, clean, {"mcv1": 1}).tolist()


def test_json_sidecar_in_another_encoding_stops_training_in_one_line(tiny_model, prepared_data, tmp_path, capsys):
    import train_magicapture

    source, reference = prepared_data
    meta = reference / "img2.json"
    record = json.loads(meta.read_text("utf-8")) | {"note": "café"}
    text = json.dumps(record, ensure_ascii=False)
    meta.write_bytes(text.encode("cp1252"))
    offset = text.encode("utf-8").index("é".encode("utf-8"))
    expected = f"{meta}: not UTF-8 text (byte 0xe9 at offset {offset} is invalid); {FIX}"
    with pytest.raises(DatasetError) as err:  # the JSON is read in every caption mode
        load_prepared_folder(reference, "reference", 64)
    assert str(err.value) == expected
    assert train_magicapture.main(_tiny_run_args(tiny_model, source, reference, tmp_path / "out")) == 2
    assert _error_lines(capsys.readouterr().err) == [f"error: {expected}"]


# ------------------------------------------------------------------------------------ scheduler config


def test_scheduler_config_utf16_is_read_and_cp1252_refused(tmp_path):
    from diffusers import DDPMScheduler

    from library.generation.options import GenerationError
    from library.generation.samplers import scheduler_base_config

    folder = tmp_path / "model"
    (folder / "scheduler").mkdir(parents=True)
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = SimpleNamespace(model=SimpleNamespace(pretrained=str(folder), config_dir=""))
    parts = SimpleNamespace(noise_scheduler=DDPMScheduler())
    path.write_bytes(codecs.BOM_UTF16_BE + json.dumps({"steps_offset": 3, "timestep_spacing": "trailing"}).encode("utf-16-be"))
    config = scheduler_base_config(cfg, parts)
    assert (config["steps_offset"], config["timestep_spacing"]) == (3, "trailing")
    path.write_bytes(b'{"steps_offset": 1, "_note": "Tom\x92s"}')
    with pytest.raises(GenerationError) as err:
        scheduler_base_config(cfg, parts)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 0x92 at offset 33 is invalid); {FIX}"


# -------------------------------------------------------------------------------------- dataset_tools


def test_prepare_warns_about_an_earlier_item_whose_json_training_cannot_read(tmp_path, capsys):
    from PIL import Image

    from dataset_tools.prepare import main

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.new("RGB", (96, 96), (90, 120, 200)).save(src / "sky.png")
    write_prepared(out, "reference", "mcv2", n=1, size=32)  # an earlier item, img0
    (out / "img0.json").write_bytes(b'{"note": "Tom\x92s"}')
    (out / "orphan.json").write_bytes(b'{"note": "\x92"}')  # no image beside it: not an item, not read by training
    assert main(["reference", str(src), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (f"warning  {out / 'img0.json'}: not UTF-8 text (byte 0x92 at offset 13 is invalid); {FIX} "
            "(or delete that item; training stops on it)") in lines
    assert not any("orphan" in line for line in lines)
