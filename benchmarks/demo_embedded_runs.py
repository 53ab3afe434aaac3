"""The embedded demo's recipe measured: every seed x thread count x update path, on CPU.

    python benchmarks/demo_embedded_runs.py [--work .cache/demo] [--seeds 1234 1 2] [--out benchmarks/results]

On the demo's cached base and data (built first if missing), with the demo's default settings:

- **facts**: the base's greedy answer to every animal's home in the corpus's own phrasing ("the fox lives in the")
  and in the task's new format without an adapter (the base score);
- **runs**: the default preset (tl6, rank 8) fine-tuned and evaluated through the entry scripts for each seed, with
  one thread (``OMP_NUM_THREADS=1``) and with torch's default thread count, with the fused update and with the
  reference composition (``--update reference``: ``nemo_tiedlora.apps.demo.reference_update``); each run's per-step
  training losses (NeMo's ``reduced_train_loss``) and validation loss;
- **lora**: LoRA at the same rank, steps and rate for each seed (default threads, fused update): the ceiling.

Writes ``demo_embedded_cpu.json`` and ``demo_embedded_cpu.md`` into ``--out`` (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nemo_tiedlora.apps.demo.data import ANIMALS, HOMES, build_all, score  # noqa: E402
from nemo_tiedlora.apps.demo.embedded import embedded_base  # noqa: E402
from nemo_tiedlora.apps.demo.run import DemoSettings, evaluate, finetune  # noqa: E402
from nemo_tiedlora.core.fileio import atomic_write_bytes  # noqa: E402

THREADS = ("1", "default")
UPDATES = ("fused", "reference")


@dataclasses.dataclass(frozen=True)
class _Probe:
    """A DemoData stand-in whose test split is the fact probe (evaluate() reads only `.test`)."""

    test: Path


def _threads_env(threads: str) -> None:
    """The children's thread count: OMP_NUM_THREADS=1, or unset (torch's default: the machine's cores)."""
    if threads == "default":
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = threads


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    """Per-step ``reduced_train_loss`` and the ``val_loss`` values from a run's newest TensorBoard events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not events:
        return {"train_loss": [], "val_loss": []}
    accumulator = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    return {key: [round(float(e.value), 4) for e in accumulator.Scalars(tag)] if tag in tags else []
            for key, tag in (("train_loss", "reduced_train_loss"), ("val_loss", "val_loss"))}


def fact_probe(*, base: Path, work: Path, settings: DemoSettings) -> dict:
    """The base's greedy first word after "the <animal> lives in the" (the corpus's phrasing): the fraction that is
    the animal's home."""
    probe = work / "probe" / "facts.jsonl"
    probe.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(probe, "".join(json.dumps({"input": f"the {animal} lives in the", "output": HOMES[animal]})
                                      + "\n" for animal in ANIMALS).encode())
    return {"corpus_phrasing_exact_match": evaluate(base=base, adapter=None, data=_Probe(probe), work=probe.parent,
                                                    settings=settings, label="facts"),
            "prompts": len(ANIMALS)}


def one_run(*, base: Path, data, work: Path, settings: DemoSettings, threads: str) -> dict:
    """Fine-tune and evaluate one configuration in its own folder; its scores, losses and seconds."""
    _threads_env(threads)
    folder = work / f"{settings.preset}_seed{settings.seed}_threads{threads}_{settings.update}"
    folder.mkdir(parents=True, exist_ok=True)
    started, cpu_start = time.time(), _children_cpu()
    adapter = finetune(base=base, data=data, work=folder, settings=settings)
    trained, cpu_trained = time.time(), _children_cpu()
    exact = evaluate(base=base, adapter=adapter, data=data, work=folder, settings=settings, label=settings.preset)
    cpu_done = _children_cpu()
    losses = _scalars(folder / "runs")
    return {"preset": settings.preset, "seed": settings.seed, "threads": threads, "update": settings.update,
            "adapted_exact_match": exact,
            "final_train_loss": losses["train_loss"][-1] if losses["train_loss"] else None,
            "val_loss": losses["val_loss"], "train_loss": losses["train_loss"],
            "finetune_seconds": round(trained - started, 1), "evaluate_seconds": round(time.time() - trained, 1),
            "finetune_cpu_seconds": round(cpu_trained - cpu_start, 1),
            "evaluate_cpu_seconds": round(cpu_done - cpu_trained, 1)}


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: a figure the machine's other load inflates
    far less than wall time (a busy machine still adds contention)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _markdown(report: dict) -> str:
    lines = [
        "# Embedded demo on CPU: every seed x thread count x update path",
        "",
        f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['platform']}), shared with other jobs: "
        "the seconds are wall times under that load, not the machine's own speed.",
        f"Recipe: {report['settings']}.",
        f"Base: final pre-training loss {report['base']['final_loss']:.3f}, built in {report['base']['seconds']} s; "
        f"greedy exact match on the task without an adapter {100 * report['base_exact_match']:.1f}%; "
        f"the facts in the corpus's phrasing (\"the fox lives in the\") "
        f"{100 * report['facts']['corpus_phrasing_exact_match']:.1f}% of {report['facts']['prompts']}.",
        "",
        "| preset | seed | threads | update | exact match | final train loss | val loss | fine-tune s (CPU s) "
        "| evaluate s (CPU s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["runs"]:
        val = row["val_loss"][-1] if row["val_loss"] else float("nan")
        lines.append(f"| {row['preset']} | {row['seed']} | {row['threads']} | {row['update']} | "
                     f"{100 * row['adapted_exact_match']:.1f}% | {row['final_train_loss']} | {val:.4f} | "
                     f"{row['finetune_seconds']} ({row['finetune_cpu_seconds']}) | "
                     f"{row['evaluate_seconds']} ({row['evaluate_cpu_seconds']}) |")
    tl = [r["adapted_exact_match"] for r in report["runs"] if r["preset"] != "lora"]
    lines += ["", f"tl6 range over every run: {100 * min(tl):.1f}% to {100 * max(tl):.1f}%.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[DemoSettings().seed, 1, 2])
    parser.add_argument("--threads", nargs="+", default=list(THREADS), choices=THREADS)
    parser.add_argument("--updates", nargs="+", default=list(UPDATES), choices=UPDATES)
    parser.add_argument("--no-lora", dest="lora", action="store_false")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = build_all(work / "data")
    base = embedded_base(work, data, echo=True)
    base_report = json.loads(base.with_suffix(".json").read_text())
    settings = DemoSettings()
    runs_dir = work / "measure"
    runs_dir.mkdir(exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("compare", "update", "seed")},
        "base": {"final_loss": base_report["final_loss"], "seconds": base_report["seconds"],
                 "spec": base_report["spec"]},
        "facts": fact_probe(base=base, work=runs_dir, settings=settings),
        "base_exact_match": evaluate(base=base, adapter=None, data=data, work=runs_dir, settings=settings,
                                     label="base"),
        "runs": [],
    }
    grid = [dataclasses.replace(settings, seed=seed, update=update) for seed in args.seeds for update in args.updates]
    for threads in args.threads:
        for run in grid:
            report["runs"].append(one_run(base=base, data=data, work=runs_dir, settings=run, threads=threads))
            print(json.dumps({k: v for k, v in report["runs"][-1].items() if k not in ("train_loss",)}), flush=True)
    if args.lora:
        for seed in args.seeds:
            run = dataclasses.replace(settings, preset="lora", seed=seed)
            report["runs"].append(one_run(base=base, data=data, work=runs_dir, settings=run, threads="default"))
            print(json.dumps({k: v for k, v in report["runs"][-1].items() if k not in ("train_loss",)}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "demo_embedded_cpu.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(args.out / "demo_embedded_cpu.md", _markdown(report).encode())
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
