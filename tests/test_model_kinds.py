"""Issue 8, item 2: a base model that is not what the trainer assumes is identified and refused in one
line before any work; model.vae replaces (or supplies) the checkpoint's VAE.

Every other kind is derived here from the tiny SD 1.x model (testkit/tiny.py): keys renamed to SDXL's
(an SDXL without its second text encoder) or SD 2.x's text encoders, a 9- or 8-channel conv_in, a component's keys dropped, a v-prediction
scheduler config, A1111's sidecar .yaml, a LoRA or a VAE given as the model. Each refusal is asserted as
the exact line `train_magicapture.main` prints, with exit code 2, no output folder, no latents cached and
no pipeline built.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.loading import ModelLoadError, load_stable_diffusion
from library.models.sgm_keys import vae_to_original
from library.models.family import SD1
from testkit.tiny import TINY_VAE
from train_magicapture import main

ROOT = Path(__file__).resolve().parents[1]
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
USE_SD1 = "use an SD 1.x text-to-image model such as v1-5-pruned-emaonly.safetensors"
ONLY_SD1 = ("this trainer trains SD 1.x, SDXL, Z-Image and FLUX.2 Klein: use an SD 1.x, SDXL, Z-Image or FLUX.2 Klein "
            "text-to-image model such as v1-5-pruned-emaonly.safetensors or sd_xl_base_1.0.safetensors")
NOT_V = f"this trainer trains epsilon-prediction models only: {USE_SD1} (not a v-prediction fine-tune)"
NOT_INPAINT = ("training needs a text-to-image model (4-channel conv_in): use the model it was made from, "
               "e.g. v1-5-pruned-emaonly.safetensors")
INCOMPLETE = "use a full checkpoint (UNet, VAE and text encoder), e.g. v1-5-pruned-emaonly.safetensors"
NEEDS_VAE = ("an SD 1.x model without a VAE; set model.vae to a VAE file or folder, "
             "e.g. vae-ft-mse-840000-ema-pruned.safetensors")
INCOMPLETE_XL = "use a full checkpoint (UNet, VAE and both text encoders), e.g. sd_xl_base_1.0.safetensors"
NO_G = f"no second text encoder; {INCOMPLETE_XL}"  # SD 1.x keys renamed: CLIP-L only
NO_G_FOLDER = f"no second text encoder and no second tokenizer; {INCOMPLETE_XL}"


@pytest.fixture(scope="module")
def tiny_state(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model[1]))


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _renamed(state: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


def _derived_folder(folder: Path, dest: Path, drop: tuple[str, ...] = (), edit: dict | None = None) -> Path:
    """The tiny diffusers folder with components dropped and JSON files edited; weights are symlinks."""
    dest.mkdir()
    for item in folder.iterdir():
        if item.name in drop:
            continue
        if item.is_dir():
            (dest / item.name).mkdir()
            for f in item.iterdir():
                (dest / item.name / f.name).symlink_to(f)
        else:
            shutil.copy(item, dest / item.name)
    for rel, changes in (edit or {}).items():
        target = dest / rel
        data = json.loads(target.read_text())
        data.update(changes)
        target.unlink()
        target.write_text(json.dumps(data))
    return dest


def _run(capsys, tmp_path: Path, prepared_data, pretrained: Path, *extra: str, config_dir: Path | None = None):
    """main() on the tiny config; returns (exit code, stderr lines starting with error:, stderr, out dir)."""
    source, reference = prepared_data
    out = tmp_path / "out"
    args = ["--config", str(ROOT / "configs" / "test_tiny.toml"), f'model.pretrained="{pretrained}"',
            f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', f'output.dir="{out}"', *extra]
    if config_dir is not None:
        args.append(f'model.config_dir="{config_dir}"')
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")], err, out


@pytest.fixture
def no_work(monkeypatch):
    """Building a pipeline or caching latents fails the test: a refusal must come before either."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    import library.training.trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the model was refused")

    monkeypatch.setattr(library.training.trainer, "cache_set", forbidden)
    for pipeline in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(pipeline, "from_single_file", forbidden)
        monkeypatch.setattr(pipeline, "from_pretrained", forbidden)


def _single_file_cases(state: dict, d: Path) -> list[tuple[Path, str]]:
    """(file, its one-line refusal after 'error: <file>: ') for each kind of single file."""
    conv = state[CONV_IN]
    yaml_v = d / "v1_vpred.safetensors"
    _write(yaml_v, state)
    yaml_v.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n    unet_config: {}\n')
    sdxl = _renamed(state, "cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
    sdxl_ckpt = d / "sdxl.ckpt"
    torch.save({"state_dict": sdxl}, sdxl_ckpt)
    inpaint_ckpt = d / "inpaint.pt"
    torch.save({**state, CONV_IN: torch.zeros(conv.shape[0], 9, 3, 3)}, inpaint_ckpt)
    return [
        (_write(d / "sdxl.safetensors", sdxl), f"an incomplete SDXL model (conditioner.embedders.* keys): {NO_G}"),
        (sdxl_ckpt, f"an incomplete SDXL model (conditioner.embedders.* keys): {NO_G}"),
        (_write(d / "sd2.safetensors", _renamed(state, "cond_stage_model.transformer.", "cond_stage_model.model.")),
         f"an SD 2.x model (OpenCLIP ViT-H text encoder: cond_stage_model.model.* keys); {ONLY_SD1}"),
        (_write(d / "inpaint.safetensors", {**state, CONV_IN: torch.zeros(conv.shape[0], 9, 3, 3)}),
         f"an SD 1.x inpainting model (9-channel conv_in); {NOT_INPAINT}"),
        (inpaint_ckpt, f"an SD 1.x inpainting model (9-channel conv_in); {NOT_INPAINT}"),
        (_write(d / "pix2pix.safetensors", {**state, CONV_IN: torch.zeros(conv.shape[0], 8, 3, 3)}),
         f"an SD 1.x InstructPix2Pix-style model (8-channel conv_in); {NOT_INPAINT}"),
        (yaml_v, f'an SD 1.x v-prediction model (parameterization: "v" in its .yaml); {NOT_V}'),
        (_write(d / "vkey.safetensors", {**state, "v_pred": torch.zeros(0)}), f"an SD 1.x v-prediction model (a v_pred key); {NOT_V}"),
        (_write(d / "novae.safetensors", {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}), NEEDS_VAE),
        (_write(d / "note.safetensors", {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}),
         f"an incomplete SD 1.x model: no text encoder; {INCOMPLETE}"),
        (_write(d / "nounet.safetensors", {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}),
         f"an incomplete SD 1.x model: no UNet; {INCOMPLETE}"),
        (_write(d / "vae_only.safetensors", {k: v for k, v in state.items() if k.startswith("first_stage_model.")}),
         "a VAE alone, not a full model; give it as model.vae, and a full SD 1.x checkpoint as model.pretrained"),
        (_write(d / "lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}),
         "a LoRA (lora_* keys), not a base model; give the SD 1.x model it was trained on as model.pretrained"),
        (_write(d / "embedding.safetensors", {"emb_params": torch.zeros(1, 768)}),
         f"a textual-inversion embedding, not a base model; {USE_SD1}"),
        (_write(d / "other.safetensors", {"weight": torch.zeros(3)}),
         f"not a Stable Diffusion checkpoint (no model.diffusion_model.* or cond_stage_model.* keys); {USE_SD1}"),
    ]


def test_single_files_of_other_kinds_are_refused_in_one_line_before_any_work(
        tiny_model, tiny_state, prepared_data, tmp_path, capsys, no_work):
    models = tmp_path / "models"
    models.mkdir()
    cases = _single_file_cases(tiny_state, models)
    for i, (path, message) in enumerate(cases):
        rc, errors, err, out = _run(capsys, tmp_path / str(i), prepared_data, path, config_dir=tiny_model[0])
        assert (rc, errors) == (2, [f"error: {path}: {message}"]), path.name
        assert "Traceback" not in err and not out.exists(), path.name


def _folder_cases(folder: Path, d: Path) -> list[tuple[Path, str]]:
    xl_index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    return [
        (_derived_folder(folder, d / "vpred", edit={"scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}}),
         f'an SD 1.x v-prediction model (scheduler prediction_type = "v_prediction"); {NOT_V}'),
        (_derived_folder(folder, d / "sdxl", edit={"model_index.json": xl_index}),
         f"an incomplete SDXL model (StableDiffusionXLPipeline with text_encoder_2): {NO_G_FOLDER}"),
        (_derived_folder(folder, d / "sdxl_unet", edit={"unet/config.json": {"addition_embed_type": "text_time"}}),
         f"an incomplete SDXL model (UNet addition_embed_type text_time): {NO_G_FOLDER}"),
        (_derived_folder(folder, d / "sd2", edit={"unet/config.json": {"cross_attention_dim": 1024},
                                                   "scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}}),
         f'an SD 2.x v-prediction model (cross-attention dim 1024; scheduler prediction_type = "v_prediction"); {ONLY_SD1}'),
        (_derived_folder(folder, d / "inpaint", edit={"unet/config.json": {"in_channels": 9},
                                                       "model_index.json": {"_class_name": "StableDiffusionInpaintPipeline"}}),
         f"an SD 1.x inpainting model (9-channel conv_in); {NOT_INPAINT}"),
        (_derived_folder(folder, d / "novae", drop=("vae",)), NEEDS_VAE),
        (_derived_folder(folder, d / "note", drop=("text_encoder",)), f"an incomplete SD 1.x model: no text encoder; {INCOMPLETE}"),
        (_derived_folder(folder, d / "notok", drop=("tokenizer", "scheduler")),
         f"an incomplete SD 1.x model: no tokenizer and no scheduler; {INCOMPLETE}"),
        (_derived_folder(folder, d / "flux", drop=("unet",), edit={"model_index.json": {
            "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"], "unet": [None, None]}}),
         f"a FluxPipeline model without a UNet, not Stable Diffusion 1.x; {USE_SD1}"),
    ]


def test_diffusers_folders_of_other_kinds_are_refused_in_one_line_before_any_work(
        tiny_model, prepared_data, tmp_path, capsys, no_work):
    models = tmp_path / "models"
    models.mkdir()
    cases = _folder_cases(tiny_model[0], models)
    empty_weights = _derived_folder(tiny_model[0], models / "no_unet_weights", drop=())
    for f in (empty_weights / "unet").glob("*.safetensors"):
        f.unlink()
    cases.append((empty_weights, f"an incomplete SD 1.x model: no UNet; {INCOMPLETE}"))
    vae_dir = models / "just_vae"
    shutil.copytree(tiny_model[0] / "vae", vae_dir)
    cases.append((vae_dir, "a VAE folder, not a full model; give it as model.vae, and a full SD 1.x model as model.pretrained"))
    plain = models / "plain"
    plain.mkdir()
    cases.append((plain, "not a diffusers model folder (no model_index.json or unet/ inside); "
                         "give a diffusers folder or an SD 1.x or SDXL .safetensors file"))
    for i, (path, message) in enumerate(cases):
        rc, errors, err, out = _run(capsys, tmp_path / str(i), prepared_data, path)
        assert (rc, errors) == (2, [f"error: {path}: {message}"]), path.name
        assert "Traceback" not in err and not out.exists(), path.name


def test_text_files_a_model_comes_with_are_read_in_any_unicode_and_broken_ones_named(tiny_model, tiny_state, tmp_path):
    """model_index.json and configs with a UTF-8 BOM or in UTF-16 are read; a sidecar that is not text or not
    YAML is an error naming it (not a traceback)."""
    from library.models.kind import identify_folder, sidecar_parameterization

    folder = _derived_folder(tiny_model[0], tmp_path / "bom")
    index = folder / "model_index.json"
    text = index.read_text()
    index.write_bytes(b"\xef\xbb\xbf" + text.encode())
    sched = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(sched.read_text()) | {"prediction_type": "v_prediction"}
    sched.unlink()
    sched.write_text(json.dumps(data), encoding="utf-16")
    kind = identify_folder(folder)
    assert (kind.family, kind.prediction, kind.missing) == ("sd1", "v_prediction", ())

    ckpt = tmp_path / "m.safetensors"
    sidecar = ckpt.with_suffix(".yaml")
    sidecar.write_bytes("model:\n  params:\n    parameterization: \"v\"\n".encode("utf-16"))
    assert sidecar_parameterization(ckpt) == "v"
    sidecar.write_text("model:\n  params:\n    parameterization: eps\n")
    assert sidecar_parameterization(ckpt) == "eps"
    sidecar.write_bytes(b"model: \x92 caf\xe9\n")
    with pytest.raises(ModelLoadError) as info:
        sidecar_parameterization(ckpt)
    assert str(info.value) == f"{sidecar}: not UTF-8 text (byte 0x92 at offset 7 is invalid); re-save it as UTF-8"
    sidecar.write_text("model: [unclosed\n")
    with pytest.raises(ModelLoadError, match=r"m\.yaml: not valid YAML \(.*\); fix or remove it$"):
        sidecar_parameterization(ckpt)
    (folder / "unet" / "config.json").unlink()
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        identify_folder(folder)
    assert str(info.value) == f"{folder / 'unet' / 'config.json'}: not valid JSON (Expecting property name enclosed in double quotes at line 1); fix or replace the file"


def test_an_epsilon_sidecar_and_an_sd1_checkpoint_still_load(tiny_model, tiny_state, tmp_path):
    """The supported kind is not caught by the checks: an A1111 .yaml that says eps, a .ckpt, the folder."""
    path = _write(tmp_path / "sd15.safetensors", tiny_state)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    parts = load_stable_diffusion(str(path), config_dir=tiny_model[0])
    assert (parts.kind.family, parts.kind.prediction, parts.kind.in_channels, parts.kind.missing) == ("sd1", "epsilon", 4, ())
    assert parts.kind.base_model_version == "sd_v1" and parts.vae_name is None


# ------------------------------------------------------------------------------------------ model.vae
def _other_vae(seed: int = 5):
    """An AutoencoderKL of the tiny model's shape with different weights."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in SD1.component_config("vae").items() if not k.startswith("_")} | TINY_VAE
    torch.manual_seed(seed)
    return AutoencoderKL(**cfg)


def test_model_vae_replaces_the_checkpoints_vae_in_every_layout(tiny_model, tiny_state, tmp_path):
    """A VAE file in the original layout (full-checkpoint prefix or bare, .safetensors or .ckpt), in
    diffusers' layout, or a diffusers VAE folder: the loaded VAE holds exactly its weights, for a single-file
    base without a VAE and (two layouts) for the diffusers folder, whose own VAE it replaces."""
    vae = _other_vae()
    want = vae.state_dict()
    original = vae_to_original(want)
    bare = {k[len("first_stage_model."):]: v for k, v in original.items()}
    files = {
        "prefixed.safetensors": lambda p: _write(p, original),
        "bare.safetensors": lambda p: _write(p, bare),
        "diffusers.safetensors": lambda p: _write(p, want),
        "bare.ckpt": lambda p: torch.save({"state_dict": bare}, p),
        "folder": lambda p: vae.save_pretrained(p),
    }
    no_vae = _write(tmp_path / "novae.safetensors", {k: v for k, v in tiny_state.items() if not k.startswith("first_stage_model.")})
    own = load_stable_diffusion(str(tiny_model[0])).vae.state_dict()
    assert not torch.equal(own["decoder.conv_out.weight"], want["decoder.conv_out.weight"])
    for name, make in files.items():
        make(tmp_path / name)
        bases = [(no_vae, tiny_model[0])] + ([(tiny_model[0], None)] if name in ("prefixed.safetensors", "folder") else [])
        for base, config_dir in bases:
            parts = load_stable_diffusion(str(base), config_dir=config_dir, vae=str(tmp_path / name))
            got = parts.vae.state_dict()
            assert set(got) == set(want), name
            assert all(torch.equal(got[k], want[k]) for k in want), (name, base.name)
            assert parts.vae_name == name


def test_model_vae_that_does_not_fit_is_one_line(tiny_model, tiny_state, tmp_path):
    lora = _write(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    no_vae = _write(tmp_path / "novae.safetensors", {k: v for k, v in tiny_state.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(ModelLoadError) as info:
        load_stable_diffusion(str(no_vae), config_dir=tiny_model[0], vae=str(lora))
    assert str(info.value) == (
        f"model.vae = '{lora}': not an SD 1.x VAE for this model (244 weights missing, 0 of another shape, "
        "e.g. encoder.conv_in.weight); give the VAE file of an SD 1.x model, e.g. vae-ft-mse-840000-ema-pruned.safetensors")
    # the tiny VAE against SD 1.5's VAE config (no model.config_dir): same names, other shapes
    vae = _write(tmp_path / "vae.safetensors", vae_to_original(_other_vae().state_dict()))
    with pytest.raises(ModelLoadError, match=r"not an SD 1\.x VAE for this model \(4 weights missing, 238 of another shape"):
        load_stable_diffusion(str(no_vae), vae=str(vae))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as info:
        load_stable_diffusion(str(no_vae), config_dir=tiny_model[0], vae=str(empty))
    assert str(info.value) == (f"model.vae = '{empty}': a folder without config.json or vae/config.json; "
                               "give a VAE file or a diffusers VAE folder")


def test_training_with_model_vae_uses_it_and_records_it(tiny_model, tiny_state, prepared_data, tmp_path, capsys):
    """A checkpoint without a VAE trains with model.vae: the trainer's VAE holds the file's weights, the
    run finishes, and the LoRA's metadata names the VAE and the identified base model."""
    from library.config import load_config
    from library.export.metadata import file_sha256
    from library.training.trainer import MagiCaptureTrainer

    vae = _other_vae()
    vae_file = _write(tmp_path / "my_vae.safetensors", vae_to_original(vae.state_dict()))
    no_vae = _write(tmp_path / "novae.safetensors", {k: v for k, v in tiny_state.items() if not k.startswith("first_stage_model.")})
    source, reference = prepared_data
    out = tmp_path / "out"
    cfg = load_config(ROOT / "configs" / "test_tiny.toml", [
        f'model.pretrained="{no_vae}"', f'model.config_dir="{tiny_model[0]}"', f'model.vae="{vae_file}"',
        f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', f'output.dir="{out}"',
        "phase1.steps=1", "phase2.steps=1", "output.save_every=0"])
    trainer = MagiCaptureTrainer(cfg)
    got = trainer.vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in vae.state_dict().items())
    lora = trainer.run()
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_vae_name"] == "my_vae.safetensors" and meta["ss_new_vae_hash"] == file_sha256(vae_file)
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == ("sd_v1", "False", "False")
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == ("stable-diffusion-v1/lora", "epsilon")


def test_model_vae_missing_path_is_a_config_error(tiny_model, prepared_data, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    rc, errors, _, out = _run(capsys, tmp_path, prepared_data, tiny_model[0], f'model.vae="{missing}"')
    assert (rc, errors) == (2, [f"error: {ROOT / 'configs' / 'test_tiny.toml'}: model.vae = '{missing}' does not exist; "
                                "give a VAE .safetensors file or folder"])
    assert not out.exists()


def test_metadata_records_the_identified_base_model(tiny_model):
    from library.export.metadata import build_metadata

    common = dict(output_name="x", rank=4, alpha=4, unet_targets_preset="cross_attn", train_text_encoder=True,
                  tokens={"source": "mcv1", "reference": "mcv2"}, base_model_name="m.safetensors",
                  base_model_hash=None, training={}, state_dict={"a": torch.zeros(1)}, date="2024-01-01T00:00:00")
    v1 = build_metadata(**common)
    assert (v1["ss_base_model_version"], v1["ss_v2"], v1["ss_v_parameterization"], v1["modelspec.architecture"],
            v1["modelspec.prediction_type"]) == ("sd_v1", "False", "False", "stable-diffusion-v1/lora", "epsilon")
    assert "ss_vae_name" not in v1
    v2 = build_metadata(**common, base_model_version="sd_v2", v_parameterization=True, vae_name="/home/u/vae.pt")
    assert (v2["ss_base_model_version"], v2["ss_v2"], v2["ss_v_parameterization"], v2["modelspec.architecture"],
            v2["modelspec.prediction_type"], v2["ss_vae_name"]) == (
        "sd_v2", "True", "True", "stable-diffusion-v2-768-v/lora", "v", "vae.pt")
    with pytest.raises(ValueError, match="unknown base_model_version 'sd_v3'"):
        build_metadata(**common, base_model_version="sd_v3")


def test_a_hub_id_is_identified_from_its_configs_before_its_weights(tiny_model, tiny_sdxl_model, tmp_path, monkeypatch):
    """With model.offline = false only the configs are fetched first; an incomplete SDXL repository is refused
    before any weights are downloaded, an SD 1.x one and a complete SDXL one go on to the full download."""
    import huggingface_hub
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = _derived_folder(tiny_model[0], tmp_path / "sdxl", edit={"model_index.json": {
        "_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}})
    for f in sdxl.glob("*/*.safetensors"):
        f.unlink()  # what allow_patterns leaves: configs only
    complete_xl = _derived_folder(tiny_sdxl_model[0], tmp_path / "complete_xl")
    for f in complete_xl.glob("*/*.safetensors"):
        f.unlink()
    fetched = []

    def configs_only(repo_id, allow_patterns=None, **kwargs):
        fetched.append((repo_id, allow_patterns))
        return str({"someone/sd-xl": sdxl, "someone/sdxl-base": complete_xl}.get(repo_id, tiny_model[0]))

    def full_download(*args, **kwargs):
        raise RuntimeError("full download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", configs_only)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", full_download)
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", full_download)
    with pytest.raises(ModelLoadError) as info:
        load_stable_diffusion("someone/sd-xl", offline=False)
    assert str(info.value) == f"someone/sd-xl: an incomplete SDXL model (StableDiffusionXLPipeline with text_encoder_2): {NO_G_FOLDER}"
    assert fetched[0][1] and all(p.endswith(".json") for p in fetched[0][1] if "vocab" not in p)
    with pytest.raises(RuntimeError, match="full download"):
        load_stable_diffusion("someone/sd15", offline=False)
    with pytest.raises(RuntimeError, match="full download"):
        load_stable_diffusion("someone/sdxl-base", offline=False)


def test_a_complete_sdxl_model_loads_in_every_form(tiny_sdxl_model, tmp_path):
    """What was refused as "planned" loads now: the SDXL folder, its SGM single file, and that file with an
    A1111 sidecar .yaml that says eps (Pony / Illustrious files are this kind)."""
    folder, single = tiny_sdxl_model
    sidecar = _write(tmp_path / "pony.safetensors", load_file(str(single)))
    sidecar.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    for path, config_dir in ((folder, None), (single, folder), (sidecar, folder)):
        parts = load_stable_diffusion(str(path), config_dir=config_dir)
        assert (parts.kind.family, parts.kind.prediction, parts.kind.in_channels, parts.kind.missing) == ("sdxl", "epsilon", 4, ())
        assert parts.family.name == "sdxl" and parts.kind.base_model_version == "sdxl_base_v1-0"
        assert parts.text_encoder_2 is not None and parts.tokenizer_2 is not None
