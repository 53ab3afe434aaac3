"""Serving many adapters, measured on CPU at SmolLM2-135M's shape, side by side in one run.

    python benchmarks/serve_bench.py [--work .cache/serve_bench] [--out benchmarks/results] [--adapters 10000]
                                     [--reps 3] [--new-tokens 16] [--no-vllm]

On the SmolLM2-135M-Instruct base imported from its GGUF (``demo --base smollm2``'s cached import), with tl6 rank-8
adapters of random factors (the cost of an adapter does not depend on its values):

- **memory**: bytes resident per adapter in the bank (tl6 r8, and plain LoRA r8 measured on 100), the bank of all
  ``--adapters`` (10,000) against the same adapters as plain LoRA, and the size of one adapter exported as PEFT LoRA
  (what vLLM loads per adapter); **startup**: loading 1,000 and 10,000 archives into a bank;
- **throughput** (generated tokens/s, ``--reps`` rounds, the modes interleaved in each): a batch of 32 requests (32
  distinct chat prompts, greedy, up to ``--new-tokens`` new tokens each) through the bank with 32 distinct adapters,
  with one adapter for all, and on the base alone; the same 32 adapters exported as plain LoRA through HF peft's
  mixed-batch generation (``adapter_names=``); and (unless ``--no-vllm``) vLLM serving them as plain LoRA
  (``--max-loras 32``) in its own environment, asked for the same token ids at once;
- **latency**: time to first token and per-token latency of streamed requests at 1, 8 and 32 concurrent clients,
  our server (``python -m nemo_tiedlora serve``) and vLLM's, one after the other; each server's resident memory.

Writes ``serve_cpu.json`` and ``serve_cpu.md`` into ``--out`` (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from nemo_tiedlora.core.fileio import atomic_write_bytes  # noqa: E402

QUESTIONS = [f"{verb} {topic} in one sentence." for verb in ("Describe", "Explain", "Define", "Summarize")
             for topic in ("the sea", "a volcano", "photosynthesis", "a library", "the moon", "a bridge", "rain",
                           "a violin")]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MB)."""
    total = 0
    for task in [pid, *_children(pid)]:
        try:
            total += int(Path(f"/proc/{task}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e6


def _children(pid: int) -> list[int]:
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in path.read_text().split():
            found += [int(child), *_children(int(child))]
    return found


def make_adapters(folder: Path, count: int, shape: dict, preset: str = "tl6") -> list[Path]:
    from tests.bank_runs import random_archive

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{preset}_{k:05d}.nemo" for k in range(count)]
    for k, path in enumerate(paths):
        if not path.exists():
            random_archive(path, preset, 8, shape, seed=k)
    return paths


def part_memory(work: Path, base: Path, shape: dict, count: int) -> dict:
    from nemo_tiedlora.formats.bank_entry import adapter_files, load_bank
    from nemo_tiedlora.tools.export import export_hf_peft

    tied = make_adapters(work / "tl6", count, shape)
    lora = make_adapters(work / "lora", 100, shape, preset="lora")
    out: dict = {"startup_s": {}}
    for n in sorted({min(1000, count), count}):
        started, before = time.perf_counter(), rss_mb(os.getpid())
        bank = load_bank(adapter_files(tied[:n]), shape, max_rank=8)
        out["startup_s"][n] = round(time.perf_counter() - started, 2)
        out[f"rss_growth_mb_{n}"] = round(rss_mb(os.getpid()) - before, 1)
        out[f"tl6_bank_bytes_{n}"] = bank.adapter_bytes()
        out["tl6_bytes_per_adapter"] = bank.adapter_bytes(bank.names[0])
        del bank
    lora_bank = load_bank(adapter_files(lora), shape, max_rank=8)
    out["lora_bytes_per_adapter"] = lora_bank.adapter_bytes(lora_bank.names[0])
    out[f"lora_bytes_{count}"] = out["lora_bytes_per_adapter"] * count
    peft = export_hf_peft(adapter=tied[0], base=base, out=work / "peft_one", overwrite=True)["adapter"]
    out["peft_export_bytes_per_adapter"] = (Path(peft) / "adapter_model.safetensors").stat().st_size
    return out


def prompts_ids(engine) -> list[list[int]]:
    return [engine.encode(engine.chat_prompt([{"role": "user", "content": q}])) for q in QUESTIONS]


def ours(engine, ids: list[list[int]], names: list, new: int) -> float:
    from nemo_tiedlora.nemo.bank_generate import GenerationRequest, Sampling

    requests = [GenerationRequest(prompt_ids=p, adapter=a, max_tokens=new) for p, a in zip(ids, names)]
    started = time.perf_counter()
    engine.generate(requests, Sampling())
    return sum(len(r.tokens) for r in requests) / (time.perf_counter() - started)


class HfPeft:
    """transformers + peft with the 32 adapters exported as plain LoRA, one mixed batch via ``adapter_names=``."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        names = list(adapters)
        self.model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.names = names

    def run(self, ids: list[list[int]], new: int, pad: int) -> float:
        width = max(map(len, ids))
        tokens = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=tokens, attention_mask=mask, adapter_names=self.names,
                                      max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
        return (out.shape[1] - width) * len(ids) / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HttpServer:
    def __init__(self, command: list[str], port: int, log: Path, env: dict) -> None:
        from tests.http_health import wait_until_healthy

        self.port, self.log = port, log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wait_until_healthy(self.process, f"http://127.0.0.1:{port}/health", log, seconds=600)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def batch_over_http(port: int, prompts: list[str], names: list[str], new: int) -> float:
    """All requests at once (greedy; vLLM also told min_tokens, which ours ignores: it stops at end of sequence)."""
    import httpx

    def ask(k: int) -> int:
        body = {"model": names[k], "prompt": prompts[k], "max_tokens": new, "min_tokens": new, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600)
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(ask, range(len(prompts))))
    return tokens / (time.perf_counter() - started)


def streamed_latency(port: int, prompts: list[str], names: list[str], clients: int, new: int) -> dict:
    """Median time to first token and per-token latency (gap between streamed chunks) over `clients` at once."""
    import httpx

    def one(k: int) -> tuple[float, float]:
        body = {"model": names[k], "prompt": prompts[k], "max_tokens": new, "temperature": 0, "stream": True}
        started, stamps = time.perf_counter(), []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return stamps[0] - started, (statistics.mean(gaps) if gaps else float("nan"))

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return {"ttft_s": round(statistics.median(r[0] for r in results), 3),
            "per_token_s": round(statistics.median(r[1] for r in results), 4)}


def start_ours(base: Path, folder: Path, work: Path) -> HttpServer:
    from tests.script_env import script_env

    port = free_port()
    return HttpServer([sys.executable, "-m", "nemo_tiedlora", "serve", "--base", str(base), "--adapters", str(folder),
                       "--port", str(port), "--max-batch-size", "32", "--max-wait-ms", "20"], port,
                      work / "ours.log", script_env())


def start_vllm(hf_base: Path, peft: dict[str, Path], work: Path) -> HttpServer:
    from tests.vllm_env import vllm_venv_path

    port = free_port()
    modules = [f"{name}={path}" for name, path in peft.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="2", PATH=f"{vllm_venv_path() / 'bin'}:{os.environ['PATH']}")
    return HttpServer([str(vllm_venv_path() / "bin" / "vllm"), "serve", str(hf_base), "--enable-lora", "--lora-modules",
                       *modules, "--max-loras", str(len(peft)), "--max-lora-rank", "8", "--dtype", "float32",
                       "--max-model-len", "512", "--gpu-memory-utilization", "0.3", "--host", "127.0.0.1", "--port",
                       str(port)], port,
                      work / "vllm.log", env)


def part_throughput(engine, hf: HfPeft, vllm: HttpServer | None, reps: int, new: int, pad: int) -> dict:
    ids = prompts_ids(engine)
    texts = [engine.decode(p) for p in ids]
    names = list(engine.bank.names)[:len(ids)]
    modes = {
        "ours_32_adapters": lambda: ours(engine, ids, names, new),
        "ours_one_adapter": lambda: ours(engine, ids, [names[0]] * len(ids), new),
        "ours_base": lambda: ours(engine, ids, [None] * len(ids), new),
        "hf_peft_32_adapters": lambda: hf.run(ids, new, pad),
    }
    if vllm is not None:
        modes["vllm_32_adapters"] = lambda: batch_over_http(vllm.port, texts, hf.names, new)
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(reps):
        for mode, run in modes.items():
            rates[mode].append(round(run(), 2))
        print(f"round {rep + 1}/{reps}: " + ", ".join(f"{m} {r[-1]}" for m, r in rates.items()), flush=True)
    return rates


def part_latency(server: HttpServer, texts: list[str], names: list[str], new: int, reps: int) -> dict:
    out = {}
    for clients in (1, 8, 32):
        runs = [streamed_latency(server.port, texts, names, clients, new) for _ in range(reps)]
        out[clients] = {key: round(statistics.median(run[key] for run in runs), 4) for key in runs[0]}
    out["rss_mb"] = round(rss_mb(server.process.pid), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "serve_bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--adapters", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    return run(args)


def run(args: argparse.Namespace) -> int:
    from nemo_tiedlora.apps.demo.smollm2 import imported_base
    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.formats.bank_entry import adapter_files
    from nemo_tiedlora.nemo.bank_generate import BankEngine
    from nemo_tiedlora.nemo.base_archive import base_config
    from nemo_tiedlora.tools.export import export_hf_peft

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = imported_base(REPO / ".cache" / "smollm2")
    shape = model_shape(base_config(base))
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                "threads": torch.get_num_threads()},
                    "settings": {"adapters": args.adapters, "reps": args.reps, "batch": len(QUESTIONS),
                                 "new_tokens": args.new_tokens, "preset": "tl6", "rank": 8}}
    print("memory and startup ...", flush=True)
    result["memory"] = part_memory(work, base, shape, args.adapters)
    folder32 = work / "tl6_32"
    folder32.mkdir(exist_ok=True)
    for path in sorted((work / "tl6").glob("*.nemo"))[:len(QUESTIONS)]:
        if not (folder32 / path.name).exists():
            os.link(path, folder32 / path.name)
    peft = {}
    for k, path in enumerate(sorted(folder32.glob("*.nemo"))):
        name = path.name[:-5]
        written = export_hf_peft(adapter=path, base=base, out=work / "peft" / name, overwrite=True,
                                 base_out=work / "hf_base" if k == 0 else None)
        peft[name] = Path(written["adapter"])
    print("throughput ...", flush=True)
    engine = BankEngine.restore(base, adapter_files(folder32))
    hf = HfPeft(work / "hf_base", peft)
    vllm = None if args.no_vllm else start_vllm(work / "hf_base", peft, work)
    try:
        result["throughput_tokens_per_s"] = part_throughput(engine, hf, vllm, args.reps, args.new_tokens,
                                                            engine.eos_id)
        texts = [engine.decode(p) for p in prompts_ids(engine)]
        names = list(engine.bank.names)
        del engine, hf
        print("latency ...", flush=True)
        if vllm is not None:
            result["latency_vllm"] = part_latency(vllm, texts, names, args.new_tokens, 2)
            vllm.stop()
            vllm = None
        server = start_ours(base, folder32, work)
        try:
            result["latency_ours"] = part_latency(server, texts, names, args.new_tokens, 2)
        finally:
            server.stop()
    finally:
        if vllm is not None:
            vllm.stop()
    write(result, args.out)
    return 0


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "serve_cpu.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out / "serve_cpu.md", report(result).encode())
    print(report(result))


def report(result: dict) -> str:
    mem, rates = result["memory"], result["throughput_tokens_per_s"]
    med = {mode: statistics.median(values) for mode, values in rates.items()}
    n = result["settings"]["adapters"]
    lines = ["# Serving many adapters on CPU (SmolLM2-135M, tl6 rank 8)", "",
             f"Machine: {result['machine']['cpus']} CPUs, torch {result['machine']['torch']}. Written by "
             "`python benchmarks/serve_bench.py`; medians over the interleaved rounds.", "",
             "## Memory and startup", "",
             f"- one tl6 r8 adapter resident: {mem['tl6_bytes_per_adapter']:,} bytes; as plain LoRA r8 on the fused "
             f"QKV: {mem['lora_bytes_per_adapter']:,} bytes; exported as PEFT LoRA (what vLLM loads): "
             f"{mem['peft_export_bytes_per_adapter']:,} bytes",
             f"- {n:,} adapters: {mem[f'tl6_bank_bytes_{n}'] / 1e9:.2f} GB tied against "
             f"{mem[f'lora_bytes_{n}'] / 1e9:.2f} GB as plain LoRA "
             f"({mem[f'lora_bytes_{n}'] / mem[f'tl6_bank_bytes_{n}']:.1f}x)",
             "- startup (reading, checking and stacking the archives): " + ", ".join(
                 f"{k:,} adapters {v} s" for k, v in mem["startup_s"].items()), "",
             "## Throughput (generated tokens/s, a batch of 32 requests)", "",
             "| mode | tokens/s (median) | rounds | ratio to ours, 32 adapters |", "|---|---|---|---|"]
    for mode, value in med.items():
        lines.append(f"| {mode} | {value:.1f} | {rates[mode]} | {value / med['ours_32_adapters']:.2f} |")
    lines += ["", f"Ours with 32 distinct adapters: {med['ours_32_adapters'] / med['ours_one_adapter']:.2f}x one "
              f"adapter (target >= 0.9), {med['ours_32_adapters'] / med['ours_base']:.2f}x the base alone (target >= "
              f"0.8), {med['ours_32_adapters'] / med['hf_peft_32_adapters']:.2f}x HF peft's mixed batch (target >= 2)"
              + (f", {med['ours_32_adapters'] / med['vllm_32_adapters']:.2f}x vLLM." if "vllm_32_adapters" in med
                 else "."), "",
              "Rates count the tokens each system generated: ours stops a request at its end-of-sequence token, HF "
              "peft and vLLM were told to generate exactly the budget (min tokens).", "",
              "## Latency (streamed, median over requests)", "",
              "vLLM's resident memory includes what it reserves up front on CPU (KV cache "
              "`VLLM_CPU_KVCACHE_SPACE=2` GiB, `--gpu-memory-utilization 0.3`); ours is the server process with the "
              "base and 32 adapters.", "",
              "| server | clients | time to first token (s) | per-token latency (s) | resident memory (MB) |",
              "|---|---|---|---|---|"]
    for server in ("latency_ours", "latency_vllm"):
        for clients in (1, 8, 32):
            if server in result:
                row = result[server][clients]
                lines.append(f"| {server[8:]} | {clients} | {row['ttft_s']} | {row['per_token_s']} | "
                             f"{result[server]['rss_mb']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
