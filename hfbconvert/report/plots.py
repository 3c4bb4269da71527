"""The report's plots as PNG bytes (matplotlib, imported lazily; metadata stripped so
equal figures give equal bytes)."""

from __future__ import annotations

import io

from .model import _finite

BEFORE_COLOR, AFTER_COLOR = "#a0a0a0", "#2a6fb0"


def _png(fig) -> bytes:
    """PNG bytes with no Software/date chunks, so equal figures give equal files."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(w: float, h: float, rows: int = 1):
    from matplotlib.figure import Figure  # lazy: the CLI's other commands stay fast

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, axes


def plot_sensitivity(rep: dict) -> bytes | None:
    """Median L_j(r) vs r per layer (log y): how fast each layer's filters become cheap."""
    bud = rep.get("budgets") or []
    rows = [r for r in rep.get("layers", []) if r.get("median_loss")]
    if not bud or not rows:
        return None
    from matplotlib import cm, colormaps, colors

    fig, (ax,) = _figure(8, 4.2)
    cmap = colormaps["viridis"]
    norm = colors.Normalize(0, max(len(rows) - 1, 1))
    for i, r in enumerate(rows):
        pts = [(b, v) for b, v in zip(bud, r["median_loss"]) if v is not None and v > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=cmap(norm(i)), label=r["name"])
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bud, [str(b) for b in bud])
    ax.set_xlabel("hidden units per tolerant filter r")
    ax.set_ylabel("median filter loss L(r)")
    ax.grid(True, which="both", alpha=0.3)
    if len(rows) <= 10:
        ax.legend(fontsize=7, ncols=2)
    else:
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax, label="layer index (input → output)")
    return _png(fig)


def plot_layer_costs(rep: dict) -> bytes | None:
    """MULs, ADDs and bytes per layer, original vs hybrid (grouped bars)."""
    rows = [r for r in rep.get("layers", []) if r.get("before") and r.get("after")]
    if not rows:
        return None
    import numpy as np
    from matplotlib.ticker import EngFormatter

    fig, axes = _figure(min(14, max(8, 0.22 * len(rows) + 2)), 8.5, rows=3)
    x = np.arange(len(rows))
    labels = ("MULs", "ADDs", "weight bytes (log)")
    for ax, key, label in zip(axes, ("muls", "adds", "bytes"), labels):
        ax.bar(x - 0.2, [r["before"][key] for r in rows], 0.4, color=BEFORE_COLOR,
               label="original")
        ax.bar(x + 0.2, [r["after"][key] for r in rows], 0.4, color=AFTER_COLOR, label="hybrid")
        ax.set_ylabel(label)
        if key == "bytes":  # spans ~3 decades across a MobileNet: linear hides early layers
            ax.set_yscale("log")
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xticks(x, [] if ax is not axes[-1] else [r["name"] for r in rows],
                      rotation=90, fontsize=7 if len(rows) <= 30 else 6)
        ax.set_xlim(-0.7, len(rows) - 0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def plot_stages(rep: dict) -> bytes | None:
    """Top-1 agreement with the original after each pipeline stage."""
    st = [(str(s.get("stage")), _finite(s.get("agreement"))) for s in rep.get("stages") or []]
    st = [(n, a) for n, a in st if a is not None]
    if not st:
        return None
    fig, (ax,) = _figure(max(4.5, 1.3 * len(st) + 1.5), 3.2)
    names, vals = zip(*st)
    bars = ax.bar(range(len(st)), vals, 0.6, color=AFTER_COLOR)
    ax.bar_label(bars, [f"{v:.3f}" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(range(len(st)), names)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("top-1 agreement")
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def plot_finetune(rep: dict) -> bytes | None:
    """Distillation loss and running agreement during fine-tuning."""
    ft = rep.get("finetune")
    if not ft or not ft.get("loss"):
        return None
    fig, (ax,) = _figure(8, 3.0)
    steps = ft["steps"][: len(ft["loss"])]
    ax.plot(steps, ft["loss"], color=AFTER_COLOR, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss", color=AFTER_COLOR)
    ax.grid(True, alpha=0.3)
    ag = [a for a in ft.get("agreement") or [] if a is not None]
    if len(ag) == len(steps):
        ax2 = ax.twinx()
        ax2.plot(steps, ag, color="#c0504d", lw=1.0)
        ax2.set_ylabel("batch agreement", color="#c0504d")
    return _png(fig)
