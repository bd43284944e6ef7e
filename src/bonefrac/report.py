"""Figures (PNG) and a single self-contained HTML report for an evaluation.

Every plot function takes arrays/dicts and an output path, writes a PNG there (parent folders are created)
and returns the path as a ``pathlib.Path``. Figures are built on matplotlib's Agg canvas directly, without
pyplot, so no global backend is switched, no window opens and nothing stays registered after saving.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bonefrac import calibration
from bonefrac import metrics as M

logger = logging.getLogger(__name__)

NOTICE = "bonefrac is an assistive research tool, not a diagnostic device."
_IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{margin-top:1.8em;border-bottom:1px solid #eee}
.notice{background:#fff4e5;border:1px solid #f0b46c;padding:.7em 1em;border-radius:4px;font-weight:600}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:1em 0;border:1px solid #eee}
footer{margin-top:3em;color:#777;font-size:.85em}
"""


# ----------------------------------------------------------------------------- figure plumbing

def _figure(figsize=(6.0, 5.0)):
    # Imported here so that importing bonefrac never loads matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    fig.clear()
    return path


def _binary_positive(class_names, positive_index):
    if positive_index is not None:
        return int(positive_index)
    return M.positive_class_index(class_names)


# ----------------------------------------------------------------------------- plots

def plot_confusion_matrix(cm, class_names: Sequence[str], path, normalize: bool = False,
                          title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows true, columns predicted), each cell showing the count and the row percentage.

    Colours follow the row fraction so that rare classes stay readable; ``normalize`` puts the percentage first.
    """
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(class_names)
    fig = _figure((1.6 + 1.3 * k, 1.2 + 1.2 * k))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    for i in range(k):
        for j in range(k):
            count, pct = int(cm[i, j]), 100 * frac[i, j]
            text = f"{pct:.1f}%\n(n={count})" if normalize else f"{count}\n({pct:.1f}%)"
            ax.text(j, i, text, ha="center", va="center", fontsize=10,
                    color="white" if frac[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=30, ha="right")
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def _mark_points(ax, y_bin, scores, operating_points, kind: str):
    for x, yv, label in point_markers(y_bin, scores, operating_points, kind):
        ax.plot([x], [yv], "o", ms=7, label=label, clip_on=False)  # points on the frame stay whole


def point_markers(y_bin, scores, operating_points, kind: str) -> list[tuple[float, float, str]]:
    """(x, y, label) per distinct plotted position of the operating points on a "roc" or "pr" plot; points that
    land on the same spot share one marker whose label names them all (else the last one drawn hides the rest)."""
    spots: dict[tuple, list[str]] = {}
    for name, t in (operating_points or {}).items():
        m = M.threshold_metrics(y_bin, scores, t)
        x, yv = (m["specificity"], m["sensitivity"]) if kind == "roc" else (m["sensitivity"], m["ppv"])
        if x is None or yv is None:  # e.g. ppv when the threshold predicts nothing positive
            continue
        spot = (round(1 - x if kind == "roc" else x, 9), round(yv, 9))
        spots.setdefault(spot, []).append(f"{name} (t={t:.3f})")
    return [(x, yv, ", ".join(labels)) for (x, yv), labels in spots.items()]


def _note_if_empty(ax, drawn: bool) -> None:
    """An empty plot says why, instead of looking like a plotting failure."""
    if not drawn:
        ax.text(0.5, 0.5, "no curve: the set holds one class\n(the metric is undefined)", ha="center",
                va="center", transform=ax.transAxes, color="#b00", fontsize=11)


def _curves(y, probs, class_names, positive_index):
    """(label, y_bin, scores) per curve: one for binary, one per present class (one-vs-rest) for K > 2."""
    y = np.asarray(y).astype(int).ravel()
    probs = np.asarray(probs, dtype=float)
    if probs.shape[1] == 2:
        pos = _binary_positive(class_names, positive_index)
        return [(str(class_names[pos]), y == pos, probs[:, pos])]
    return [(str(n), y == c, probs[:, c]) for c, n in enumerate(class_names) if 0 < np.sum(y == c) < len(y)]


def plot_roc(y, probs, class_names: Sequence[str], path, positive_index: int | None = None,
             operating_points: Mapping[str, float] | None = None) -> Path:
    """ROC curve(s) with AUROC in the legend: binary one curve (operating points marked if given),
    K > 2 one-vs-rest per class."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure()
    ax = fig.add_subplot()
    curves = _curves(y, probs, class_names, positive_index)
    drawn = False
    for label, y_bin, scores in curves:
        if 0 < y_bin.sum() < len(y_bin):
            fpr, tpr, _ = roc_curve(y_bin, scores)
            ax.plot(fpr, tpr, lw=2, label=f"{label} (AUROC {roc_auc_score(y_bin, scores):.3f})")
            drawn = True
    _note_if_empty(ax, drawn)
    if len(curves) == 1 and 0 < curves[0][1].sum() < len(curves[0][1]):
        _mark_points(ax, curves[0][1], curves[0][2], operating_points, "roc")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(y, probs, class_names: Sequence[str], path, positive_index: int | None = None,
            operating_points: Mapping[str, float] | None = None) -> Path:
    """Precision-recall curve(s) with average precision in the legend and the prevalence as baseline."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure()
    ax = fig.add_subplot()
    curves = _curves(y, probs, class_names, positive_index)
    drawn = False
    for label, y_bin, scores in curves:
        if 0 < y_bin.sum() < len(y_bin):
            prec, rec, _ = precision_recall_curve(y_bin, scores)
            line, = ax.step(rec, prec, where="post", lw=2,
                            label=f"{label} (AP {average_precision_score(y_bin, scores):.3f})")
            ax.axhline(y_bin.mean(), ls=":", lw=1, color=line.get_color())
            drawn = True
    _note_if_empty(ax, drawn)
    if len(curves) == 1 and 0 < curves[0][1].sum() < len(curves[0][1]):
        _mark_points(ax, curves[0][1], curves[0][2], operating_points, "pr")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title="Precision-recall (dotted: prevalence)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_reliability(y, probs, path, n_bins: int = 15) -> Path:
    """Reliability diagram (top-label accuracy vs confidence) with a count histogram; ECE in the title."""
    curve = calibration.reliability_curve(y, probs, n_bins)
    ece = calibration.expected_calibration_error(y, probs, n_bins)
    edges, filled = curve["edges"], curve["count"] > 0
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig = _figure((6.0, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(centers[filled], curve["accuracy"][filled], width=width * 0.9, color="#4c72b0", label="accuracy")
    top.plot(curve["confidence"][filled], curve["accuracy"][filled], "o-", color="#dd8452", ms=4,
             label="accuracy at mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE {ece:.3f}, {n_bins} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, curve["count"], width=width * 0.9, color="#999999")
    bottom.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="count")
    return _save(fig, path)


def plot_score_distributions(scores: Mapping[str, np.ndarray], path,
                             xlabel: str = "probability of positive class") -> Path:
    """Overlaid density histograms of scores per named set (e.g. internal vs external test)."""
    fig = _figure((6.5, 4.0))
    ax = fig.add_subplot()
    arrays = {k: np.asarray(v, dtype=float).ravel() for k, v in scores.items()}
    values = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
    in_unit = values.size == 0 or (values.min() >= 0 and values.max() <= 1)
    bins = np.linspace(0, 1, 31) if in_unit else 30
    for name, v in arrays.items():
        if v.size:
            ax.hist(v, bins=bins, density=True, alpha=0.45, label=f"{name} (n={v.size}, mean {v.mean():.3f})")
    ax.set(xlabel=xlabel, ylabel="density", title="Score distributions")
    if arrays:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _read_metrics_csv(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = {}
    for key in (rows[0].keys() if rows else []):
        cols[key] = np.array([_to_float(r.get(key)) for r in rows])
    return cols


def _to_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_training_curves(metrics_csv_path, path) -> Path:
    """Training curves from RUN/metrics.csv (epoch, train_loss, val_loss, val_<metric>..., lr): losses,
    validation metrics and learning rate (log scale) as three panels; missing columns are skipped."""
    cols = _read_metrics_csv(metrics_csv_path)
    x = cols.get("epoch", np.arange(len(next(iter(cols.values()), []))))
    fig = _figure((7.0, 8.0))
    ax_loss, ax_val, ax_lr = fig.subplots(3, 1, sharex=True)
    for key in ("train_loss", "val_loss"):
        if key in cols:
            ax_loss.plot(x, cols[key], "o-", ms=3, label=key)
    for key in sorted(k for k in cols if k.startswith("val_") and k != "val_loss"):
        ax_val.plot(x, cols[key], "o-", ms=3, label=key)
    if "lr" in cols and np.any(cols["lr"] > 0):
        ax_lr.plot(x, cols["lr"], "-", label="lr")
        ax_lr.set_yscale("log")
    for ax, name in ((ax_loss, "loss"), (ax_val, "validation metric"), (ax_lr, "learning rate")):
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax_lr.set_xlabel("epoch")
    ax_loss.set_title("Training curves")
    return _save(fig, path)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None, path, ncols: int = 4,
               tile_inches: float = 2.4) -> Path:
    """Grid of images (2-D uint8 grayscale, or (H, W, 3) RGB for heatmap overlays) with optional titles."""
    n = len(images)
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure((tile_inches * ncols, (tile_inches + 0.35) * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            img = np.asarray(images[i])
            gray = {"cmap": "gray", "vmin": 0, "vmax": 255} if img.ndim == 2 else {}
            ax.imshow(img, interpolation="lanczos", **gray)
            if titles is not None and i < len(titles):
                ax.set_title(str(titles[i]), fontsize=8)
    if not n:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    return _save(fig, path)


# ----------------------------------------------------------------------------- HTML

def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, Mapping) and "value" in v:
        # A bootstrap interval dict renders as "value (low–high)", or "value (n/a: why)" when unreliable.
        text = interval_text(v)
        return _fmt(v["value"]) + (f" ({text})" if text else "")
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "—" if not np.isfinite(v) else f"{float(v):.4g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple, np.ndarray)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def interval_text(iv: Mapping) -> str:
    """"low–high" for a bootstrap interval dict; its note instead when the interval is marked n/a, or the range
    flagged with the note when it is otherwise unreliable; "" when there is no interval."""
    low, high, note = iv.get("low"), iv.get("high"), iv.get("note")
    if iv.get("reliable") is False and note and (note.startswith("n/a") or low is None):
        return note
    if low is None or high is None:
        return ""
    text = f"{_fmt(low)}–{_fmt(high)}"
    return f"{text}, unreliable: {note}" if iv.get("reliable") is False else text


def _cell(v, tag: str = "td") -> str:
    numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    cls = ' class="num"' if numeric and tag == "td" else ""
    return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"


def _table(data) -> str:
    """A dict renders as a key/value table; a list of dicts as rows with the union of keys as columns."""
    if isinstance(data, Mapping):
        body = "".join(f"<tr>{_cell(k, 'th')}{_cell(v)}</tr>" for k, v in data.items())
        return f"<table>{body}</table>"
    cols = list(dict.fromkeys(k for row in data for k in row))
    head = "<tr>" + "".join(_cell(c, "th") for c in cols) + "</tr>"
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in cols) + "</tr>" for row in data)
    return f"<table>{head}{body}</table>"


def _is_image(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    return isinstance(item, str) and Path(item).suffix.lower() in _IMAGE_MIME and Path(item).is_file()


def _image(item) -> str:
    path = Path(item)
    if not path.is_file():
        logger.warning("report image missing, skipped: %s", path)
        return f"<p><em>[missing figure: {html.escape(path.name)}]</em></p>"
    mime = _IMAGE_MIME.get(path.suffix.lower(), "image/png")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(path.stem)}">'


def _item(item) -> str:
    if _is_image(item):
        return _image(item)
    if isinstance(item, Mapping) or (isinstance(item, list) and item and all(isinstance(r, Mapping) for r in item)):
        return _table(item)
    return f"<p>{html.escape(str(item))}</p>"


def html_report(path, *, title: str, sections: Sequence[tuple[str, Sequence]]) -> Path:
    """Write ONE self-contained HTML file (images embedded as base64, inline CSS, no external links).

    ``sections`` is a list of (heading, items); an item is text (escaped paragraph), a dict (key/value
    table; bootstrap {value, low, high} dicts render as "value (low–high)"), a list of dicts (table), or an
    image path (``pathlib.Path``, or a str naming an existing .png/.jpg file) embedded as a data URI.
    """
    from bonefrac import __version__

    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="notice">{html.escape(NOTICE)}</p>']
    for heading, items in sections:
        parts.append(f"<section><h2>{html.escape(str(heading))}</h2>")
        parts.extend(_item(it) for it in items)
        parts.append("</section>")
    parts.append(f"<footer>Generated by bonefrac {html.escape(__version__)}. {html.escape(NOTICE)}</footer>")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path
