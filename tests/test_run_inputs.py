"""Paths and model files answer before any work (issue 16, kinds 5 and 6).

- Paths: relative paths are relative to the working directory and recorded absolute, so a run continues
  and samples from any folder; the same folder written absolutely is no change; a Windows path in a TOML
  double-quoted string says how to write it.
- Broken model files (a Git LFS pointer, a web page, a truncated file, a header that claims 2 GB), as the
  base model, one of a diffusers folder's components, model.vae or the identity network, are refused in
  one line naming the file before any network is built: no model constructed, memory under 200 MiB
  (measured with tracemalloc, not a clock).
"""

from __future__ import annotations

import shutil
import struct
import tomllib
import tracemalloc
from pathlib import Path

import pytest

import generate
import train_magicapture
from cli_output import one_error_line
from library.config import ConfigError, load_config
from library.training.resume import compare_configs

ROOT = Path(__file__).resolve().parent.parent


def error_line(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- kind 5: paths

TINY = (ROOT / "configs" / "test_tiny.toml").read_text()


def test_a_run_with_relative_paths_continues_and_samples_from_another_folder(tiny_model, prepared_data, tmp_path,
                                                                             monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny_sd").symlink_to(tiny_model[0])
    shutil.copytree(prepared_data[0], work / "data" / "me")
    shutil.copytree(prepared_data[1], work / "data" / "style")
    config = TINY.replace('"data/tiny_sd"', '"models/tiny_sd"').replace('"data/demo/source"', '"data/me"') \
        .replace('"data/demo/reference"', '"data/style"').replace('"out/test"', '"out/me"')
    (work / "me.toml").write_text(config)
    monkeypatch.chdir(work)
    assert train_magicapture.main(["--config", "me.toml", "logging.tensorboard=false"]) == 0

    effective = work / "out" / "me" / "effective_config.toml"
    recorded = tomllib.loads(effective.read_text())
    assert recorded["model"]["pretrained"] == str(work / "models" / "tiny_sd")
    assert (recorded["data"]["source_dir"], recorded["data"]["reference_dir"]) == (str(work / "data" / "me"),
                                                                                  str(work / "data" / "style"))
    assert recorded["output"]["dir"] == str(work / "out" / "me")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert train_magicapture.main(["--config", str(effective), "--resume", "latest", "phase2.steps=4"]) == 0
    assert "resuming from checkpoint-p2-000003: phase 2, step 3" in capsys.readouterr().out
    history = (work / "out" / "me" / "loss_history.jsonl").read_text().splitlines()
    assert history[-1].startswith('{"phase": 2, "step": 4,')
    assert generate.main(["--config", str(effective), "--n", "1", "--steps", "2", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (work / "out" / "me" / "generated").glob("*.png") if not p.name.startswith("grid"))

    # back in the first folder: the same data folder written absolutely is not a change
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert train_magicapture.main(["--config", "me.toml", "--resume", "latest", "phase2.steps=5",
                                   f'data.source_dir="{work / "data" / "me"}"', "logging.tensorboard=false"]) == 0
    out = capsys.readouterr().out
    assert "resume: changed since checkpoint-p2-000004, and safe to change: phase2.steps 4 -> 5" in out
    assert "source_dir" not in out


def test_a_checkpoint_that_recorded_relative_paths_still_compares_equal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "me").mkdir(parents=True)
    new = load_config(None, ['data.source_dir="data/me"'], check_paths=False).to_dict()
    assert new["data"]["source_dir"] == str(tmp_path / "data" / "me")
    old = {"data": {"source_dir": "data/me"}}  # written by an earlier version, in this folder
    assert compare_configs(old, new, 2, 1) == ([], [])
    moved = {"data": {"source_dir": "data/other"}}
    refused, _ = compare_configs(moved, new, 2, 1)
    assert [c.key for c in refused] == ["data.source_dir"]


WINDOWS_HINT = ("a backslash inside double quotes starts an escape in TOML: write Windows paths in single quotes "
                "('C:\\Users\\me\\model.safetensors') or with forward slashes (\"C:/Users/me/model.safetensors\")")


@pytest.mark.parametrize("value, says", [
    ('"C:\\Users\\me\\sd15.safetensors"', "win.toml: not valid TOML: Invalid hex value (at line 2, column 19); "),
    ('"D:\\models\\sd15.safetensors"', "win.toml: not valid TOML: Unescaped '\\' in a string (at line 2, column 19); "),
    # "\t" and "\f" are valid escapes: the parser gives "D:<tab>emp<form feed>ile..." and only the check of path keys sees it
    ('"D:\\temp\\file.safetensors"', "D:\\temp\\x0cile.safetensors' holds a control character; "),
])
def test_a_windows_path_in_double_quotes_says_how_to_write_it(tmp_path, monkeypatch, capsys, value, says):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "win.toml"
    config.write_text(f"[model]\npretrained = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert says in message and message.endswith(WINDOWS_HINT), message
    assert train_magicapture.main(["--config", str(config)]) == 2
    assert error_line(capsys) == f"error: {message}"
    single = tmp_path / "single.toml"  # what the hint says works
    single.write_text("[model]\npretrained = 'C:\\Users\\me\\sd15.safetensors'\n")
    assert load_config(single, check_paths=False).model.pretrained == str(tmp_path / "C:\\Users\\me\\sd15.safetensors")


# ------------------------------------------------------------------------------------------- kind 6: model files

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 3438167536\n"
HTML = b"<!DOCTYPE html>\n<html lang='en'><head><title>Sign in - Hugging Face</title></head><body>...</body></html>\n"


def _broken(kind: str, path: Path, good: Path | None = None) -> Path:
    """Write one broken weights file of `kind` at `path` (a sparse 2.1 GB file for the header's lie)."""
    if kind == "lfs":
        path.write_bytes(LFS)
    elif kind == "html":
        path.write_bytes(HTML)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "2gb_header":
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 2_000_000_000) + b'{"model.diffusion_model.x": {')
            f.truncate(2_100_000_000)  # sparse: no disk used, but the file is as large as the header claims
    return path


SAYS = {
    "lfs": "a Git LFS pointer of a 3.20 GiB file (135 bytes), not the weights; run `git lfs pull` in the repository it "
           "came from, or download the file itself",
    "html": "a web page (HTML), not weights: the download saved a page (a login, an error or the model's page) instead "
            "of the file; download the file itself (on Hugging Face the 'download' link, /resolve/)",
    "truncated": "not a readable .safetensors file (truncated: it ends before the tensors its header lists, at ",
    "2gb_header": "not a readable .safetensors file (its header claims 1,907 MiB, over the 100 MB a header may have): "
                  "damaged, or not a .safetensors file",
}


@pytest.fixture
def nothing_built(monkeypatch) -> dict[str, int]:
    """Counts networks built (diffusers and transformers models)."""
    import diffusers
    import transformers

    counts = {"models": 0}
    for cls in (diffusers.ModelMixin, transformers.PreTrainedModel):
        real_init = cls.__init__

        def counted_init(self, *args, _real=real_init, **kwargs):
            counts["models"] += 1
            _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted_init)
    return counts


@pytest.mark.parametrize("kind", sorted(SAYS))
@pytest.mark.parametrize("where", ["single file", "diffusers folder", "model.vae", "identity weights"])
def test_broken_model_files_are_refused_before_anything_is_built(tiny_model, prepared_data, tmp_path, capsys,
                                                                 nothing_built, model_loads, kind, where):
    folder, single = tiny_model
    source, reference = prepared_data
    args = ["--config", str(ROOT / "configs" / "test_tiny.toml"), f'data.source_dir="{source}"',
            f'data.reference_dir="{reference}"', f'output.dir="{tmp_path / "out"}"']
    if where == "single file":
        broken = _broken(kind, tmp_path / "sd15.safetensors", single)
        args.append(f'model.pretrained="{broken}"')
    elif where == "diffusers folder":  # a clone without `git lfs pull`: configs there, one component's weights not
        model = tmp_path / "sd15"
        shutil.copytree(folder, model)
        unet = model / "unet" / "diffusion_pytorch_model.safetensors"
        _broken(kind, unet, folder / "unet" / "diffusion_pytorch_model.safetensors")
        broken = unet
        args.append(f'model.pretrained="{model}"')
    elif where == "model.vae":
        broken = _broken(kind, tmp_path / "vae.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors")
        args += [f'model.pretrained="{folder}"', f'model.vae="{broken}"']
    else:
        broken = _broken(kind, tmp_path / "arcface.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors")
        args += [f'model.pretrained="{folder}"', f'loss.identity_weights="{broken}"']
    tracemalloc.start()
    try:
        rc = train_magicapture.main(args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    line = error_line(capsys)
    assert rc == 2
    assert f"{broken}: {SAYS[kind]}" in line, line
    assert nothing_built == {"models": 0} and model_loads["n"] == 0
    assert peak < 200 * 2**20, peak
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, says", [("model.config_dir", "is not a folder; give a diffusers / transformers model folder"),
                                       ("evaluation.clip", "is not a folder; give a diffusers / transformers model folder"),
                                       ("evaluation.aesthetic", "does not exist")])
def test_every_path_a_run_reads_is_checked_when_the_config_loads(tmp_path, key, says):
    (tmp_path / "s").mkdir()
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        load_config(None, ['model.pretrained="x"', f'data.source_dir="{tmp_path / "s"}"',
                           f'data.reference_dir="{tmp_path / "s"}"', f'{key}="{missing}"'])
    assert str(err.value) == f"<defaults>: {key} = '{missing}' {says}"  # a config from overrides alone
