"""PNG figures with matplotlib (Agg): metric panels over steps, correlation scatters, and
GT-vs-prediction overlays (matched, false positive and missed boxes in distinct colours)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from coordexp.codec import CoordCodec  # noqa: E402
from coordexp.data.images import open_rgb8  # noqa: E402
from coordexp.errors import UserError  # noqa: E402
from coordexp.report.dumps import sample_outcomes  # noqa: E402

COLORS = {"matched": "#1a9850", "false positive": "#d7301f", "missed": "#7b3294"}
NEUTRAL = "#808080"
DPI = 100


@dataclass
class Line:
    """One plotted series: label, x, y; `markers` for sparse series such as eval steps."""

    label: str
    xs: list[float]
    ys: list[float]
    markers: bool = False


@dataclass
class Panel:
    title: str
    lines: list[Line] = field(default_factory=list)


def plot_panels(panels: list[Panel], path: Path, *, columns: int = 2, xlabel: str = "step") -> Path:
    """A grid of line panels, one PNG; panels without data are left out by the caller."""
    assert panels, "nothing to plot"
    rows = -(-len(panels) // columns)
    cols = min(columns, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for line in panel.lines:
            style = {"marker": "o", "markersize": 4} if line.markers else {"linewidth": 0.9}
            ax.plot(line.xs, line.ys, label=line.label, **style)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(panel.lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_scatter(xs: list[float], ys: list[float], names: tuple[str, str], r: float | None,
                 path: Path) -> Path:
    """Scatter of two train series with a least-squares line and r in the title."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.scatter(xs, ys, s=10, alpha=0.6)
    if r is not None:
        slope, intercept = np.polyfit(xs, ys, 1)
        grid = np.linspace(min(xs), max(xs), 2)
        ax.plot(grid, slope * grid + intercept, color="black", linewidth=1)
    ax.set_xlabel(names[0], fontsize=8)
    ax.set_ylabel(names[1], fontsize=8)
    ax.set_title(f"Pearson r = {r:.3f} ({len(xs)} rows)" if r is not None else
                 f"Pearson r undefined ({len(xs)} rows)", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_overlay(sample: dict, image_path: Path, path: Path) -> tuple[Path, bool]:
    """GT (left) and predictions (right) on the sample's image; returns (png, image found).
    GT: matched / missed; predictions: matched / false positive."""
    width, height = int(sample["width"]), int(sample["height"])
    pixels, found = _load_image(image_path, width, height)
    matched_pred, matched_gt = sample_outcomes(sample)
    aspect = height / max(width, 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5 * aspect + 0.9))
    panels = (("ground truth", sample["gt_objects"], matched_gt, "missed"),
              ("prediction", sample["pred_objects"], matched_pred, "false positive"))
    for ax, (title, objects, ok, bad) in zip(axes, panels, strict=True):
        ax.imshow(pixels, extent=(0, width, height, 0))
        # unmatched first, so a matched box stays visible under an identical false positive
        for i in sorted(range(len(objects)), key=lambda i, ok=ok: i in ok):
            _draw_box(ax, objects[i], COLORS["matched" if i in ok else bad], width, height)
        ax.set_title(f"{title} ({len(objects)})", fontsize=10)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.axis("off")
    handles = [Patch(edgecolor=c, facecolor="none", linewidth=2, label=k)
               for k, c in COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    note = "" if found else "  [image not found: blank canvas]"
    fig.suptitle(f"sample {sample['sample_id']}{note}", fontsize=10)
    return _save(fig, path), found


def _draw_box(ax, obj: dict, color: str, width: int, height: int) -> None:
    x1, y1, x2, y2 = CoordCodec().box_bins_to_px(obj["bbox_2d"], width, height)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                           linewidth=1.6))
    ax.text(x1, y1, obj["desc"], color="white", fontsize=6, va="top",  # inside: never clipped
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1, "alpha": 0.8})


def _load_image(path: Path, width: int, height: int) -> tuple[np.ndarray, bool]:
    """The image as RGB [H, W, 3], or a grey canvas of the dumped size when it is unreadable."""
    try:
        return np.asarray(open_rgb8(path).resize((width, height))), True
    except UserError:
        return np.full((height, width, 3), 200, dtype=np.uint8), False


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
