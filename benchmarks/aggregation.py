"""Aggregation benchmark: the server's streaming FedAvg path against the common "keep them all, then average".

`python -m benchmarks.aggregation --params 10000000 --clients 32 --repeat 3 --json out.json`

N client updates of a float32 model with P parameters (4 tensors of about P/4 elements each) are generated
deterministically, once, as the bytes a client uploads (`torch.save(model.state_dict(), f)`), and written to a
temporary directory shared by the contestants (generation is not timed). Each contestant then runs in its own
subprocess, once per repetition, so that its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) is its own; the
interpreter's baseline (after the imports, before any work) is measured in the same subprocess. Timed: from
reading the update bytes to the aggregated weights.

* `ours`: the server's code path of `accept_local_update` + `fold_into_round` + round close:
  per update `serialization.read_weights`, `serialization.validate_weights` against the global model's spec and
  `serialization.detect_format`, then `RunningWeightedSum.fold`; at the end `finalize` like the global weights
  (read from safetensors, as the round close does). The sum stays in memory (what a worker holding it would do).
* `ours_persisted`: the same, plus the round trip the server does today for every upload: the float64 running
  sum is loaded from safetensors bytes, folded, and saved back to safetensors bytes (the model store is an
  in-memory bytes object here, so blob-store I/O is not included).
* `naive`: `torch.load(weights_only=True)` of every update into a full state dict, all kept in a list, then a
  layer-by-layer sample-size-weighted average (`torch.stack` + `torch.tensordot`, float32).
* `flower`: `flwr.server.strategy.aggregate.aggregate` on `[(ndarrays, num_examples)]`, the ndarrays obtained by
  `torch.load(weights_only=True)` + `Tensor.numpy()`; "skipped" when flwr cannot be imported.

Reported per contestant: the median seconds over `--repeat` runs and the largest peak RSS; and the largest
absolute difference of `ours`, `ours_persisted` and `flower` to `naive` (proof that the answers agree).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported lazily: the parent must stay small while it starts the contestants, because a child's
# ru_maxrss starts at the parent's peak RSS (Linux carries the high-water mark across fork/vfork + exec).

CONTESTANTS = ("ours", "ours_persisted", "naive", "flower")
LAYERS = 4
MIB = 2**20
MANIFEST = "manifest.json"
ROOT = Path(__file__).resolve().parents[1]
GLOBAL_WEIGHTS = "global.safetensors"


# data generation (parent process, not timed)


def layer_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a model of `params` float32 parameters split into `LAYERS` tensors."""
    if params < LAYERS:
        raise ValueError(f"--params must be at least {LAYERS}, got {params}")
    base = params // LAYERS
    sizes = [base] * (LAYERS - 1) + [params - base * (LAYERS - 1)]
    return {f"layer{i}.weight": (size // 100, 100) if size % 100 == 0 else (size,) for i, size in enumerate(sizes)}


def sample_size(index: int) -> int:
    """The deterministic sample size of client `index` (between 100 and 999)."""
    return 100 + (index * 379) % 900


def generate(directory: Path, params: int, clients: int, seed: int) -> dict[str, Any]:
    """Write the global weights, the clients' update bytes and a manifest into `directory`; return the manifest."""
    import torch
    from safetensors.torch import save_file as save_safetensors_file

    shapes = layer_shapes(params)
    generator = torch.Generator().manual_seed(seed)
    global_weights = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    save_safetensors_file(global_weights, str(directory / GLOBAL_WEIGHTS))
    files = []
    for index in range(clients):
        generator = torch.Generator().manual_seed(seed * 100_003 + index + 1)
        update = {
            name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
            for name, tensor in global_weights.items()
        }
        buffer = io.BytesIO()
        torch.save(update, buffer)  # what a client uploads
        path = directory / f"update-{index:04d}.pt"
        path.write_bytes(buffer.getvalue())
        files.append(path.name)
        del update, buffer
    spec = [
        {"name": name, "shape": list(t.shape), "dtype": "float32", "is_parameter": True}
        for name, t in global_weights.items()
    ]
    manifest = {
        "params": params,
        "clients": clients,
        "files": files,
        "sample_sizes": [sample_size(i) for i in range(clients)],
        "spec": spec,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return manifest


# contestants (worker subprocess)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(directory: Path, manifest: dict[str, Any], persisted: bool) -> dict[str, torch.Tensor]:
    """The server's path: read + validate + fold every update (optionally persisting the sum), then finalize."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from fl_server_ai.aggregation import RunningWeightedSum
    from fl_server_core import serialization

    spec = [serialization.TensorSpec.from_json(entry) for entry in manifest["spec"]]
    accumulator = RunningWeightedSum()
    stored: bytes | None = None  # the model store's copy of the running sum (ours_persisted)
    for name, weight in zip(manifest["files"], manifest["sample_sizes"], strict=True):
        update_bytes = (directory / name).read_bytes()
        # accept_local_update: the bytes stay referenced while the update is folded, as in the server
        weights = serialization.read_weights(update_bytes)
        serialization.validate_weights(weights, spec)
        serialization.detect_format(update_bytes)
        if persisted:
            # fold_into_round: load_accumulator, fold, to_state, save (fl_server_ai/trainer/accumulator.py)
            if stored is None:
                accumulator = RunningWeightedSum()
            else:
                header_length = int.from_bytes(stored[:8], "little")
                metadata = json.loads(stored[8 : 8 + header_length]).get("__metadata__", {})
                accumulator = RunningWeightedSum.from_state(load_safetensors(stored), metadata)
            accumulator.fold(weights, float(weight))
            tensors, metadata = accumulator.to_state()
            stored = save_safetensors(tensors, metadata=metadata)
            del accumulator, tensors
        else:
            accumulator.fold(weights, float(weight))
        del update_bytes, weights
    # the round close: finalize like the current global weights
    like = serialization.safetensors_to_weights((directory / GLOBAL_WEIGHTS).read_bytes())
    if persisted:
        assert stored is not None
        header_length = int.from_bytes(stored[:8], "little")
        metadata = json.loads(stored[8 : 8 + header_length]).get("__metadata__", {})
        accumulator = RunningWeightedSum.from_state(load_safetensors(stored), metadata)
        del stored
    return accumulator.finalize(like)


def run_naive(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load every update into a state dict, keep them all, then average layer by layer (weighted, float32)."""
    import torch

    states = []
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        states.append(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        del data
    sizes = manifest["sample_sizes"]
    factors = torch.tensor([size / sum(sizes) for size in sizes], dtype=torch.float32)
    return {key: torch.tensordot(factors, torch.stack([state[key] for state in states]), dims=1) for key in states[0]}


def run_flower(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """flwr's aggregate() on [(ndarrays, num_examples)], the ndarrays deserialized from the uploaded bytes."""
    import torch
    from flwr.server.strategy.aggregate import aggregate

    results = []
    names: list[str] = []
    for name, size in zip(manifest["files"], manifest["sample_sizes"], strict=True):
        data = (directory / name).read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        names = list(state)
        results.append(([tensor.numpy() for tensor in state.values()], size))
        del data, state
    aggregated = aggregate(results)
    return {name: torch.from_numpy(array) for name, array in zip(names, aggregated, strict=True)}


def worker(contestant: str, directory: Path, out: Path) -> int:
    """Run one contestant once; write {"seconds", "peak_rss_mib", "baseline_rss_mib"} and its result tensors.

    A contestant whose library cannot be imported (flwr) writes {"skipped": reason} instead.
    """
    import torch  # noqa: F401  (import cost belongs to the baseline)
    from safetensors.torch import save_file as save_safetensors_file

    report: dict[str, Any]
    try:
        if contestant == "flower":
            import flwr.server.strategy.aggregate  # noqa: F401  (import cost belongs to the baseline)
        else:
            from fl_server_ai.aggregation import RunningWeightedSum  # noqa: F401
            from fl_server_core import serialization  # noqa: F401
    except ImportError as error:
        out.write_text(json.dumps({"skipped": f"{type(error).__name__}: {error}"}))
        return 0
    manifest = json.loads((directory / MANIFEST).read_text())
    baseline = peak_rss_mib()
    started = time.perf_counter()
    if contestant in ("ours", "ours_persisted"):
        result = run_ours(directory, manifest, persisted=contestant == "ours_persisted")
    elif contestant == "naive":
        result = run_naive(directory, manifest)
    else:
        result = run_flower(directory, manifest)
    seconds = time.perf_counter() - started
    report = {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline}
    save_safetensors_file({k: v.contiguous() for k, v in result.items()}, str(out.with_suffix(".safetensors")))
    out.write_text(json.dumps(report))
    return 0


# parent: orchestration, comparison and report


def run_contestant(contestant: str, directory: Path, out: Path) -> dict[str, Any]:
    """Run one contestant in a fresh subprocess; RuntimeError with its output if it fails."""
    command = [sys.executable, "-m", "benchmarks.aggregation", "--worker", contestant, "--data", str(directory)]
    command += ["--worker-out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"{contestant} failed (exit {completed.returncode}):\n{completed.stdout}{completed.stderr}")
    return json.loads(out.read_text())


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute elementwise difference over all tensors (ValueError if names or shapes differ)."""
    if set(a) != set(b):
        raise ValueError(f"different tensor names: {sorted(a)} vs {sorted(b)}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def machine_description() -> str:
    """nproc, CPU model and memory of this machine."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}, {memory}"


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the updates, run every contestant `repeat` times (interleaved) and build the JSON report."""
    directory = Path(tempfile.mkdtemp(prefix="fl-aggregation-bench-"))
    try:
        print(f"generating {args.clients} updates of {args.params:,} float32 parameters in {directory} ...", flush=True)
        command = [sys.executable, "-m", "benchmarks.aggregation", "--worker", "generate", "--data", str(directory)]
        command += ["--params", str(args.params), "--clients", str(args.clients), "--seed", str(args.seed)]
        generated = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)  # keeps this process small
        if generated.returncode != 0:
            raise RuntimeError(f"generation failed:\n{generated.stdout}{generated.stderr}")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTESTANTS}
        result_files: dict[str, Path] = {}
        skipped: dict[str, str] = {}
        for repetition in range(args.repeat):
            for contestant in CONTESTANTS:
                if contestant in skipped:
                    continue
                out = directory / f"result-{contestant}-{repetition}.json"
                report = run_contestant(contestant, directory, out)
                if "skipped" in report:
                    skipped[contestant] = report["skipped"]
                    print(f"  {contestant:<15} skipped: {report['skipped']}", flush=True)
                    continue
                runs[contestant].append(report)
                print(
                    f"  run {repetition + 1}/{args.repeat} {contestant:<15} {report['seconds']:8.3f} s  "
                    f"peak {report['peak_rss_mib']:8.1f} MiB",
                    flush=True,
                )
                tensors = out.with_suffix(".safetensors")
                if contestant in result_files:
                    tensors.unlink()
                else:
                    result_files[contestant] = tensors
        # compared only now: loading torch earlier would raise the children's ru_maxrss floor
        from safetensors.torch import load_file as load_safetensors_file

        naive = load_safetensors_file(str(result_files["naive"]))
        diffs = {
            name: max_abs_diff(load_safetensors_file(str(path)), naive)
            for name, path in result_files.items()
            if name != "naive"
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    model_mib = args.params * 4 / MIB
    summary: dict[str, Any] = {}
    baselines: dict[str, float] = {}
    for contestant in CONTESTANTS:
        if contestant in skipped:
            summary[contestant] = "skipped"
            continue
        reports = runs[contestant]
        summary[contestant] = {
            "seconds": round(statistics.median(r["seconds"] for r in reports), 4),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in reports), 1),
        }
        baselines[contestant] = max(r["baseline_rss_mib"] for r in reports)
    return {
        "benchmark": "aggregation",
        "params": args.params,
        "clients": args.clients,
        "model_mib": round(model_mib, 2),
        "results": summary,
        "max_abs_diff_vs_naive": max(diffs.values()),
        "baseline_rss_mib": round(baselines["ours"], 1),
        "machine": machine_description(),
        "_baselines": baselines,
        "_diffs": diffs,
        "_skipped": skipped,
    }


def print_table(report: dict[str, Any]) -> None:
    """A readable table: seconds, speed-up of each contestant over naive, peak RSS and RSS over model size."""
    model_mib = report["params"] * 4 / MIB
    results = report["results"]
    naive_seconds = results["naive"]["seconds"]
    print()
    print(f"aggregation: {report['clients']} clients x {report['params']:,} params ({model_mib:.1f} MiB float32)")
    print(f"machine: {report['machine']}")
    header = (
        f"{'contestant':<15} {'seconds':>9} {'naive/x':>8} {'peak MiB':>9} {'base MiB':>9} "
        f"{'peak/model':>11} {'(peak-base)/model':>18} {'diff vs naive':>14}"
    )
    print(header)
    print("-" * len(header))
    for contestant in CONTESTANTS:
        entry = results[contestant]
        if entry == "skipped":
            print(f"{contestant:<15} skipped ({report['_skipped'].get(contestant, '')})")
            continue
        base = report["_baselines"][contestant]
        diff = report["_diffs"].get(contestant)
        print(
            f"{contestant:<15} {entry['seconds']:9.3f} {naive_seconds / entry['seconds']:8.2f} "
            f"{entry['peak_rss_mib']:9.1f} {base:9.1f} {entry['peak_rss_mib'] / model_mib:11.2f} "
            f"{(entry['peak_rss_mib'] - base) / model_mib:18.2f} {'-' if diff is None else f'{diff:.2e}':>14}"
        )
    ours = results["ours"]
    others = {name: results[name] for name in ("naive", "flower") if results[name] != "skipped"}
    speedups = ", ".join(f"{o['seconds'] / ours['seconds']:.2f}x vs {n}" for n, o in others.items())
    limit = 4 * model_mib + report["baseline_rss_mib"]
    print()
    print(f"target ours >= 2x faster: {speedups}")
    print(f"target ours peak < 4 x model + baseline = {limit:.1f} MiB: ours peak {ours['peak_rss_mib']:.1f} MiB")
    print(f"max_abs_diff_vs_naive: {report['max_abs_diff_vs_naive']:.3e}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (the --worker options are internal)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aggregation", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000, help="parameters of the float32 model")
    parser.add_argument("--clients", type=int, default=32, help="number of client updates")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contestant (the median is reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated updates")
    parser.add_argument("--json", type=Path, help="write the JSON report to this file")
    parser.add_argument("--worker", choices=(*CONTESTANTS, "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and (args.clients < 1 or args.repeat < 1):
        parser.error("--clients and --repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the benchmark, or one contestant run when called with --worker."""
    args = parse_args(argv)
    if args.worker == "generate":
        generate(args.data, args.params, args.clients, args.seed)
        return 0
    if args.worker is not None:
        return worker(args.worker, args.data, args.worker_out)
    try:
        report = benchmark(args)
    except Exception as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print_table(report)
    public = {key: value for key, value in report.items() if not key.startswith("_")}
    text = json.dumps(public, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
