"""The run's pictures: a grid of samples, the loss curve and the quality sweep's plot
(matplotlib, imported only here and only when a picture is drawn)."""
import math
import os

import numpy as np

from ..options import METHODS


def save_grid(samples, path, columns=None):
    """A PNG grid of images in [-1, 1] (N, C, H, W), pixels kept sharp; returns the path written
    (`path`, with .png added when it has no extension)."""
    from matplotlib.figure import Figure

    if not os.path.splitext(path)[1]:
        path += ".png"
    count, channels, height, width = samples.shape
    columns = columns or int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / columns))
    pad = 1
    canvas = np.ones((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), dtype=np.float32)
    pixels = ((samples.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        canvas[top:top + height, left:left + width] = pixels[index]
    scale = max(1, 512 // max(canvas.shape[:2]))
    figure = Figure(figsize=(canvas.shape[1] * scale / 100, canvas.shape[0] * scale / 100), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.axis("off")
    if channels == 1:
        axes.imshow(canvas[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axes.imshow(canvas[:, :, :3], interpolation="nearest")
    _makedirs_for(path)
    figure.savefig(path, dpi=100)
    return path


def save_loss_curve(history, path, window=100):
    """The loss of every step and its running mean, on a log scale."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = np.arange(1, len(history) + 1)
    axes.plot(steps, history, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    if len(history) >= 2:
        window = max(1, min(window, len(history) // 5 or 1))
        running = np.convolve(history, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], running, color="tab:blue", linewidth=2, label=f"mean of {window} steps")
    if history and min(history) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _makedirs_for(path)
    figure.savefig(path)


def save_quality_plot(result, path):
    """`fastddpm quality`'s rows: Fréchet distance (and for the digits the recognisable fraction)
    against model calls, one line per method, the real test split's value as a dashed line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    panels = [("frechet_distance_at_size", f"Fréchet distance to the train split\n(sets of {result['compared_at']})")]
    if result["reference"]["recognisable_fraction"] is not None:
        panels.append(("recognisable_fraction", "recognisable fraction"))
    figure = Figure(figsize=(6.5 * len(panels), 4.8), dpi=100)
    methods = list(dict.fromkeys(row["method"] for row in result["rows"]))
    for index, (key, label) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for method in methods:
            number = METHODS.index(method)  # one colour and marker per method in every plot
            rows = sorted((row for row in result["rows"] if row["method"] == method), key=lambda r: r["model_calls"])
            axes.plot([r["model_calls"] for r in rows], [r[key] for r in rows], marker="osv^DPX*h<"[number % 10],
                      markersize=5, color=f"C{number % 10}", linestyle="-" if number < 10 else "--", label=method)
        reference = result["reference"]
        axes.axhline(reference[key], color="black", linestyle=":",
                     label=f"real test split ({reference['images']} images)")
        axes.set_xscale("log")
        log_axes = [axes.xaxis]
        if key.startswith("frechet"):
            axes.set_yscale("log")
            log_axes.append(axes.yaxis)
        for axis in log_axes:  # ticks 1, 2, 5, 10, 20, ..., not 2×10¹
            axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("model calls per sample")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    clip = {None: "each method's default", True: "on", False: "off"}[result["clip_denoised"]]
    figure.suptitle(f"{result['num_samples']} samples per point, x0_hat clipping {clip}; {result['features']}",
                    fontsize=9)
    figure.tight_layout()
    _makedirs_for(path)
    figure.savefig(path)


def _makedirs_for(path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
