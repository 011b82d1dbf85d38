"""Config errors name the key, the file and the fix; CLI errors are one line with exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from library.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, data_dirs: bool = True) -> Path:
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "r").mkdir(exist_ok=True)
    base = f'[model]\npretrained = "x"\n[data]\nsource_dir = "{tmp_path / "s"}"\nreference_dir = "{tmp_path / "r"}"\n'
    path = tmp_path / "c.toml"
    path.write_text(base + text if data_dirs else text)
    return path


def test_defaults_are_methods():
    cfg = load_config(None, check_paths=False)
    assert (cfg.phase1.steps, cfg.phase1.lr_embeddings) == (1200, 5e-4)
    assert (cfg.phase2.steps, cfg.phase2.lr_unet, cfg.phase2.lr_embeddings, cfg.phase2.max_timestep) == (1500, 1e-4, 1e-5, 800)
    assert (cfg.loss.attn_weight, cfg.loss.id_weight, cfg.loss.id_max_timestep, cfg.loss.mask_eps) == (2.5, 0.25, 800, 0.01)
    assert cfg.phase2.tasks == ["source", "reference", "composed"] and cfg.phase1.tasks == ["source", "reference"]
    assert cfg.optimizer.name == "AdamW8bit" and cfg.optimizer.max_grad_norm == 1.0
    assert (cfg.lora.rank, cfg.lora.targets, cfg.lora.text_encoder) == (4, "cross_attn", True)


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "[phase2]\nstesp = 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "phase2.stesp" in msg and str(path) in msg and "'steps'" in msg and "\n" not in msg


def test_unknown_section_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[phse1\].*'phase1'"):
        load_config(write(tmp_path, "[phse1]\nsteps = 1\n"))
    with pytest.raises(ConfigError, match=r"phase1.steps: expected int, got 'ten'"):
        load_config(write(tmp_path, "[phase1]\nsteps = 'ten'\n"))
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(write(tmp_path, "[lora]\ntext_encoder = 1\n"))


def test_missing_paths_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source_dir = '.*nowhere' is not a folder"):
        load_config(write(tmp_path, '[data]\nsource_dir = "nowhere"\n', data_dirs=False).parent / "c.toml",
                    [f'data.reference_dir="{tmp_path}"', 'model.pretrained="x"'])
    with pytest.raises(ConfigError, match="loss.identity_weights"):
        load_config(write(tmp_path, '[loss]\nidentity_weights = "missing.onnx"\n'))
    with pytest.raises(ConfigError, match="must differ"):
        load_config(write(tmp_path, '[tokens]\nsource = "a1"\nreference = "a1"\n'))
    with pytest.raises(ConfigError, match="composed"):
        load_config(write(tmp_path, '[phase1]\ntasks = ["source", "composed"]\n'))


def test_overrides_and_effective_config_roundtrip(tmp_path):
    path = write(tmp_path, "")
    cfg = load_config(path, ["phase2.steps=7", "output.dir=out/x", "loss.attn_weight=0", "train.mixed_precision=bf16"])
    # a relative path is relative to the working directory, and held (and recorded) absolute
    assert (cfg.phase2.steps, cfg.output.dir, cfg.loss.attn_weight) == (7, str(Path.cwd() / "out" / "x"), 0.0)
    save_config(cfg, tmp_path / "eff.toml")
    again = load_config(tmp_path / "eff.toml")
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["steps=3"])


def test_shipped_configs_parse():
    for name in ("demo.toml", "magicapture_sd15.toml", "low_vram.toml", "test_tiny.toml"):
        load_config(ROOT / "configs" / name, check_paths=False)


def test_cli_error_is_one_line(tmp_path):
    path = write(tmp_path, "[phase2]\nstesp = 10\n")
    proc = subprocess.run([sys.executable, "train_magicapture.py", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "stesp" in proc.stderr


def test_each_choice_is_declared_once_and_acted_on_as_declared():
    """The allowed values of a choice-valued key live in library/config.py; the module that acts on a choice
    has exactly those values, and a value outside them is refused when the config loads, naming them."""
    import typing

    from library import config as c
    from library.models.loading import DTYPES
    from library.training import attention, joint_attention, lora, precision, speed

    assert set(lora.LORA_TARGET_PRESETS) == set(typing.get_args(c.LoraTargets))
    assert attention._BACKENDS == typing.get_args(c.AttentionBackend)
    assert set(joint_attention.NORMALISATIONS) == set(typing.get_args(c.JointNormalisation))
    assert speed.COMPILE_CHOICES == typing.get_args(c.Compile)
    assert set(precision.NAMES) == set(typing.get_args(c.MixedPrecision))
    assert set(DTYPES) == set(typing.get_args(c.SavePrecision))
    # every choice-valued field is typed with its Literal (directly or as a list's items)
    hints = {f"{s}.{k}": t for s, cls in typing.get_type_hints(c.Config).items() if s != "source_file"
             for k, t in typing.get_type_hints(cls).items()}
    literal = {key for key, t in hints.items()
               if typing.get_origin(t) is typing.Literal or typing.get_origin(typing.get_args(t)[0] if typing.get_args(t) else t) is typing.Literal}
    assert literal == {"data.captions", "tokens.norm_pull", "phase1.tasks", "phase2.tasks", "lora.targets",
                       "loss.attn_collapse_action", "loss.id_tasks", "loss.id_face", "attention.backend", "attention.normalisation",
                       "train.mixed_precision", "train.compile", "output.save_precision"}
    for override, line in (('lora.targets="cross"', "command line: lora.targets = 'cross': use cross_attn, attn_geglu or "
                                                    "kohya_all (did you mean 'cross_attn'?)"),
                           ('phase2.tasks=["source", "style"]', "command line: phase2.tasks = 'style': use source, "
                                                                "reference or composed"),
                           ('loss.id_tasks=["reference"]', "command line: loss.id_tasks = 'reference': use source or composed")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [override], check_paths=False)
        assert str(err.value) == line


def test_a_user_error_is_one_line_and_shows_its_causes_under_magicapture_debug(tmp_path, capsys, monkeypatch):
    """Every error a user can cause derives from one base; the entry point prints its one line, and with
    MAGICAPTURE_DEBUG=1 the chain of causes (here tomllib's own error) under it."""
    import train_magicapture
    from library.files.messages import UserError

    config = tmp_path / "bad.toml"
    config.write_text("[model\n")
    assert train_magicapture.main(["--config", str(config)]) == 2
    quiet = capsys.readouterr().err
    assert quiet.splitlines() == [f"error: {config}: not valid TOML: Expected ']' at the end of a table declaration "
                                  f"(at line 1, column 7)"]
    monkeypatch.setenv("MAGICAPTURE_DEBUG", "1")
    assert train_magicapture.main(["--config", str(config)]) == 2
    loud = capsys.readouterr().err
    assert loud.splitlines()[0] == quiet.splitlines()[0]
    assert "tomllib.TOMLDecodeError: Expected ']' at the end of a table declaration" in loud
    assert "The above exception was the direct cause of the following exception" in loud
    from library.training.checkpoint import CheckpointError
    from library.files.atomic import OutputWriteError
    from library.models.kind import ModelLoadError
    from library.training.data import DatasetError
    for cls in (ConfigError, CheckpointError, OutputWriteError, ModelLoadError, DatasetError):
        assert issubclass(cls, UserError)


def test_the_readme_configuration_table_is_generated_from_the_config():
    """README.md's table equals scripts/config_table.py's output: every key, its default, its choices."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", Path(__file__).resolve().parents[1] / "scripts" / "config_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main(["--check"]) == 0
    generated = table.config_table()
    assert "| `lora.targets` | `\"cross_attn\"` | one of `cross_attn`, `attn_geglu`, `kohya_all`. " in generated
    keys = [line.split("|")[1].strip().strip("`") for line in generated.splitlines() if line.startswith("| `")]
    assert len(keys) == sum(len(dataclasses.fields(getattr(Config(), f.name))) for f in dataclasses.fields(Config)
                            if not f.metadata.get("internal"))


def test_one_hub_id_rule_for_the_config_and_the_loader(tmp_path, monkeypatch):
    """config.resolve_paths leaves a hub id as written and the loader then treats it as one; anything else
    is a path (made absolute, then 'not found')."""
    from library.files.paths import looks_like_hub_id
    from library.models.kind import ModelLoadError, local_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt3").mkdir()  # on disk: a folder, whatever its name looks like
    cases = {"runwayml/stable-diffusion-v1-5": True, "gpt2": True, "gpt3": False, "./models/x": False,
             "/models/x": False, "~/x": False, "a/b/c": False, "owner/model.safetensors": False, "": False}
    assert {v: looks_like_hub_id(v) for v in cases} == cases
    with pytest.raises(ModelLoadError, match="looks like a hub id but model.offline is true"):
        local_model_path("gpt2", offline=True)
    assert local_model_path("gpt2", offline=False) is None
    with pytest.raises(ModelLoadError, match="not found or not a model"):
        local_model_path("a/b/c", offline=False)
