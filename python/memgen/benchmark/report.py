"""What a benchmark run records besides its numbers (machine, versions, load),
and how it shows them: a printed table, a JSON file, a PNG plot."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from memgen.benchmark import DEFAULT_OUTPUT_DIR


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), if any."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "bench").is_dir() else None


LOAD_WARN_FRACTION = 0.5                       # 1-minute load above this x cores: ratios unreliable
_START = (time.perf_counter(), os.times())     # this process's clock when the benchmark modules load


def default_output(mode: str, device: torch.device, output_dir: str | Path | None = None) -> Path:
    """<output_dir>/<mode>_<device>.json; output_dir defaults to ./memgen-bench-results."""
    return Path(output_dir or DEFAULT_OUTPUT_DIR) / f"{mode}_{device.type}.json"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def elapsed_s() -> float:
    """Seconds since the benchmark modules loaded (the run's start, model loading included)."""
    return time.perf_counter() - _START[0]


def free_cores(cores: int, load_1min: float) -> int:
    """The cores other jobs leave idle (at least 1). Measured here: at load 4 on
    2 cores, 2 torch threads decoded 7x slower than 1 (each waits for the other
    to be scheduled) and gave memory on/off ratios of 0.7x-4x."""
    return max(1, cores - math.floor(load_1min + 0.5))


def own_load() -> float:
    """Cores this process (and its children) kept busy on average since it
    started benchmarking: its share of the end-of-run load average."""
    wall = time.perf_counter() - _START[0]
    t0, t1 = _START[1], os.times()
    cpu = sum(getattr(t1, k) - getattr(t0, k) for k in ("user", "system", "children_user", "children_system"))
    return cpu / wall if wall > 0 else 0.0


def load_warning(start: list[float] | None, end: list[float] | None, cores: int,
                 own: float = 0.0, fraction: float = LOAD_WARN_FRACTION) -> str | None:
    """A warning when other work shared the CPU: the 1-minute load average at
    the start, or at the end less this run's own share (`own`, in cores),
    above fraction x cores. None when the machine looked quiet or the load is unknown."""
    limit = fraction * cores
    found = []
    if start and start[0] > limit:
        found.append(f"{start[0]:.2f} at the start")
    if end and end[0] - own > limit:
        found.append(f"{end[0] - own:.2f} at the end (load average {end[0]:.2f} less this run's {own:.2f})")
    if not found:
        return None
    return (f"other jobs were using the CPU (1-minute load {' and '.join(found)}, above {limit:g} = "
            f"{fraction:g} x {cores} cores): times and on/off ratios are unreliable; rerun on a quiet machine")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    cpu = cpu_name()
    usable = usable_cores()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version(),
            "device": str(device), "load_average_start": load_average()}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_sha() -> str | None:
    root = repo_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict:
    import transformers

    import memgen

    out = {"memgen": memgen.__version__, "memgen_git": git_sha(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import peft
        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def _clean(x):
    """JSON has no NaN/inf: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


_NUMBER_LIST = re.compile(r"\[\s+([-0-9.eE,\s]+?)\s+\]")


def to_json_text(result: dict) -> str:
    """Indented JSON with lists of numbers (token timestamps, masks) on one line."""
    text = json.dumps(_clean(result), indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def write_json(path: Path, result: dict) -> Path:
    """Write the result, with the end-of-run load and `load_warning` (null, or
    the warning, which also goes to stderr)."""
    machine = result["machine"]
    machine["load_average_end"] = load_average()
    machine["own_load_estimate"] = round(own_load(), 2)
    result["load_warning"] = load_warning(machine.get("load_average_start"), machine["load_average_end"],
                                          machine.get("usable_cores") or usable_cores(), machine["own_load_estimate"])
    if result["load_warning"]:
        print(f"memgen bench: warning: {result['load_warning']}", file=sys.stderr)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json_text(result))
    return path


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def plot_latency(points: list[dict], path: Path, title: str) -> Path:
    """Two panels: end-to-end latency and time per output token against the
    output length, one line per batch size, memory on (solid) and off (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    batches = sorted({p["batch_size"] for p in points})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in ((axes[0], "latency_s", "end-to-end latency (s)"),
                           (axes[1], "tpot_median_s", "time per output token (ms)")):
        scale = 1000.0 if key.startswith("tpot") else 1.0
        for i, b in enumerate(batches):
            pts = sorted((p for p in points if p["batch_size"] == b), key=lambda p: p["max_tokens"])
            xs = [p["max_tokens"] for p in pts]
            for variant, style in (("memory_on", "-"), ("memory_off", "--")):
                ys = [(p[variant][key] or 0.0) * scale for p in pts]
                ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)],
                        label=f"batch {b}, memory {variant.split('_')[1]}")
        ax.set_xlabel("output tokens per request")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
