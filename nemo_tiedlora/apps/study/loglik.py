"""Multiple-choice scoring by log-likelihood (HellaSwag, the paper's protocol) with a base .nemo + adapter .nemo.

    python -m nemo_tiedlora.apps.study.loglik --base base.nemo [--adapter adapter.nemo] --task hellaswag \
        --data DATASET_DIR --split test --out scores.json [--batch-size 16 --max-seq-length 2048]

NeMo generation returns text, not per-ending probabilities, so the study scores multiple choice here: the model is
loaded exactly as NeMo's megatron_gpt_generate.py loads it (`nemo_tiedlora.nemo.finetune.load_for_inference`), each
(context, ending) pair is tokenized by NeMo's own SFT dataset with the tuning YAML's prompt template (the tokens the
adapter was trained to produce after the prompt; no EOS), and an ending's score is the summed log-probability of its
tokens given the prompt. The task then picks the best ending per item (`HellaSwagTask.score_loglik`: raw and
per-character accuracy). Runs on CPU or one GPU (TP=PP=1). Writes the task's scores as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_tiedlora.core.fileio import atomic_write_bytes

def ending_loglikelihoods(model: torch.nn.Module, items: Sequence[tuple[Sequence[int], int]], *,
                          batch_size: int = 16, pad_id: int = 0) -> list[float]:
    """Summed log-probability of tokens[start:] given tokens[:start], for each (tokens, start) in `items`.

    `model(input_ids=, position_ids=, attention_mask=None)` returns logits [batch, seq, vocab] (megatron-core's
    GPTModel, causal). Sequences are right-padded in batches: a causal model's logits at a position do not depend on
    what follows it, so padding changes nothing that is read.
    """
    scores: list[float] = []
    device = next(model.parameters()).device
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        length = max(len(tokens) for tokens, _ in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        for row, (tokens, start) in enumerate(batch):
            if not 0 < start < len(tokens):
                raise ValueError(f"item {first + row}: the ending starts at token {start} of {len(tokens)}: it needs a "
                                 "non-empty context and a non-empty ending")
            ids[row, :len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        ids = ids.to(device)
        positions = torch.arange(length, device=device).unsqueeze(0).expand(len(batch), -1)
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, attention_mask=None)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (tokens, start) in enumerate(batch):
            targets = ids[row, start:len(tokens)]
            # the token at position p is predicted by the logits at position p - 1
            picked = logprobs[row, start - 1:len(tokens) - 1].gather(-1, targets.unsqueeze(-1))
            scores.append(float(picked.sum()))
    return scores


def tokenize_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], data_cfg: Any,
                   workdir: Path) -> list[tuple[list[int], int]]:
    """(tokens, ending start) of each (context, ending), by NeMo's GPTSFTDataset with `data_cfg`'s template."""
    from nemo.collections.nlp.data.language_modeling.megatron.gpt_sft_dataset import GPTSFTDataset

    file = workdir / "pairs.jsonl"
    file.write_text("".join(json.dumps({"input": c, "output": e}) + "\n" for c, e in pairs))
    dataset = GPTSFTDataset(
        file_path=str(file), tokenizer=tokenizer, max_seq_length=int(data_cfg.max_seq_length), min_seq_length=1,
        add_bos=bool(data_cfg.get("add_bos", False)), add_eos=False, add_sep=bool(data_cfg.get("add_sep", False)),
        label_key="output", truncation_field="input",
        prompt_template=data_cfg.get("prompt_template", "{input} {output}"),
        memmap_workers=1, index_mapping_dir=str(workdir), truncation_method=data_cfg.get("truncation_method", "right"),
    )
    items = []
    for index in range(len(pairs)):
        example = dataset[index]
        items.append((list(example["input_ids"]), int(example["answer_start_idx"])))
    return items


def score(*, base: Path, adapter: Optional[Path], task: str, data: Path, split: str = "test", batch_size: int = 16,
          max_seq_length: int = 2048, accelerator: str = "cpu") -> dict[str, float]:
    """The task's log-likelihood scores of base (+ adapter) on `split` of the dataset in `data`."""
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import load_for_inference, tuning_config
    from nemo_tiedlora.apps.study.tasks import get_task

    adapter_task = get_task(task)
    if not hasattr(adapter_task, "score_loglik"):
        raise ValueError(f"task {task!r} is not scored by log-likelihood (only multiple choice is: hellaswag)")
    examples = adapter_task.load(Path(data), split)
    pairs = [(context, ending) for example in examples
             for context, endings in [adapter_task.choices(example)] for ending in endings]
    cfg = tuning_config("generate")
    with tempfile.TemporaryDirectory(prefix="tiedlora-loglik-") as tmp:
        with open_dict(cfg):
            cfg.trainer.update(accelerator=accelerator, devices=1, num_nodes=1, logger=False)
            cfg.model.restore_from_path = str(base)
            cfg.model.peft.restore_from_path = str(adapter) if adapter else None
            cfg.model.data.test_ds.file_names = [str(Path(tmp) / "pairs.jsonl")]
            cfg.model.data.test_ds.names = ["pairs"]
            cfg.model.data.test_ds.max_seq_length = max_seq_length
        _, model = load_for_inference(cfg)
        items = tokenize_pairs(model.tokenizer, pairs, cfg.model.data.test_ds, Path(tmp))
    module = model.model[0] if isinstance(model.model, list) else model.model
    module.eval()
    pad = model.tokenizer.eos_id if getattr(model.tokenizer, "eos_id", None) is not None else 0
    values = ending_loglikelihoods(module, items, batch_size=batch_size, pad_id=pad)
    table = dict(zip(pairs, values))
    return adapter_task.score_loglik(examples, lambda context, ending: table[(context, ending)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_tiedlora.apps.study.loglik",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base .nemo")
    parser.add_argument("--adapter", help="adapter .nemo (none: the base alone)")
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--data", required=True, help="folder with the dataset's own files")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="JSON file for the scores")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args(argv)
    scores = score(base=Path(args.base), adapter=Path(args.adapter) if args.adapter else None, task=args.task,
                   data=Path(args.data), split=args.split, batch_size=args.batch_size,
                   max_seq_length=args.max_seq_length, accelerator=args.accelerator)
    atomic_write_bytes(Path(args.out), json.dumps(scores, indent=2).encode())
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
