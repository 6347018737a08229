"""What the benchmarks share: timing (CPU and CUDA), the one row format, the one table, the
command line and the output files.

A benchmark times a dict {provider: step}, each step a no-argument callable, for every case
(op, shape, dtype) and turns the times into rows of FIELDS: one row per provider and metric
(time in ms or throughput in images/s, the bytes of the traffic floor, the bandwidth they
imply, peak memory on CUDA), each with its median and 20th / 80th percentiles. The table
gives each provider's speedup over its case's baseline (eager PyTorch, or diffusers).
"""
import argparse
import csv
import datetime
import json
import os
import random
import statistics
import sys
import time

import torch

FIELDS = ("op", "provider", "mode", "metric", "unit", "shape", "dtype", "p50", "p20", "p80", "device", "torch",
          "triton", "time")
BASELINES = ("eager", "diffusers")  # the provider each speedup is measured against, first found
HIGHER_IS_BETTER_UNITS = ("images/s", "GB/s", "it/s", "samples/s")


def rerun_with_interpreter(module, argv, interpret=True):
    """Run `python -m module argv` again in this process with Triton's interpreter on (or off),
    unless it already is: the choice must be made before triton is imported, which importing
    fastddpm does."""
    if (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")) != interpret:
        os.execve(sys.executable, [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"})


def resolve_device(device):
    """`device` as a torch.device; None: CUDA if available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def environment(device):
    """The fields every row of a run shares: device name, torch and triton versions, start time."""
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton_version(),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def case_fields(size, dtype):
    """shape and dtype as the rows spell them: "32x3x32x32", "bfloat16"."""
    return dict(shape="x".join(map(str, size)), dtype=str(dtype).removeprefix("torch."))


def triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def quantiles(values):
    """(p50, p20, p80) of the samples (a single sample for all three)."""
    if len(values) == 1:
        return tuple(values) * 3
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[1], deciles[7]


def quantile_fields(values):
    """(p50, p20, p80) as row fields."""
    return dict(zip(("p50", "p20", "p80"), values))


def time_cpu(steps, reps, *, warmup=3, clock=time.perf_counter):
    """{provider: [p50, p20, p80] in ms} of `cpu_samples`."""
    return {name: [1e3 * q for q in quantiles(values)]
            for name, values in cpu_samples(steps, reps, warmup=warmup, clock=clock).items()}


def cpu_samples(steps, reps, *, warmup=3, clock=time.perf_counter):
    """{provider: [seconds of repeat 1, ..., repeat `reps`]} measured with `clock`, the providers
    interleaved in a new order every repeat, so that load on the machine and the caches each
    leaves behind hit them alike (and the samples of one repeat can be compared pairwise).
    `clock=time.process_time` counts the process's CPU time, which other processes do not
    inflate (all threads together: use it single-threaded)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            start = clock()
            steps[name]()
            samples[name].append(clock() - start)
    return samples


def time_cuda(steps, grad_to_none=None):
    """{provider: [p50, p20, p80] in ms} by triton.testing.do_bench (gradients of
    `grad_to_none` reset before every run)."""
    import triton.testing
    return {name: triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
            for name, step in steps.items()}


def peak_mb(step, device):
    """CUDA memory one run of `step` allocates at its peak beyond what was allocated before, in MiB."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def case_rows(where, provider, ms, moved, peak=None):
    """The rows of one provider in one case: time (`ms`, its quantiles), the floor's bytes
    (`moved`), the bandwidth that floor implies, and peak memory (MiB) where `peak` is given."""
    where = dict(where, provider=provider)
    rows = [dict(where, metric="time", unit="ms", **quantile_fields(ms)),
            dict(where, metric="bytes", unit="B", p50=moved, p20=moved, p80=moved),
            # slower time, lower bandwidth: p20 of time gives p80 of bandwidth
            dict(where, metric="bandwidth", unit="GB/s",
                 **quantile_fields([moved / (1e6 * value) for value in (ms[0], ms[2], ms[1])]))]
    if peak is not None:
        rows.append(dict(where, metric="peak_memory", unit="MB", **quantile_fields([peak] * 3)))
    return rows


def speedups(rows):
    """(op, shape, dtype, mode, metric, provider, baseline, speedup): each provider's time or
    throughput against the first of BASELINES in its case."""
    groups = {}
    for row in rows:
        if row["metric"] not in ("time", "throughput"):
            continue
        key = (row["op"], row["shape"], row["dtype"], row.get("mode", ""), row["metric"])
        groups.setdefault(key, {})[row["provider"]] = row
    result = []
    for key, by_provider in groups.items():
        baseline = next((by_provider[name] for name in BASELINES if name in by_provider), None)
        if baseline is None:
            continue
        for provider, row in by_provider.items():
            if row is baseline or not row["p50"] or not baseline["p50"]:
                continue
            higher_better = row["unit"] in HIGHER_IS_BETTER_UNITS
            ratio = row["p50"] / baseline["p50"] if higher_better else baseline["p50"] / row["p50"]
            result.append((*key, provider, baseline["provider"], ratio))
    return result


def format_table(rows):
    """The rows as aligned text, with each provider's speedup over its case's baseline."""
    ratio = {(op, shape, dtype, mode, metric, provider): value
             for op, shape, dtype, mode, metric, provider, _, value in speedups(rows)}
    header = ("op", "shape", "dtype", "mode", "provider", "metric", "p50", "p20", "p80", "unit", "vs baseline")
    lines = [header]
    for row in rows:
        key = (row["op"], row["shape"], row["dtype"], row.get("mode", ""), row["metric"], row["provider"])
        lines.append((row["op"], str(row["shape"]), str(row["dtype"]), str(row.get("mode", "")), row["provider"],
                      row["metric"], _number(row["p50"]), _number(row.get("p20")), _number(row.get("p80")),
                      row["unit"], f"{ratio[key]:.2f}x" if key in ratio else ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _number(value):
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)


def parser(description, full_sizes, threads=None, dtypes="float32,bfloat16"):
    """The flags every benchmark takes: --device, --full, --dtypes (where `dtypes`), --reps,
    --threads (default `threads`; None: torch's) and --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--full", action="store_true", help=f"the full sizes {full_sizes} (default on CUDA)")
    if dtypes:
        parser.add_argument("--dtypes", default=dtypes, help=f"(default: {dtypes})")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"CPU threads (default: {threads})" if threads else "CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the rows to this file: JSON if it ends in .json, else CSV")
    return parser


def setup(args):
    """Applies --threads; returns the dtypes of --dtypes (None without the flag)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = getattr(args, "dtypes", None)
    return [getattr(torch, name) for name in dtypes.split(",")] if dtypes else None


def report(rows, out=None):
    """Prints the table (with a note on what runs on CPU) and writes the rows to `out`."""
    if rows and rows[0]["device"] == "cpu":
        print(f"CPU ({torch.get_num_threads()} threads): fastddpm runs its PyTorch path (backend 'auto'), "
              "not the Triton kernels")
    print(format_table(rows))
    if out:
        write_rows(rows, out)


def write_rows(rows, path):
    """The rows to `path`: JSON if it ends in .json, else CSV of FIELDS."""
    (write_json if path.endswith(".json") else write_csv)(rows, path)


def write_json(rows, path):
    with open(_made_folder_for(path), "w") as handle:
        json.dump(rows, handle, indent=2, default=str)


def write_csv(rows, path):
    with open(_made_folder_for(path), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _made_folder_for(path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return path
