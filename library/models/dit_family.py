"""What the flow-matching transformer bases -- Z-Image and FLUX.2 Klein 4B / 9B -- are, as data: their
diffusers classes, their text encoder, and the names frontends and peers give them.

``ModelKind.family`` is one of :data:`DIT_FAMILIES`' keys when library/models/kind.py identifies one of
them (from the files, never a flag). The names written into exported files come from the peers:

* ``modelspec.architecture`` (before ``/lora``) and ``ss_base_model_version``: musubi-tuner's names,
  ``src/musubi_tuner/utils/sai_model_spec.py`` (``ARCH_Z_IMAGE = "Z-Image"``, ``ARCH_FLUX_2_KLEIN_4B =
  "Flux.2-klein-4b"``, ``ARCH_FLUX_2_KLEIN_9B = "Flux.2-klein-9b"``, with the implementation URLs) and
  ``src/musubi_tuner/dataset/image_video_dataset.py`` (``ARCHITECTURE_Z_IMAGE_FULL = "z_image"``,
  ``..._FLUX_2_KLEIN_4B_FULL = "flux_2_klein_4b"``, ``..._9B_FULL = "flux_2_klein_9b"``);
* the embedding key: ComfyUI's tokenizers (comfy/text_encoders/z_image.py and flux.py, on
  ``sd1_clip.SDTokenizer``): ``embedding_key='qwen3_4b'`` with ``embedding_size=2560`` (Qwen3-4B: Z-Image
  and Klein 4B), ``embedding_key='qwen3_8b'`` with ``4096`` (Qwen3-8B: Klein 9B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from library.models.dit_keys import FLUX2, ZIMAGE
from library.models.family import CONFIGS


@dataclass(frozen=True)
class DitFamily:
    """One flow-matching transformer base.

    name: ``ModelKind.family``; label: what messages call it.
    arch: the transformer's key layout (library/models/dit_keys.py ZIMAGE / FLUX2).
    pipeline_class, transformer_class, vae_class, text_encoder_class: the diffusers / transformers classes.
    text_width: the real text encoder's hidden size (Qwen3-4B 2560, Qwen3-8B 4096); blocks: FLUX.2's
        (double-stream, single-stream) block counts, () for Z-Image.
    embedding_key: the tensor name of a textual-inversion file ComfyUI reads for this family.
    architecture: ``modelspec.architecture`` before "/lora"; implementation: ``modelspec.implementation``;
    base_model_version: ``ss_base_model_version``; resolution: the default side, pixels.
    config_dir: the real model's component configs shipped in ``configs/<name>/``.
    """

    name: str
    label: str
    arch: str
    pipeline_class: str
    transformer_class: str
    vae_class: str
    text_encoder_class: str
    text_width: int
    blocks: tuple[int, ...]
    embedding_key: str
    architecture: str
    implementation: str
    base_model_version: str
    resolution: int = 1024

    @property
    def config_dir(self) -> Path:
        """The real model's component configs (``configs/<name>/``: transformer, text_encoder, vae and
        scheduler, as its diffusers repository has them, no weights, no tokenizer), what split files load with."""
        return CONFIGS / self.name


ZIMAGE_FAMILY = DitFamily(
    name="zimage", label="Z-Image", arch=ZIMAGE, pipeline_class="ZImagePipeline",
    transformer_class="ZImageTransformer2DModel", vae_class="AutoencoderKL", text_encoder_class="Qwen3Model",
    text_width=2560, blocks=(), embedding_key="qwen3_4b", architecture="Z-Image",
    implementation="https://github.com/Tongyi-MAI/Z-Image", base_model_version="z_image",
)
KLEIN4B = DitFamily(
    name="klein4b", label="FLUX.2 Klein 4B", arch=FLUX2, pipeline_class="Flux2KleinPipeline",
    transformer_class="Flux2Transformer2DModel", vae_class="AutoencoderKLFlux2", text_encoder_class="Qwen3ForCausalLM",
    text_width=2560, blocks=(5, 20), embedding_key="qwen3_4b", architecture="Flux.2-klein-4b",
    implementation="https://github.com/black-forest-labs/flux2", base_model_version="flux_2_klein_4b",
)
KLEIN9B = DitFamily(
    name="klein9b", label="FLUX.2 Klein 9B", arch=FLUX2, pipeline_class="Flux2KleinPipeline",
    transformer_class="Flux2Transformer2DModel", vae_class="AutoencoderKLFlux2", text_encoder_class="Qwen3ForCausalLM",
    text_width=4096, blocks=(8, 24), embedding_key="qwen3_8b", architecture="Flux.2-klein-9b",
    implementation="https://github.com/black-forest-labs/flux2", base_model_version="flux_2_klein_9b",
)
DIT_FAMILIES: dict[str, DitFamily] = {f.name: f for f in (ZIMAGE_FAMILY, KLEIN4B, KLEIN9B)}
KLEIN_BY_BLOCKS: dict[tuple[int, ...], DitFamily] = {f.blocks: f for f in (KLEIN4B, KLEIN9B)}
