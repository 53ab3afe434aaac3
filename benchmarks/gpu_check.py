"""The prepared GPU check that ``scripts/gpu_check.sh`` runs on one GPU in one call (under 8 minutes on an H200).

    python -m benchmarks.gpu_check plan [--sizes-only]   what is carried, its size, the plan and the minutes (no GPU)
    python -m benchmarks.gpu_check prepare               the embedded demo data and base in .cache/gpu_check (CPU)
    python -m benchmarks.gpu_check prune                 remove wheels of .whl/ that requirements/gpu-wheels.txt lacks
    python -m benchmarks.gpu_check run --out DIR [--parts ...] [--rehearse]

``run`` (after scripts/gpu_check.sh has installed the carried wheels) writes everything under ``--out``: the
summary ``gpu_h200.md`` / ``.json`` (also copied to benchmarks/results/ unless ``--rehearse``) and one log per part.
Parts, in this order, each with its own time limit inside one deadline:

- environment: nvidia-smi, torch and its device, the versions and places of the packages the check imports;
- benchmark: ``benchmarks.gpu_layer_stack`` (Llama-2 7B layer stack, bf16, 4096 tokens), alone on the GPU;
- pytest and demo, side by side: ``pytest tests/gpu``; the embedded demo base fine-tuned (tl6, rank 8) 20 steps
  through the NeMo entry script on CUDA in fp32, bf16-mixed, 16-mixed (loss scale from 2^16: overflows are skipped),
  fp32 with megatron's distributed optimizer and bf16 O2 with it, losses per step against the fp32 run of the same
  optimizer.

``--rehearse`` runs the same plumbing on CPU (the tiny benchmark, the entry script on CPU, 3 steps) and writes
nothing into benchmarks/results: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_demo_runs import DEMO_RUNS, compare_losses, demo_command, read_scalars  # noqa: E402

WHEEL_LIST = REPO / "requirements" / "gpu-wheels.txt"
WHEELS = REPO / ".whl"
HELPERS = WHEELS / "nemo_helpers"
WORK = REPO / ".cache" / "gpu_check"
RESULTS = REPO / "benchmarks" / "results"
CARRY_LIMIT = 64 * 2**20
MIB = 2**20
DEADLINE_S = 420  # the whole run, install included; the recommended call's timeout leaves a minute beyond it
# part: (estimated seconds on an H200 machine, time limit in seconds)
PARTS = {"install": (25, 90), "environment": (5, 20), "benchmark": (60, 140), "pytest": (90, 180),
         "demo": (75, 180)}


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    build: bool  # built here from the sdist (no cp312 / py3 wheel of this release on PyPI)

    @property
    def prefix(self) -> str:
        """The start of the wheel's file name (name normalized as wheel files spell it, lower case)."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


def wheel_list(path: Path = WHEEL_LIST) -> list[Wheel]:
    wheels = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            name, version = words[0].split("==")
            wheels.append(Wheel(name, version, build=words[1:2] == ["build"]))
    return wheels


def match_wheels(wheels: list[Wheel], folder: Path = WHEELS) -> tuple[dict[Wheel, Path], list[Wheel], list[Path]]:
    """(wheel -> file, wheels without a file, files of no listed wheel)."""
    files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    found = {w: f for w in wheels for f in files if f.name.lower().startswith(w.prefix)}
    missing = [w for w in wheels if w not in found]
    extra = [f for f in files if f not in found.values()]
    return found, missing, extra


def _tree_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def carried_sizes() -> dict[str, int]:
    """Bytes that one GPU call sends: the working tree git would send (tracked + untracked not ignored), the
    wheels and the helper, the prepared demo data and base."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return {"repository": _tree_bytes(REPO / p for p in listed if p),
            ".whl": _tree_bytes(WHEELS.rglob("*")) if WHEELS.is_dir() else 0,
            ".cache/gpu_check": _tree_bytes(_carried_work_files())}


def _carried_work_files() -> list[Path]:
    data = ["manifest.json", "corpus.txt", "tokenizer.model", "train.jsonl", "validation.jsonl", "test.jsonl"]
    return [WORK / "base.nemo", WORK / "base.json"] + [WORK / "data" / name for name in data]


def base_is_current(work: Path = WORK) -> bool:
    """Whether the prepared data and base in `work` are what :func:`prepare` builds from the code as it is now."""
    from nemo_tiedlora.apps.demo.base_model import BaseSpec, _fingerprint
    from nemo_tiedlora.apps.demo.data import DATA_VERSION

    try:
        manifest = json.loads((work / "data" / "manifest.json").read_text())
        base = json.loads((work / "base.json").read_text())
    except (OSError, ValueError):
        return False
    data = work / "data"
    return (manifest.get("params", {}).get("data_version") == DATA_VERSION and (work / "base.nemo").is_file()
            and base.get("fingerprint") == _fingerprint(BaseSpec(), data / "corpus.txt", data / "tokenizer.model"))


def plan(*, sizes_only: bool = False) -> int:
    """Print what is carried and the plan; 0 when every wheel is there and the whole fits one call."""
    wheels = wheel_list()
    found, missing, extra = match_wheels(wheels)
    helper = sorted(HELPERS.glob("helpers.cpython-312-*.so")) if HELPERS.is_dir() else []
    problems = []
    if missing:
        problems.append(f"missing wheels in .whl/: {', '.join(f'{w.name}=={w.version}' for w in missing)} "
                        "(run bash scripts/gpu_wheels.sh)")
    if extra:
        problems.append(f"wheels in .whl/ that requirements/gpu-wheels.txt does not list: "
                        f"{', '.join(f.name for f in extra)} (python -m benchmarks.gpu_check prune)")
    if not helper:
        problems.append("no NeMo dataset helper for Python 3.12 in .whl/nemo_helpers/ (run bash scripts/gpu_wheels.sh)")
    sizes = carried_sizes()
    total = sum(sizes.values())
    if not sizes_only:
        print(f"GPU check plan: {len(found)} of {len(wheels)} wheels in .whl/ (requirements/gpu-wheels.txt)")
        for wheel in wheels:
            file = found.get(wheel)
            size = f"{file.stat().st_size / MIB:6.2f} MiB" if file else "   MISSING"
            print(f"  {size}  {wheel.name}=={wheel.version}{'  (built from the sdist)' if wheel.build else ''}")
    for name, size in sizes.items():
        print(f"  {size / MIB:6.1f} MiB  {name}")
    print(f"  {total / MIB:6.1f} MiB  carried in all (limit {CARRY_LIMIT // MIB} MiB)")
    if total > CARRY_LIMIT:
        problems.append(f"the repository and what it carries take {total / MIB:.1f} MiB, over the {CARRY_LIMIT // MIB} "
                        "MiB of one call: carry fewer wheels or remove untracked files")
    base_ready = base_is_current()
    if not base_ready:
        problems.append("the demo data and base in .cache/gpu_check are missing or older than the code (the GPU "
                        "machine would spend a minute building them): run bash scripts/gpu_wheels.sh")
    if not sizes_only:
        demo_s = PARTS["demo"][0] + (0 if base_ready else 60)
        print("Steps (estimated seconds on one H200 machine; limit):")
        steps = [("install", "pip install --no-deps --target the wheels; NeMo's dataset helper in place"),
                 ("environment", "nvidia-smi, torch + device, package versions and places"),
                 ("benchmark", "Llama-2 7B layer stack, bf16, seq 4096: base / lora / tl6 / tl6 reference, alone"),
                 ("pytest", "pytest tests/gpu (CUDA update, autocast, fp16 loss scaling, sync counts; TE skips)"),
                 ("demo", f"embedded base ({'carried' if base_ready else 'built there, +60 s'}), 20 steps x "
                          f"{len(DEMO_RUNS)} runs on CUDA: {', '.join(DEMO_RUNS)}")]
        for name, what in steps:
            estimate = demo_s if name == "demo" else PARTS[name][0]
            print(f"  {name:12s} {estimate:4d} s (limit {PARTS[name][1]:3d} s)  {what}")
        estimate = sum(PARTS[n][0] for n in ("install", "environment", "benchmark")) + max(PARTS["pytest"][0], demo_s)
        print(f"  pytest and demo run side by side; estimated {estimate / 60:.1f} min in all, stopped at "
              f"{DEADLINE_S / 60:.0f} min at the latest (within the 8 minutes of the check)")
    for problem in problems:
        print(f"gpu_check: {problem}", file=sys.stderr)
    return 1 if problems else 0


def prune() -> None:
    _, _, extra = match_wheels(wheel_list())
    for path in extra:
        print(f"removing {path.name}")
        path.unlink()


def prepare(work: Path = WORK) -> Path:
    """The embedded demo data and base in `work` (built once on CPU; reused when their inputs are unchanged)."""
    from nemo_tiedlora.apps.demo.data import build_all
    from nemo_tiedlora.apps.demo.embedded import embedded_base

    work.mkdir(parents=True, exist_ok=True)
    data = build_all(work / "data")
    return embedded_base(work, data)


# ------------------------------------------------------------------------------------------------------------ run


def _env(**extra: str) -> dict[str, str]:
    from nemo_tiedlora.apps.runner import child_env

    return dict(child_env(), OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", **extra)


def _run_logged(args: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one child (its output to `log`): {'status': passed | failed | timeout, 'seconds', 'exit'}."""
    started = time.time()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env or _env(),
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            from nemo_tiedlora.apps.runner import stop_group

            stop_group(process, grace=5)
            return {"status": "timeout", "seconds": round(time.time() - started, 1), "exit": None}
    return {"status": "passed" if code == 0 else "failed", "seconds": round(time.time() - started, 1), "exit": code}


def environment(out: Path) -> dict:
    import importlib.metadata as metadata

    import torch

    lines, info = [], {"torch": torch.__version__, "cuda": torch.version.cuda,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15).stdout
        info["nvidia_smi_L"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                              timeout=15).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        smi = f"nvidia-smi: {error}"
    lines += [smi, f"python {sys.version.split()[0]} at {sys.executable}", f"torch {info}"]
    versions = {}
    for wheel in wheel_list() + [Wheel(n, "", False) for n in ("numpy", "pandas", "scipy", "sentencepiece",
                                                               "tensorboard", "torchmetrics", "pytorch-lightning")]:
        try:
            dist = metadata.distribution(wheel.name)
            versions[wheel.name] = dist.version
            lines.append(f"{wheel.name} {dist.version} ({dist.locate_file('')})")
        except metadata.PackageNotFoundError:
            lines.append(f"{wheel.name} NOT FOUND")
    info["versions"] = versions
    (out / "environment.txt").write_text("\n".join(lines) + "\n")
    return info


def demo_part(out: Path, work: Path, *, steps: int, accelerator: str, timeout: float, side_by_side: bool) -> dict:
    """The demo base fine-tuned through the entry script in every precision of DEMO_RUNS, side by side (or one
    after the other)."""
    started = time.time()
    log = out / "demo.log"
    result = _run_logged([sys.executable, "-m", "benchmarks.gpu_check", "prepare"], log, timeout)
    if result["status"] != "passed":
        return dict(result, what="building the embedded base")
    runs_dir = work / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)  # the losses are read from the newest run of each name
    processes, status = {}, {}
    for index, name in enumerate(DEMO_RUNS):
        data = runs_dir / f"{name}_data"  # each run's own copy: NeMo builds a line index beside each file
        data.mkdir(parents=True)
        for split in ("train.jsonl", "validation.jsonl"):
            shutil.copy(work / "data" / split, data / split)
        args = demo_command(name, work=work, data=data, steps=steps, accelerator=accelerator)
        run_log = work / f"{name}.log"
        with open(run_log, "w") as handle:  # the child keeps its own copy of the descriptor
            processes[name] = (subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                                env=_env(MASTER_PORT=str(29610 + index)), start_new_session=True),
                               run_log)
        if not side_by_side:
            _finish_demo_run(name, processes[name], status, log, timeout - (time.time() - started))
    for name, (process, run_log) in processes.items():
        if name not in status:
            _finish_demo_run(name, processes[name], status, log, timeout - (time.time() - started))
    scalars = {name: read_scalars(runs_dir / name) for name in DEMO_RUNS}
    for name in DEMO_RUNS:
        scalars[name]["overflows_logged"] = sum("fp16 overflow at optimizer step" in line for line in
                                                processes[name][1].read_text(errors="replace").splitlines())
    comparison = compare_losses(scalars, steps=steps)
    ok = all(code == 0 for code in status.values()) and comparison["all_within"]
    return {"status": "passed" if ok else "failed", "seconds": round(time.time() - started, 1),
            "exit": status, "runs": comparison["runs"], "tolerance": comparison["tolerance"]}


def _finish_demo_run(name: str, started_run: tuple, status: dict, log: Path, timeout: float) -> None:
    """Wait for one demo run (stopped at `timeout`), then append the end of its log to `log`."""
    process, run_log = started_run
    try:
        status[name] = process.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        from nemo_tiedlora.apps.runner import stop_group

        stop_group(process, grace=5)
        status[name] = "timeout"
    with open(log, "a") as joined:
        lines = run_log.read_text(errors="replace").splitlines()
        joined.write(f"\n===== {name}: exit {status[name]} ({len(lines)} lines; the last 150)\n")
        joined.write("\n".join(lines[-150:]) + "\n")


def markdown(summary: dict) -> str:
    """The summary as the Markdown page benchmarks/results/gpu_h200.md."""
    env = summary.get("environment", {})
    parts = summary["parts"]
    lines = ["# GPU check" + (" (CPU rehearsal: no GPU result)" if summary["rehearsal"] else ""), "",
             f"Command: `{summary['command']}`; {summary['seconds']:.0f} s in all.",
             f"Machine: {env.get('nvidia_smi_L') or env.get('device')}; torch {env.get('torch')} (CUDA "
             f"{env.get('cuda')}); carried: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {part['status']}{': ' + part['error'] if 'error' in part else ''} | "
              f"{part.get('seconds', '-')} |" for name, part in parts.items()]
    if "counts" in parts.get("pytest", {}):
        p = parts["pytest"]
        lines += ["", f"pytest tests/gpu: {p['counts']}"] + [f"- {line}" for line in p["failures"] + p["skips"]]
    if "demo" in parts and "runs" in parts["demo"]:
        d = parts["demo"]
        lines += ["", f"Demo base through the entry script (tl6, rank 8; each run vs its fp32 run, tolerance "
                      f"{d['tolerance']}):", "",
                  "| run | steps | first loss | last loss | max rel. diff vs fp32 | fp16 overflows skipped | ok |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in d["runs"].items():
            diff = "-" if row.get("max_rel_diff") is None else f"{row['max_rel_diff']:.2e} (vs {row['reference']})"
            first = "-" if row["first_loss"] is None else f"{row['first_loss']:.4f}"
            last = "-" if row["last_loss"] is None else f"{row['last_loss']:.4f}"
            lines.append(f"| {name} | {row['steps_logged']} | {first} | {last} | {diff} | "
                         f"{row.get('overflows_skipped', '-')} | {'yes' if row['ok'] else 'NO'} |")
    if "report" in parts.get("benchmark", {}):
        from benchmarks.gpu_layer_stack import markdown as bench_markdown

        lines += ["", bench_markdown(parts["benchmark"]["report"]).rstrip()]
    return "\n".join(lines) + "\n"


def _guarded(summary: dict, name: str, work) -> None:
    """Run one part; an exception is its result, never the end of the check (the other parts still run)."""
    began = time.time()
    try:
        summary["parts"][name] = work()
    except Exception as error:  # noqa: BLE001 - reported in the summary, the next part goes on
        summary["parts"][name] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                                  "seconds": round(time.time() - began, 1)}


def _benchmark(out: Path, *, rehearse: bool, timeout: float) -> dict:
    bench = WORK / "bench"  # not under --out: one call brings back at most 8 files
    (bench / "gpu_layer_stack.json").unlink(missing_ok=True)
    args = [sys.executable, "-m", "benchmarks.gpu_layer_stack", "--out", str(bench)]
    result = _run_logged(args + (["--tiny"] if rehearse else []), out / "benchmark.log", timeout)
    report = bench / "gpu_layer_stack.json"
    if report.is_file():
        result["report"] = json.loads(report.read_text())
    return result


def _start_pytest(out: Path) -> tuple[subprocess.Popen, float]:
    args = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
            "--timeout", str(PARTS["pytest"][1])]
    with open(out / "pytest.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
                                start_new_session=True), time.time()


def _finish_pytest(out: Path, process: subprocess.Popen, began: float, timeout: float) -> dict:
    try:
        code = process.wait(timeout=max(1.0, timeout - (time.time() - began)))
        status = "passed" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        from nemo_tiedlora.apps.runner import stop_group

        stop_group(process, grace=5)
        code, status = None, "timeout"
    lines = (out / "pytest.log").read_text(errors="replace").splitlines()
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b",
                                                     lines[-1] if lines else "")}
    return {"status": status, "exit": code, "counts": counts, "seconds": round(time.time() - began, 1),
            "skips": [line for line in lines if line.startswith("SKIPPED ")],
            "failures": [line for line in lines if line.startswith(("FAILED ", "ERROR "))]}


def run(out: Path, *, parts: list[str], rehearse: bool, started: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)

    slower = 4 if rehearse else 1  # the CPU stand-ins on a shared 2-core machine: the limits are the GPU's
    deadline = started + slower * DEADLINE_S

    def left(part: str) -> float:
        return min(slower * PARTS[part][1], deadline - time.time())

    summary: dict = {"command": os.environ.get("GPU_CHECK_COMMAND", " ".join(sys.argv)), "rehearsal": rehearse,
                     "parts": {}}
    if (out / "install.log").is_file():
        summary["parts"]["install"] = {"status": "passed", "seconds": round(time.time() - started, 1)}
    if "environment" in parts:
        def env_part() -> dict:
            summary["environment"] = environment(out)
            return {"status": "passed", "seconds": 0}
        _guarded(summary, "environment", env_part)
    if "benchmark" in parts:  # alone on the GPU: its times are not shared with other work
        _guarded(summary, "benchmark", lambda: _benchmark(out, rehearse=rehearse, timeout=left("benchmark")))
    if rehearse:  # on CPU one process at a time
        if "demo" in parts:
            _guarded(summary, "demo", lambda: demo_part(out, WORK, steps=3, accelerator="cpu", timeout=left("demo"),
                                                        side_by_side=False))
        if "pytest" in parts:
            _guarded(summary, "pytest", lambda: _finish_pytest(out, *_start_pytest(out), left("pytest")))
    else:  # pytest and the demo runs side by side (the GPU has room; only losses and test results are read)
        side = _start_pytest(out) if "pytest" in parts else None
        if "demo" in parts:
            _guarded(summary, "demo", lambda: demo_part(out, WORK, steps=20, accelerator="gpu", timeout=left("demo"),
                                                        side_by_side=True))
        if side is not None:
            _guarded(summary, "pytest", lambda: _finish_pytest(out, *side, left("pytest")))
    summary["seconds"] = round(time.time() - started, 1)
    text = markdown(summary)
    from nemo_tiedlora.core.fileio import atomic_write_bytes

    for folder in [out] if rehearse else [out, RESULTS]:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "gpu_h200.json", json.dumps(summary, indent=2).encode())
        atomic_write_bytes(folder / "gpu_h200.md", text.encode())
    print(text, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="what is carried, its size, the plan and the estimated minutes")
    p.add_argument("--sizes-only", action="store_true", help="only the sizes (and the problems)")
    sub.add_parser("prepare", help="build the embedded demo data and base in .cache/gpu_check")
    sub.add_parser("prune", help="remove wheels that requirements/gpu-wheels.txt does not list")
    r = sub.add_parser("run", help="run the check (after scripts/gpu_check.sh installed the wheels)")
    r.add_argument("--out", required=True, help="folder for the summary and the logs")
    r.add_argument("--parts", default="environment,benchmark,pytest,demo", help="comma-separated subset")
    r.add_argument("--rehearse", action="store_true", help="CPU stand-ins for every part; writes only under --out")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return plan(sizes_only=args.sizes_only)
    if args.command == "prepare":
        print(prepare())
        return 0
    if args.command == "prune":
        prune()
        return 0
    started = float(os.environ.get("GPU_CHECK_STARTED", time.time()))
    summary = run(Path(args.out), parts=args.parts.split(","), rehearse=args.rehearse, started=started)
    return 0 if all(part["status"] == "passed" for part in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
