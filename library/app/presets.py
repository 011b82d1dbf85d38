"""The Train tab's settings: the presets in configs/, the base model's family, and the TOML the page shows
(the preset with the few settings the page asks for written into it; comments kept).

The flow-matching DiT bases (Z-Image, FLUX.2 Klein 4B / 9B; library/models/dit_family.py) are offered like
SD 1.x and SDXL: the picker shows their family, the family's ``preset`` gives each its config, and a
transformer file alone (ComfyUI's split files) makes the page ask for the text-encoder file, the VAE file
and the tokenizer folder (model.text_encoder, model.vae, model.tokenizer; :func:`missing_split_files`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomlkit

from library.files.messages import one_line
from library.files.text import read_text_file
from library.models.base_model import family_named
from library.models.family import CONFIGS

# label -> file in configs/; a preset whose file is missing (another branch writes it) is not offered
PRESETS = {
    "paper (SD 1.5)": "magicapture_sd15.toml",
    "low VRAM (8 GB)": "low_vram.toml",
    "SDXL": "magicapture_sdxl.toml",
    "SDXL, low VRAM": "low_vram_sdxl.toml",
    "Z-Image": "magicapture_zimage.toml",
    "Z-Image, 24 GB": "magicapture_zimage_24gb.toml",
    "FLUX.2 Klein": "magicapture_klein.toml",
    "FLUX.2 Klein, 24 GB": "magicapture_klein_24gb.toml",
    "demo (tiny model, CPU)": "demo.toml",
}
# The DiT families' configs. ModelFamily.preset says this for SD 1.x / SDXL; DitFamily
# (library/models/dit_family.py) has no such field yet, so the page keeps the mapping here, in one place.
# what a transformer file alone needs besides itself: (ModelConfig key, what the page calls it)
SPLIT_PARTS = (("text_encoder", "text-encoder file"), ("vae", "VAE file"), ("tokenizer", "tokenizer folder"))


def available_presets(configs: Path = CONFIGS) -> dict[str, Path]:
    """The presets whose file exists, label -> path, in PRESETS order."""
    return {label: configs / name for label, name in PRESETS.items() if (configs / name).is_file()}


def preset_for_family(family: str, configs: Path = CONFIGS) -> str | None:
    """The label of the preset a model of `family` ("sd1", "sdxl", "zimage", "klein4b", "klein9b") starts
    from (the family's ``preset``), or None when the family has none or its file is missing."""
    try:
        name = family_named(family).preset
    except ValueError:
        return None
    return next((label for label, path in available_presets(configs).items() if path.name == name), None)


def preset_for_model(path: Path, family: str, configs: Path = CONFIGS) -> str | None:
    """The label of the preset made for the model at `path`: the first (PRESETS order) whose
    model.pretrained, relative to the project, is that path (the demo preset for data/tiny_sd, so that
    the demo model never starts with the paper's 2700 steps), else the family's (preset_for_family)."""
    import tomllib

    chosen = Path(path).resolve()
    for label, file in available_presets(configs).items():
        pretrained = tomllib.loads(read_text_file(file)).get("model", {}).get("pretrained", "")
        if pretrained and (configs.parent / pretrained).resolve() == chosen:
            return label
    return preset_for_family(family, configs)


def identify_model(path: Path) -> tuple[str, str]:
    """(ModelKind.family, a one-line description) of a base model file or folder, read from its headers
    by the trainer's own cheap check (library.models.kind.check_model_files): ModelLoadError (one line)
    when it is not a model this trainer trains. A Z-Image / FLUX.2 Klein transformer file alone comes with a
    note that the page asks for its other parts. A pickled checkpoint is not opened here (opening one runs
    its code): ("", a line saying the family is read when training loads it)."""
    from library.models.kind import check_model_files

    kind = check_model_files(str(path))
    if kind is None:
        return "", f"{Path(path).name}: a pickled checkpoint; its family is read when training loads it"
    if is_split_transformer(Path(path), kind.family):
        return kind.family, f"{kind.describe()}; a transformer file alone: give its text encoder, VAE and tokenizer below"
    return kind.family, kind.describe()


def dit_kind(path: Path) -> "ModelKind | None":  # noqa: F821 - library.models.kind.ModelKind
    """The ModelKind of a Z-Image / FLUX.2 Klein diffusers folder or transformer .safetensors at `path`,
    read from its configs or header (library/models/kind.py, after the weights-file check); None for
    anything else or anything unreadable."""
    from library.files.weights import check_weights_file
    from library.models.dit_family import DIT_FAMILIES
    from library.models.kind import identify_folder, identify_state, safetensors_shapes

    try:
        if path.is_dir():
            kind = identify_folder(path)
        elif path.suffix.lower() == ".safetensors":
            check_weights_file(path)
            kind = identify_state(safetensors_shapes(path))
        else:
            return None
    except Exception:  # noqa: BLE001 - not readable as a DiT: the caller's error stands
        return None
    return kind if kind.family in DIT_FAMILIES else None


def is_split_transformer(path: Path, family: str) -> bool:
    """Whether `path` is a DiT base given as its transformer file alone (ComfyUI's diffusion_models file):
    a file, not a diffusers folder, of a DiT family; its text encoder, VAE and tokenizer come separately."""
    from library.models.dit_family import DIT_FAMILIES

    return family in DIT_FAMILIES and Path(path).is_file()


def missing_split_files(pretrained: str, text_encoder: str, vae: str, tokenizer: str) -> str | None:
    """One line for people saying what a transformer file alone still needs (the empty ones of
    model.text_encoder, model.vae, model.tokenizer), e.g. "models/z.safetensors is a Z-Image transformer
    file alone (ComfyUI's split files): also give its text-encoder file (Qwen3-4B), VAE file and tokenizer
    folder"; None when `pretrained` is no such file or nothing is missing."""
    from library.app.state import relative
    from library.models.dit_family import DIT_FAMILIES

    path = Path(pretrained) if pretrained else None
    kind = dit_kind(path) if path is not None and path.is_file() else None
    if kind is None:
        return None
    given = {"text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    missing = [words for key, words in SPLIT_PARTS if not str(given[key] or "").strip()]
    if not missing:
        return None
    family = DIT_FAMILIES[kind.family]
    qwen = "Qwen3-8B" if family.text_width == 4096 else "Qwen3-4B"
    missing = [f"{m} ({qwen})" if m.startswith("text-encoder") else m for m in missing]
    listed = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    return (f"{relative(path)} is a {family.label} transformer file alone (ComfyUI's split files): "
            f"also give its {listed}")


MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def model_candidates(folders: list[Path]) -> list[Path]:
    """Base models in `folders` and their subfolders (one level): weights files and diffusers folders
    (a model_index.json), sorted by path; what the model picker lists."""
    found = []
    for root in folders:
        for p in sorted(Path(root).glob("*")) + sorted(Path(root).glob("*/*")) if Path(root).is_dir() else []:
            if p.is_dir() and (p / "model_index.json").is_file():
                found.append(p)
            elif p.is_file() and p.suffix.lower() in MODEL_SUFFIXES and p.stat().st_size > 1 << 20:
                found.append(p)  # smaller files are embeddings, LoRAs or identity networks, not base models
    return found


def model_choice(path: Path) -> str:
    """The picker's label: the model's family (or the one line saying why it is not one)."""
    try:
        return identify_model(path)[1]
    except Exception as exc:  # noqa: BLE001 - a broken file is listed with its reason, never breaks the list
        return f"not usable: {one_line(exc)}"
@dataclass
class Settings:
    """What the page asks for; each lands on one TOML key (see :func:`compose`)."""

    pretrained: str
    source_dir: str
    reference_dir: str
    output_dir: str
    output_name: str
    phase1_steps: int
    phase2_steps: int
    source_token: str = "mcv1"
    reference_token: str = "mcv2"
    identity_weights: str = ""
    resolution: int = 0  # 0: the preset's
    text_encoder: str = ""  # a DiT transformer file alone: its Qwen3 text-encoder file (model.text_encoder)
    vae: str = ""  # ... its VAE file (model.vae)
    tokenizer: str = ""  # ... its tokenizer folder (model.tokenizer)


def compose(preset_text: str, s: Settings) -> str:
    """The preset's TOML with the page's settings written into their keys (model.pretrained,
    model.text_encoder / vae / tokenizer, data.source_dir / reference_dir / resolution, phase1.steps, phase2.steps, tokens.source / reference,
    loss.identity_weights, output.dir / name); a setting left "" keeps the preset's value, and the
    preset's comments and other keys are kept.
    ValueError (one line) when the preset is not valid TOML."""
    try:
        doc = tomlkit.parse(preset_text)
    except tomlkit.exceptions.ParseError as err:
        raise ValueError(f"the preset is not valid TOML: {one_line(err)}") from None
    values = {
        ("model", "pretrained"): s.pretrained,
        ("model", "text_encoder"): s.text_encoder,
        ("model", "vae"): s.vae,
        ("model", "tokenizer"): s.tokenizer,
        ("data", "source_dir"): s.source_dir,
        ("data", "reference_dir"): s.reference_dir,
        ("data", "resolution"): int(s.resolution) or "",
        ("phase1", "steps"): int(s.phase1_steps),
        ("phase2", "steps"): int(s.phase2_steps),
        ("tokens", "source"): s.source_token,
        ("tokens", "reference"): s.reference_token,
        ("loss", "identity_weights"): s.identity_weights,
        ("output", "dir"): s.output_dir,
        ("output", "name"): s.output_name,
    }
    for (section, key), value in values.items():
        if value == "":
            continue  # left empty on the page: the preset's value stays (e.g. the demo's identity network)
        if section not in doc:
            doc[section] = tomlkit.table()
        doc[section][key] = value
    return tomlkit.dumps(doc)


def read_preset(label: str, configs: Path = CONFIGS) -> str:
    """The text of preset `label`; KeyError naming the labels on offer when there is no such preset."""
    presets = available_presets(configs)
    if label not in presets:
        raise KeyError(f"no preset {label!r}; choose one of {', '.join(presets)}")
    return read_text_file(presets[label])


def preset_values(label: str, configs: Path = CONFIGS) -> dict[str, int]:
    """What choosing preset `label` sets in the form: {"steps1", "steps2", "resolution"} from its TOML (so
    that the demo preset composes the demo's steps, not the paper's)."""
    import tomllib

    doc = tomllib.loads(read_preset(label, configs))
    return {"steps1": int(doc.get("phase1", {}).get("steps", 0)), "steps2": int(doc.get("phase2", {}).get("steps", 0)),
            "resolution": int(doc.get("data", {}).get("resolution", 0))}
