"""Figures of the benches as PNG files (matplotlib), beside the tables they print.

Every bench takes --png PATH: latency distributions as CDFs (each series against the
reference measured in the same run), throughputs as bars labelled with their ratio to
the reference. A bench with several figures writes PATH's stem with a suffix each
(mmap_bench.png -> mmap_bench-latency.png, mmap_bench-throughput.png).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

FLOOR = 0.01  # the smallest latency a CDF draws, in its unit

# The colour of the reference in every figure, so that it reads the same everywhere.
REFERENCE_COLOUR = "0.45"


def add_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--png",
        type=Path,
        metavar="PATH",
        help="also write the figures as PNG (PATH, or PATH's stem with a suffix per figure)",
    )


def _log_if_wide(ax: object, values: Sequence[float]) -> str:
    """A log axis when the bars span more than two decades (else the small ones
    vanish); what to add to the axis label."""
    shown = [v for v in values if v == v and v > 0]
    if shown and max(shown) / min(shown) > 100:
        ax.set_yscale("log")  # type: ignore[attr-defined]
        return ", log scale"
    return ""


def path_for(base: Path, suffix: str) -> Path:
    """Where figure `suffix` of a bench writing to base goes."""
    return base.with_name(f"{base.stem}-{suffix}{base.suffix or '.png'}")


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def cdf(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[float]],
    *,
    reference: str | None = None,
    unit: str = "us",
    marks: Mapping[str, float] | None = None,
) -> Path:
    """The distribution of each series (samples in unit) as a CDF on a log axis, p50
    and p99 in the legend; reference drawn grey and dashed; marks: single figures of a
    reference that gives no samples (redis-benchmark's p50), as grey vertical lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, samples in series.items():
        # A log axis has no 0: samples below FLOOR (a tmpfs's "at once") are drawn there.
        xs = sorted(max(x, FLOOR) for x in samples)
        if not xs:
            continue
        n = len(xs)
        ys = [(i + 1) / n for i in range(n)]
        p50, p99 = xs[(n - 1) // 2], xs[min(n - 1, (n * 99) // 100)]
        style: dict[str, object] = {}
        if label == reference:
            style = {"color": REFERENCE_COLOUR, "linestyle": "--"}
        ax.plot(xs, ys, label=f"{label}: p50 {p50:.1f}, p99 {p99:.1f} {unit}", **style)
    for label, x in (marks or {}).items():
        ax.axvline(x, color=REFERENCE_COLOUR, linestyle=":", label=f"{label}: {x:.1f} {unit}")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency ({unit}, log scale)")
    ax.set_ylabel("fraction at most this")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bars(
    path: Path,
    title: str,
    values: Mapping[str, float],
    *,
    unit: str,
    reference: str | None = None,
    higher_is_better: bool = True,
) -> Path:
    """One bar per value, each labelled with its figure and its ratio to reference."""
    plt = _pyplot()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5), dpi=110)
    colours = [REFERENCE_COLOUR if label == reference else "C0" for label in labels]
    drawn = ax.bar(range(len(labels)), [values[k] for k in labels], color=colours)
    ref = values.get(reference) if reference is not None else None
    for rect, label in zip(drawn, labels, strict=True):
        text = f"{values[label]:.3g}"
        if ref:
            text += f"\n{values[label] / ref:.2f}x"
        ax.annotate(
            text,
            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    scale = _log_if_wide(ax, list(values.values()))
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize="small")
    better = "higher is better" if higher_is_better else "lower is better"
    ax.set_ylabel(f"{unit} ({better}{scale})")
    if reference is not None:
        title += f"\n(ratios to {reference}, grey)"
    ax.set_title(title)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def grouped(
    path: Path,
    title: str,
    table: Mapping[str, Mapping[str, float]],
    *,
    unit: str,
    reference: str | None,
    higher_is_better: bool = True,
) -> Path:
    """table[group][series]: a group of bars per row (a phase), one bar per series (a
    store, a reference), each but the reference's labelled with its ratio to the
    reference's bar in the same group (reference None: each with its figure)."""
    plt = _pyplot()
    groups = list(table)
    names: list[str] = []
    for row in table.values():
        names += [n for n in row if n not in names]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 1.4 * len(groups) + 2)), 4.8), dpi=110)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        ys = [table[g].get(name, float("nan")) for g in groups]
        colour = REFERENCE_COLOUR if name == reference else f"C{j}"
        drawn = ax.bar(xs, ys, width, label=name, color=colour)
        if name == reference:
            continue
        for rect, group in zip(drawn, groups, strict=True):
            ref = table[group].get(reference) if reference is not None else None
            value = table[group].get(name)
            if value is not None and value == value and (ref or reference is None):
                ax.annotate(
                    f"{value / ref:.2f}x" if ref else f"{value:.3g}",
                    (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize="x-small",
                )
    scale = _log_if_wide(ax, [v for row in table.values() for v in row.values()])
    ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right", fontsize="small")
    better = "higher is better" if higher_is_better else "lower is better"
    ax.set_ylabel(f"{unit} ({better}{scale})")
    ax.set_title(f"{title}\n(ratios to {reference}, grey)" if reference else title)
    ax.legend(fontsize="small")
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
