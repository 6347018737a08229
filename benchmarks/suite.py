"""`fastddpm bench`: every hot path timed against its peers, as one table, JSON and plot.

Runs the benchmark modules of `fastddpm.benchmarks` (loss, sampling step, ELBO, train step),
each with sizes small enough on a CPU for the whole command to take about two minutes, and
collects their rows (harness.FIELDS). The speedup of a provider is its case's baseline's median
time over its own (or its images/s over the baseline's), per op, shape and dtype.
"""
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from . import harness

BENCHMARKS = ("loss", "sampling", "elbo", "train_step")
# Per benchmark, the keyword arguments that keep it short on a CPU (passed when its run() takes them).
CPU_OPTIONS = {
    "loss": dict(sizes=((16, 3, 32, 32),), dtypes=(torch.float32,), reps=10),
    "sampling": dict(sizes=((16, 3, 32, 32),), dtypes=(torch.float32,), reps=10),
    "elbo": dict(sizes=((16, 3, 32, 32),), dtypes=(torch.float32,), reps=5, loop_steps=10, loop_batch=2),
    "train_step": dict(preset="tiny", batch=8, steps=3),
}


def run_benchmark(name, device):
    """The rows of benchmarks/bench_<name>.py on `device`."""
    module = importlib.import_module(f"fastddpm.benchmarks.bench_{name}")
    accepted = inspect.signature(module.run).parameters
    options = {"device": str(device)}
    if torch.device(device).type == "cpu":
        options.update(CPU_OPTIONS.get(name, {}))
    return module.run(**{key: value for key, value in options.items() if key in accepted})


def plot_speedups(rows, path):
    """A bar chart of the speedup over the baseline per op / shape / dtype (one bar per provider)."""
    from matplotlib.figure import Figure

    entries = harness.speedups(rows)
    if not entries:
        raise ValueError("no speedups to plot: no benchmark row has a baseline")

    def label(op, shape, dtype, mode):
        return f"{op}\n{shape}\n{dtype}" + (f" {mode}" if mode not in ("", "full") else "")

    labels = sorted({label(op, shape, dtype, mode) for op, shape, dtype, mode, *_ in entries})
    providers = sorted({entry[5] for entry in entries})
    width = 0.8 / len(providers)
    figure = Figure(figsize=(max(6, 1.5 * len(labels) + 2), 4.8), dpi=100)
    axes = figure.add_subplot()
    for index, provider in enumerate(providers):
        values = {label(op, shape, dtype, mode): value
                  for op, shape, dtype, mode, _, name, _, value in entries if name == provider}
        positions = [i + (index - (len(providers) - 1) / 2) * width for i in range(len(labels))]
        axes.bar(positions, [values.get(label, 0.0) for label in labels], width, label=provider)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(labels)), labels, fontsize=7)
    axes.set_ylabel("speedup over eager (x)")
    devices = sorted({str(row.get("device")) for row in rows})
    axes.set_title(f"fastddpm bench on {', '.join(devices)}")
    axes.legend()
    figure.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path)


def traffic_rows(print_fn=print):
    """The rows of benchmarks/traffic.py (launches, bytes per element) and host_overhead.py (host
    µs per call), each run in a child process under Triton's interpreter, their tables printed."""
    rows = []
    for module in ("traffic", "host_overhead"):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rows.json")
            done = subprocess.run([sys.executable, "-m", f"fastddpm.benchmarks.{module}", "--json", path],
                                  env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"fastddpm.benchmarks.{module} failed:\n{done.stderr[-2000:]}")
            print_fn(done.stdout.rstrip())
            with open(path) as handle:
                rows += json.load(handle)
    return rows


def main(json_path=None, plot_path=None, only=None, device=None, print_fn=print, traffic=False):
    """Run the benchmarks, print the table, write JSON and plot; 0 on success, 1 if one failed.
    `traffic`: also the launches, bytes per element and host µs of every hot path (`traffic_rows`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = only or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    rows, failed = [], []
    for name in names:
        start = time.perf_counter()
        try:
            new_rows = run_benchmark(name, device)
        except ModuleNotFoundError as error:
            if error.name != f"fastddpm.benchmarks.bench_{name}":
                raise
            print_fn(f"bench_{name}: not installed, skipped", file=sys.stderr)
            failed.append(name)
            continue
        rows.extend(new_rows)
        print_fn(f"bench_{name}: {len(new_rows)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if rows:
        print_fn(harness.format_table(rows))
    if traffic:
        rows.extend(traffic_rows(print_fn))
    if json_path:
        harness.write_json(rows, json_path)
    if plot_path and rows:
        plot_speedups(rows, plot_path)
    return 1 if failed else 0
