"""The end-of-run picture: each loss term and the preview samples' likeness scores over the steps.

Read from ``loss_history.jsonl`` (not the trainer's memory) so a resumed run plots its whole history.
"""

from __future__ import annotations

from pathlib import Path

from library.files.atomic import atomic_path
from library.files.text import read_json_lines

LOSS_KEYS = ("loss", "mask", "attn", "id")  # the terms the progress bar shows
FIGURE_INCHES, DPI = (10.0, 6.0), 100  # -> a 1000 x 600 px PNG


def read_history(path: str | Path) -> list[dict]:
    """The entries of a ``loss_history.jsonl``; a line that does not parse (a run killed mid-write) is
    passed over. Missing file: []."""
    return [entry for _, entry in read_json_lines(path)
            if isinstance(entry, dict) and "phase" in entry and "step" in entry]


def plot_progress(history: list[dict], path: str | Path, phase1_steps: int, best: dict | None = None,
                  best_key: str = "", best_line: str = "") -> Path:
    """Write a 1000 x 600 px PNG to `path` atomically: the loss terms (top, log scale) and the ``eval/*``
    scores (bottom) over the run's global step (phase-2 steps follow `phase1_steps`), with a
    line where phase 2 starts. `best` (the history entry training_scores.best_step picked) is marked by a
    dashed line and a star on its `best_key` score (the one the rule chose on); `best_line` (the run's best-step line, naming the files saved
    at it) is written under the plots and kept in the PNG's ``Description`` text. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

    def x_of(entry: dict) -> int:
        return entry["step"] + (phase1_steps if entry["phase"] == 2 else 0)

    fig, (losses, scores) = plt.subplots(2, 1, figsize=FIGURE_INCHES, dpi=DPI, sharex=True)
    try:
        for key in LOSS_KEYS:
            points = [(x_of(e), e[key]) for e in history if isinstance(e.get(key), (int, float)) and e[key] > 0]
            if points:
                losses.plot(*zip(*points), label=key, linewidth=1)
        losses.set_yscale("log")
        losses.set_ylabel("loss")
        score_keys = sorted({k for e in history for k in e if k.startswith("eval/")})
        for key in score_keys:
            points = [(x_of(e), e[key]) for e in history if isinstance(e.get(key), (int, float))]
            scores.plot(*zip(*points), marker="o", label=key.split("/", 1)[1])
        scores.set_ylabel("preview scores")
        scores.set_xlabel("step (phase 1, then phase 2)")
        for ax in (losses, scores):
            if any(e["phase"] == 2 for e in history):
                ax.axvline(phase1_steps + 0.5, color="grey", linestyle=":", linewidth=1)
            if best is not None:
                ax.axvline(x_of(best), color="tab:red", linestyle="--", linewidth=1)
        if best is not None and isinstance(best.get(best_key), (int, float)):
            scores.plot([x_of(best)], [best[best_key]], marker="*", markersize=16, color="tab:red", linestyle="",
                        label=f"best step ({best_key.split('/', 1)[-1]})")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right", fontsize="small")
        if not score_keys:
            scores.text(0.5, 0.5, "no preview scores (sample.every = 0, or no face found)", ha="center",
                        va="center", transform=scores.transAxes)
        fig.tight_layout()
        if best_line:  # the line is long (it names files): small, wrapped, under the plots
            fig.subplots_adjust(bottom=0.16)
            fig.text(0.01, 0.01, best_line, fontsize=7, wrap=True, va="bottom")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Description": best_line} if best_line else None)
    finally:
        plt.close(fig)
    return Path(path)
