"""Shared fixtures: the tiny SD 1.x model (built once per session) and small prepared data folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testkit.tiny import write_prepared

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# What makes a test slow (`make test-fast` runs the rest, `-m fast`): the tiny models (built once per session,
# seconds each) and everything built on them (a trainer, a pipeline), a real training run in a subprocess
# (about ten seconds of imports each), the browser, and the few tests below that take over about 1.5 s on
# two cores for another reason (a real network on real photos, a command line in a subprocess), measured
# with `pytest -m fast --durations=40`. A test marked `@pytest.mark.slow` where it is defined counts too.
HEAVY_FIXTURES = {"tiny_model", "tiny_sdxl_model", "tiny_folder", "inputs", "runs"}
SUBPROCESS_MODULES = {"test_resume", "test_processes", "test_sweep", "test_sweep_jobs", "test_bench", "test_output_guards",
                      "test_app_browser", "test_fuzz"}
SLOW_TESTS = {
    "test_postprocess": {"test_restoration_only_chain_changes_face_and_keeps_background", "test_sr_and_gfpgan_chain_x4",
                         "test_load_face_restorers", "test_cli_as_a_module_missing_weights",
                         "test_wrong_kind_and_bad_files_give_one_line_value_errors"},
    "test_hostile_files": {"test_lying_safetensors_headers_are_refused_without_allocating_what_they_claim"},
    "test_prepare": {"test_parser_weights_cli", "test_bad_inputs_cli", "test_image_modes", "test_group_photo_warns_for_source",
                     "test_resizing"},
    "test_evaluate": {"test_real_photos_same_person_beats_every_other_person", "test_cli_all_metrics",
                      "test_cli_skips_and_report", "test_a_45px_face_is_found_and_scored"},
    "test_config": {"test_cli_error_is_one_line"},
    "test_toyworld": {"test_pretraining_resumes_exactly"},
    "test_face_identity": {"test_same_person_scores_above_every_different_person", "test_group_photo_every_face_largest_first",
                           "test_random_arcface_loads_and_embeds", "test_small_face_beside_a_larger_one_is_found",
                           "test_bad_arcface_file_is_one_line"},
    "test_face_finder": {"test_mediapipe_says_nothing_on_stderr"},
    "test_lora": {"test_add_lora_trainable_and_identity_at_init"},
    "test_export_sdxl": {"test_presets_select_the_same_layers_on_the_sdxl_unet",
                         "test_diffusers_loads_every_module_and_reproduces_the_model"},
    "test_attention": {"test_probabilities_match_hand_reference_and_output_unchanged"},
    "test_training_eval": {"test_real_network_scores_the_person_above_another"},
    "test_image_formats": {"test_the_page_accepts_heic_uploads", "test_prepare_reads_a_heic_photo"},
    "test_identity_check": {"test_group_photo_uses_the_face_of_the_set", "test_different_person_is_flagged",
                            "test_small_face_in_a_group_photo_is_chosen_by_identity"},
    "test_trainer_sdxl": {"test_sdxl_two_phases_all_tasks"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        slow = (item.get_closest_marker("slow") or item.get_closest_marker("browser")
                or module in SUBPROCESS_MODULES or HEAVY_FIXTURES & set(item.fixturenames)
                or item.originalname in SLOW_TESTS.get(module, ()))
        item.add_marker(pytest.mark.slow if slow else pytest.mark.fast)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster than torch's pool, and immune to a busy CPU."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a test that asks for bf16 must not inherit an earlier "no"."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def model_loads(monkeypatch) -> dict[str, int]:
    """Counts base-model loads (``load_base_model``, where the trainer calls it): a refusal "before any
    work" must leave ``model_loads["n"]`` at 0."""
    import library.models.base_model
    import library.training.trainer

    calls = {"n": 0}
    real = library.models.base_model.load_base_model

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(library.models.base_model, "load_base_model", counted)
    monkeypatch.setattr(library.training.trainer, "load_base_model", counted)
    return calls


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, original-layout single .safetensors) of the tiny SD 1.x model."""
    from testkit.tiny import save_model

    return save_model(tmp_path_factory.mktemp("model") / "tiny_sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, SGM-layout single .safetensors) of the tiny SDXL model, written by the command line
    `python -m testkit.tiny DEST --sdxl`."""
    from testkit.tiny import main

    dest = tmp_path_factory.mktemp("model") / "tiny_sdxl"
    assert main([str(dest), "--sdxl"]) == 0
    return dest, dest.with_suffix(".safetensors")


@pytest.fixture
def prepared_data(tmp_path) -> tuple[Path, Path]:
    return (write_prepared(tmp_path / "source", "source", "mcv1", seed=1),
            write_prepared(tmp_path / "reference", "reference", "mcv2", seed=2))


@pytest.fixture
def fake_python(tmp_path):
    """Stands in for the interpreter the page starts training with: ignores train_magicapture.py, says
    what it was given and sleeps until SIGTERM (tests of library/app's runs)."""
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\necho started \"$@\"\nexec sleep 30\n")
    script.chmod(script.stat().st_mode | 0o111)
    return str(script)
