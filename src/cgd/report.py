"""What a run leaves for people: the entropy map (paper Fig. 1), scores.csv and a Markdown report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes, atomic_write_text, keep_writes_in_cache
from .split import Split


def entropy_map_png(s: Split, poison_mask: np.ndarray | None, path: Path, title: str = "",
                    sigma1: float = 0.2, sigma2: float = 0.1) -> None:
    """Guide rank (x) against model rank (y), one dot per sample, known poison in red, split borders drawn.
    `title` is plain text: a `$` in a run name is not read as mathtext."""
    keep_writes_in_cache()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    clean = np.ones(len(s.guide_rank), bool) if poison_mask is None else ~np.asarray(poison_mask, bool)
    ax.scatter(s.guide_rank[clean], s.model_rank[clean], s=1, c="#4477aa", alpha=0.25, linewidths=0,
               label="clean" if poison_mask is not None else "sample", rasterized=True)
    if poison_mask is not None:
        p = np.asarray(poison_mask, bool)
        ax.scatter(s.guide_rank[p], s.model_rank[p], s=2, c="#cc3311", alpha=0.6, linewidths=0, label="poison",
                   rasterized=True)
    ax.axvline(1 - sigma1, c="k", lw=0.8, ls="--")
    ax.axhline(sigma1, c="k", lw=0.8, ls="--")
    ax.axvline(1 - sigma2, c="k", lw=0.8)
    ax.axhline(sigma2, c="k", lw=0.8)
    ax.text(0.02, 0.98, "D_c", transform=ax.transAxes, va="top")
    ax.text(0.93, 0.02, "D_p", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="guide NLL rank (high: label looks wrong)",
           ylabel="model NLL rank (low: learned suspiciously fast)")
    ax.set_title(title, parse_math=False)
    ax.legend(loc="upper right", markerscale=6, fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def scores_csv(s: Split, labels: np.ndarray, poison_mask: np.ndarray | None, path: Path) -> None:
    names = s.subset_names()
    header = "index,label,guide_nll,model_nll,guide_rank,model_rank,subset" + (",is_poison" if poison_mask is not None
                                                                                else "")
    rows = [header]
    for i in range(len(labels)):
        row = (f"{i},{labels[i]},{s.guide_nll[i]:.5f},{s.model_nll[i]:.5f},{s.guide_rank[i]:.5f},"
               f"{s.model_rank[i]:.5f},{names[i]}")
        if poison_mask is not None:
            row += f",{int(poison_mask[i])}"
        rows.append(row)
    atomic_write_text(Path(path), "\n".join(rows) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_report(title: str, sections: dict[str, dict], notes: list[str] | None = None) -> str:
    """One table per section of key → value, in order."""
    out = [f"# {title}", ""]
    for name, kv in sections.items():
        if not kv:
            continue
        out += [f"## {name}", "", "| | |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in kv.items()]
        out.append("")
    for n in notes or []:
        out.append(f"- {n}")
    return "\n".join(out) + "\n"
