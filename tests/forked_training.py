"""Test helper (not a test): runs `train_magicapture.main` in child processes, each with a kill hook.

Started once by a test (`python tests/forked_training.py`), it imports torch, diffusers and the trainer
once, then forks one child per request, so that each interrupted-and-resumed segment of a test costs its
training (about a second on the tiny model) rather than the imports (about ten seconds on two busy
cores). A child is an ordinary process: its own memory, its own signal handlers, killed on its own.

Requests are JSON lines on stdin: {"argv": [...], "kill": HOOK or null, "out": PATH, "err": PATH}; the
answer is one JSON line {"rc": N}, N negative when the child died of signal -N. Hooks (in the child only;
production code has none):

- ``kill:P:S``: SIGKILL right after phase P's step S has been computed (before anything saves it)
- ``term:P:S`` / ``int:P:S``: SIGTERM / SIGINT to itself during phase P's step S
- ``int2:P:S``: SIGINT twice during phase P's step S (Ctrl-C pressed again: stop at once)
- ``write:TEXT``: when a file whose path contains TEXT is written (the one writer's `write_bytes`, which
  every safetensors, torch and text output goes through), leave half of it on disk, then SIGKILL: a
  kill in the middle of a write
- ``term-at-load``: SIGTERM while the base model loads, before any training
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent



def install_hook(hook: str) -> None:
    kind, _, arg = hook.partition(":")
    if kind in ("kill", "term", "int", "int2"):
        from library.training.trainer import MagiCaptureTrainer

        phase, step = (int(x) for x in arg.split(":"))
        real = MagiCaptureTrainer.optimizer_step
        sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT, "int2": signal.SIGINT}[kind]

        def optimizer_step(self, samples, index, phase_, *rest):
            hit = (phase_, index + 1) == (phase, step)
            for _ in range(2 if kind == "int2" else 1 if hit and sig != signal.SIGKILL else 0):
                if hit:
                    os.kill(os.getpid(), sig)  # handled between two bytecodes: in the middle of the step
            result = real(self, samples, index, phase_, *rest)
            if hit and sig == signal.SIGKILL:
                os.kill(os.getpid(), sig)
            return result

        MagiCaptureTrainer.optimizer_step = optimizer_step
    elif kind == "write":
        import library.files.atomic as atomic

        real_write_bytes = atomic.write_bytes

        def write_bytes(path, data):  # every output's bytes pass here (write_safetensors, write_torch, write_text)
            if arg not in str(path):
                return real_write_bytes(path, data)
            with atomic.atomic_path(path) as tmp:  # the temporary the real writer would fill, half filled
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        atomic.write_bytes = write_bytes
    elif kind == "term-at-load":
        import library.training.trainer

        real_load = library.training.trainer.load_base_model

        def load_base_model(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_load(*args, **kwargs)

        library.training.trainer.load_base_model = load_base_model
    elif hook:
        raise ValueError(f"unknown hook {hook!r}")


def child(request: dict) -> int:
    signal.alarm(300)  # a child that hangs dies (rc -14) instead of hanging the test
    for fd, name in ((1, "out"), (2, "err")):
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    import train_magicapture

    install_hook(request.get("kill") or "")
    try:
        return int(train_magicapture.main(request["argv"]) or 0)
    except SystemExit as err:
        return int(err.code or 0)
    except BaseException:
        traceback.print_exc()
        return 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    # everything a run imports, lazily included, so that the children find it loaded
    import diffusers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import library.models.identity  # noqa: F401
    import library.training.outputs  # noqa: F401
    import library.training.previews  # noqa: F401
    import library.training.trainer  # noqa: F401
    import train_magicapture  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                code = child(request)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
