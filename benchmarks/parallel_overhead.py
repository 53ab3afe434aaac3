"""The cost of Tied-LoRA's extra gradient reductions (TP/PP sums of the replicated adapter tensors) next to the
step time, at TP2 and PP2, on this machine (CPU + gloo here; run it on GPUs with --accelerator gpu).

    python benchmarks/parallel_overhead.py [--steps 12] [--out benchmarks/results]

Each configuration is one run of tests/distributed/driver.py (the NeMo fine-tuning path) on a 4-layer tiny base.
Writes parallel_overhead_<device>.json and .md: median step time, the reductions' bytes and seconds per step on
rank 0, and their share of the step. Timings are measurements, not assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from nemo_tiedlora.demo.base_model import BaseSpec, build_base_model
    from nemo_tiedlora.demo.data import build_all
    from tests.distributed.conftest import DRIVER, torchrun

    work = Path(tempfile.mkdtemp(prefix="tiedlora_parallel_bench_"))
    data = build_all(work / "data")
    spec = BaseSpec(num_layers=4, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4, num_query_groups=2,
                    steps=10, batch_size=8)
    base, _ = build_base_model(work / "base.nemo", corpus=data.corpus, tokenizer_model=data.tokenizer_model, spec=spec)
    runs = {"tp1": (1, []), "tp2": (2, ["--tp", "2"]), "pp2": (2, ["--pp", "2"])}
    rows = []
    for name, (nproc, extra) in tqdm(runs.items(), desc="parallel overhead runs"):
        out = work / f"{name}.pt"
        result = torchrun(DRIVER, nproc, ["--base", str(base), "--data", str(work / "data"), "--out", str(out),
                                          "--steps", str(args.steps), "--accelerator", args.accelerator, *extra],
                          work / f"{name}.log")
        if result.returncode != 0:
            raise SystemExit(f"{name} failed: see {work / (name + '.log')}")
        record = torch.load(out)
        steps = record["step_seconds"][2:]  # skip warm-up steps
        reduction = record["reduction"]
        per_step = {k: reduction[k] / args.steps for k in ("bytes", "seconds", "calls")}
        step = statistics.median(steps)
        rows.append({"config": name, "processes": nproc, "median_step_s": step,
                     "reduction_bytes_per_step": per_step["bytes"], "reduction_s_per_step": per_step["seconds"],
                     "reduction_calls_per_step": per_step["calls"], "reduction_share": per_step["seconds"] / step})
    device = "gpu" if args.accelerator == "gpu" else "cpu"
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": __import__("os").cpu_count(), "torch": torch.__version__, "backend": "nccl" if device == "gpu" else "gloo",
               "model": "tiny Llama-style GPT, 4 layers, d=128, GQA 4 heads/2 groups, tl6 rank 4, fp32"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"parallel_overhead_{device}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"# Tied-LoRA gradient-reduction overhead ({device})", "", f"Machine: {machine}", "",
             "| config | processes | median step (s) | reduction bytes/step | reduction s/step | share of step |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['processes']} | {row['median_step_s']:.4f} | "
                     f"{row['reduction_bytes_per_step']:,.0f} | {row['reduction_s_per_step']:.5f} | "
                     f"{100 * row['reduction_share']:.2f}% |")
    (Path(args.out) / f"parallel_overhead_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
