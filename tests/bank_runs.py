"""Adapter archives and generate-script runs shared by the adapter-bank tests (the generate entry script, the server).

Three real archives of three kinds on the tiny 4-layer GQA base (tl6 rank 4, lora rank 2, vera rank 4: tied and
untied, ranks below the bank's maximum) with random factors, so that each one changes the answers, and each item's
answer from the generate script run with its adapter alone (or none): the reference the bank is held to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "examples" / "nlp" / "language_modeling" / "tuning" / "megatron_gpt_generate.py"
KINDS = {"tl6": ("tl6", 4), "lora": ("lora", 2), "vera": ("vera", 4)}
PLAN = ["tl6", "lora", None, "vera", "tl6", "lora", "vera", None]  # adapter of item i (None: the base alone)


def random_archive(path: Path, preset: str, rank: int, shape: dict, seed: int, scale: float = 0.5) -> Path:
    """An adapter archive with factors ~ N(0, scale) (u and v around 1)."""
    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.formats.adapter_archive import save_archive
    from nemo_tiedlora.formats.adapter_keys import expected_keys, factor_of

    cfg = TiedLoraConfig(rank=rank, preset=preset, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    sizes = {"A": (rank, shape["hidden_size"]), "B": (shape["out_features"], rank), "u": (rank,),
             "v": (shape["out_features"],)}
    tensors = {key: torch.randn(sizes[factor_of(key)], generator=generator) * scale + (factor_of(key) in "uv")
               for key in expected_keys(cfg, shape["num_layers"])}
    return save_archive(path, config=cfg, shape=shape, tensors=tensors)


def generate_script(base: Path, work: Path, items: list[dict], adapters: str, *, tp: int) -> dict[str, str]:
    from tests.script_env import script_env

    work.mkdir(parents=True, exist_ok=True)
    data = work / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    args = [sys.executable, str(GENERATE), f"model.restore_from_path={base}",
            f"model.peft.restore_from_path={adapters}", "trainer.accelerator=cpu", f"trainer.devices={tp}",
            f"model.tensor_model_parallel_size={tp}", f"model.data.test_ds.file_names=[{data}]",
            "model.data.test_ds.names=[items]", "model.data.test_ds.tokens_to_generate=6",
            "model.data.test_ds.max_seq_length=64", "model.data.test_ds.add_eos=False",
            f"model.data.test_ds.global_batch_size={len(items)}", f"model.data.test_ds.micro_batch_size={len(items)}",
            "inference.greedy=True", "model.data.test_ds.write_predictions_to_file=True",
            f"model.data.test_ds.output_file_path_prefix={work / 'preds'}"]
    log = work / "generate.log"
    with open(log, "w") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=script_env(), cwd=REPO, timeout=900)
    assert result.returncode == 0, f"generation failed, see {log}:\n" + "".join(log.read_text().splitlines(True)[-30:])
    rows = [json.loads(line) for f in sorted(work.glob("preds*.jsonl")) for line in f.read_text().splitlines() if line]
    # the tiny base's tokenizer knows only the demo's words: an item is known by its prompt, which starts the input
    # NeMo writes back (the prompts are distinct and none is a prefix of another)
    by_prompt = {}
    for item in items:
        prompt = " ".join(item["input"].split())
        found = [row["pred"] for row in rows if " ".join(row["input"].split()).startswith(prompt)]
        assert len(found) == 1, f"{len(found)} predictions for {prompt!r} in {work}"
        by_prompt[prompt] = found[0]
    return by_prompt


def reference_answers(dist_base) -> tuple[Path, Path, list[dict], dict[str, str]]:
    """(base, the adapters' folder, the items, each item's answer by prompt from a run of the generate script with
    its adapter alone, or with none)."""
    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.nemo.base_archive import base_config

    base, data, work = dist_base
    shape = model_shape(base_config(base))
    folder = work / "bank_adapters"
    folder.mkdir(exist_ok=True)
    for seed, (name, (preset, rank)) in enumerate(KINDS.items()):
        random_archive(folder / f"{name}.nemo", preset, rank, shape, seed=seed + 1)
    prompts = [json.loads(line)["input"] for line in (data / "test.jsonl").read_text().splitlines()[:len(PLAN)]]
    assert len(set(prompts)) == len(prompts)
    items = [{"input": prompt, "output": "park", **({"adapter": name} if name else {})}
             for prompt, name in zip(prompts, PLAN)]
    return base, folder, items, alone_answers(base, work, items, folder)


def alone_answers(base: Path, work: Path, items: list[dict], folder: Path) -> dict[str, str]:
    """Each item's answer (by prompt) from the generate script run once per adapter of `folder` on that adapter's
    items alone, and once on every item without adapters; the adapters must change at least half of the answers
    of their items, or a mix-up could go unseen."""
    answers: dict[str, str] = {}
    for name in sorted({item["adapter"] for item in items if item.get("adapter")}):
        own = [item for item in items if item.get("adapter") == name]
        answers.update(generate_script(base, work / f"alone_{name}", own, str(folder / f"{name}.nemo"), tp=1))
    plain = [{key: value for key, value in item.items() if key != "adapter"} for item in items]
    base_only = generate_script(base, work / "alone_base", plain, "null", tp=1)
    answers.update({label: base_only[label] for label in base_only if label not in answers})
    adapted = [" ".join(item["input"].split()) for item in items if item.get("adapter")]
    changed = [label for label in adapted if answers[label] != base_only[label]]
    assert 2 * len(changed) >= len(adapted), f"the adapters change too few answers ({changed}): a mix-up could go unseen"
    return answers
