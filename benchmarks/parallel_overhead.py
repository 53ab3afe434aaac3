"""The cost of Tied-LoRA's extra communication next to the step time, on this machine (CPU + gloo here; run it on
GPUs with --accelerator gpu): the gradient reductions (TP/PP sums of the replicated adapter tensors, once per
step) at TP2 and PP2, and the activation traffic of the adapter's own collectives (per layer per micro-batch) at
TP2 and TP2+SP.

    python benchmarks/parallel_overhead.py [--steps 12] [--out benchmarks/results]

Each reduction configuration is one run of tests/distributed/driver.py (the NeMo fine-tuning path) on a 4-layer
tiny base. The activation traffic is counted by benchmarks/adapter_traffic.py (one real TP2 QKV linear wrapped by
TiedLoraQKV, megatron's mapping helpers wrapped to count), before (x [tokens, d] entering the TP region) and after
(g = u * (A x) [tokens, r]), next to the count by construction (nemo_tiedlora.apps.bench_memory.adapter_traffic).
Writes parallel_overhead_<device>.json and .md. Timings are measurements, not assertions.
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

    from nemo_tiedlora.apps.demo.base_model import BaseSpec, build_base_model
    from nemo_tiedlora.apps.demo.data import build_all
    from tests.distributed.conftest import DRIVER, torchrun

    traffic = _activation_traffic(Path(tempfile.mkdtemp(prefix="tiedlora_traffic_")), torchrun)

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
               "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
               "backend": "nccl" if device == "gpu" else "gloo",
               "model": "tiny Llama-style GPT, 4 layers, d=128, GQA 4 heads/2 groups, tl6 rank 4, fp32"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"parallel_overhead_{device}.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "activation_traffic": traffic}, indent=2))
    lines = [f"# Tied-LoRA gradient-reduction overhead ({device})", "", f"Machine: {machine}", "",
             "| config | processes | median step (s) | reduction bytes/step | reduction s/step | share of step |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['processes']} | {row['median_step_s']:.4f} | "
                     f"{row['reduction_bytes_per_step']:,.0f} | {row['reduction_s_per_step']:.5f} | "
                     f"{100 * row['reduction_share']:.2f}% |")
    lines += ["", "The reductions at TP2 sum B's and v's gradients over TP (partial by rows); A's and u's only with "
              "sequence parallelism (without it they are complete on every TP rank). PP2 sums A and B over the stages."]
    lines += _traffic_markdown(traffic)
    (Path(args.out) / f"parallel_overhead_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _activation_traffic(work: Path, torchrun) -> list[dict]:
    """The adapter's collectives per layer per micro-batch at TP2 and TP2+SP: measured and by construction."""
    from nemo_tiedlora.apps.bench_memory import adapter_traffic

    script = REPO / "benchmarks" / "adapter_traffic.py"
    rows = []
    for layout, extra in (("TP2", []), ("TP2+SP", ["--sp"])):
        out = work / f"traffic_{len(extra)}.json"
        log = work / f"traffic_{len(extra)}.log"
        if torchrun(script, 2, ["--out", str(out), *extra], log).returncode != 0:
            raise SystemExit(f"adapter traffic ({layout}) failed: see {log}")
        record = json.loads(out.read_text())
        closed = adapter_traffic(tokens=record["tokens"], hidden_size=record["hidden_size"], rank=record["rank"],
                                 tp=record["tp"], sequence_parallel=record["sequence_parallel"], bytes_per_element=4)
        rows.append({"layout": layout, "tokens": record["tokens"], "hidden_size": record["hidden_size"],
                     "rank": record["rank"], "measured_before": record["adapter_before"],
                     "measured_after": record["adapter_after"], "closed_form": closed})
    return rows


def _traffic_markdown(traffic: list[dict]) -> list[str]:
    lines = ["", "## Adapter activation traffic per layer per micro-batch (fp32)", "",
             "Counted at megatron's mapping helpers in a real gloo run (one TP2 QKV linear wrapped by TiedLoraQKV; "
             "the base's own collectives subtracted) and by construction from the shapes. Before: x [tokens, d] "
             "entered the TP region; after: g = u * (A x) [tokens, r].", "",
             "| layout | tokens | d | r | collective | elements before (measured / by construction) | "
             "elements after (measured / by construction) | bytes before | bytes after |", "|---" * 9 + "|"]
    for row in traffic:
        closed_before, closed_after = row["closed_form"]["before"], row["closed_form"]["after"]
        for before, after, cb, ca in zip(row["measured_before"], row["measured_after"], closed_before, closed_after):
            lines.append(f"| {row['layout']} | {row['tokens']} | {row['hidden_size']} | {row['rank']} | "
                         f"{before['collective']} ({cb['pass']}) | {before['elements']:,} / {cb['elements']:,} | "
                         f"{after['elements']:,} / {ca['elements']:,} | {before['bytes']:,} | {after['bytes']:,} |")
    return lines


if __name__ == "__main__":
    main()
