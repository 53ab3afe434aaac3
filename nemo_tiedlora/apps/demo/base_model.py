"""The embedded default base model: a tiny Llama-style NeMo GPT (RMSNorm, SwiGLU, RoPE, GQA, no biases),
briefly pre-trained on the generated corpus with the real megatron-core layers, saved as a real `.nemo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from nemo_tiedlora.nemo.cpu_restore import cpu_trainer
from nemo_tiedlora.nemo.gpt_config import llama_gpt_config

logger = logging.getLogger("nemo_tiedlora")


@dataclass(frozen=True)
class BaseSpec:
    """Shape and pre-training budget of the tiny base model."""

    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 344
    num_attention_heads: int = 4
    num_query_groups: int = 2
    seq_length: int = 64
    steps: int = 2000  # the facts (each animal's home) are recalled from about step 1500 on
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 1234


def base_model_config(tokenizer_model: Path, spec: BaseSpec) -> DictConfig:
    """A NeMo 1.x MegatronGPTModel config for a Llama-style model (local layer spec, fp32, CPU-initialised)."""
    tokenizer = {"library": "sentencepiece", "type": None, "model": str(tokenizer_model), "vocab_file": None,
                 "merge_file": None, "delimiter": None, "sentencepiece_legacy": False}
    return llama_gpt_config(tokenizer=tokenizer, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                            ffn_hidden_size=spec.ffn_hidden_size, num_attention_heads=spec.num_attention_heads,
                            num_query_groups=spec.num_query_groups, seq_length=spec.seq_length,
                            batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed)


def _token_windows(corpus: Path, tokenizer_model: Path, seq_length: int) -> torch.Tensor:
    """The corpus as one token stream (eos after every line), cut into [n, seq_length + 1] windows."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    stream: list[int] = []
    for line in corpus.read_text().splitlines():
        stream.extend(processor.encode(line))
        stream.append(processor.eos_id())
    width = seq_length + 1
    usable = len(stream) // width * width
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, width)


def _fingerprint(spec: BaseSpec, corpus: Path, tokenizer_model: Path) -> str:
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for path in (corpus, tokenizer_model):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_base_model(
    out_path: Path, *, corpus: Path, tokenizer_model: Path, spec: BaseSpec = BaseSpec()
) -> tuple[Path, dict]:
    """Pre-train the tiny base on the corpus and save it as a .nemo (cached by a fingerprint of its inputs).

    Returns the path and a report (final loss, parameter count, seconds). The .nemo is written to a temporary
    name and renamed, so an interrupted build never leaves a half-written archive under the final name.
    """
    import time

    from tqdm import tqdm

    out_path = Path(out_path)
    manifest = out_path.with_suffix(".json")
    fingerprint = _fingerprint(spec, corpus, tokenizer_model)
    if out_path.exists() and manifest.exists():
        report = json.loads(manifest.read_text())
        if report.get("fingerprint") == fingerprint:
            return out_path, report

    from nemo_tiedlora.nemo import setup

    setup()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    started = time.time()
    torch.manual_seed(spec.seed)
    model = MegatronGPTModel(base_model_config(tokenizer_model, spec), trainer=cpu_trainer())
    gpt = model.model
    windows = _token_windows(corpus, tokenizer_model, spec.seq_length)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(0.1, 3 / spec.steps)  # OneCycleLR needs at least two warm-up steps
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=spec.steps, pct_start=warmup)
    positions = torch.arange(spec.seq_length).unsqueeze(0).expand(spec.batch_size, -1)
    gpt.train()
    loss_value = float("nan")
    progress = tqdm(range(spec.steps), desc="pre-train tiny base", unit="step")
    for _ in progress:
        batch = windows[torch.randint(len(windows), (spec.batch_size,), generator=generator)]
        tokens, labels = batch[:, :-1], batch[:, 1:]  # [b, s]
        loss = gpt(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        progress.set_postfix(loss=f"{loss_value:.3f}")
    gpt.eval()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial.nemo")
    model.save_to(str(partial))
    os.replace(partial, out_path)
    report = {
        "fingerprint": fingerprint,
        "final_loss": loss_value,
        "parameters": sum(p.numel() for p in gpt.parameters()),
        "seconds": round(time.time() - started, 1),
        "spec": asdict(spec),
    }
    manifest.write_text(json.dumps(report, indent=2))
    return out_path, report


def main(argv: list[str] | None = None) -> None:
    """`python -m nemo_tiedlora.apps.demo.base_model --out base.nemo --corpus C --tokenizer T`: build (or reuse) the
    base.

    The demo runs this in its own process, like every NeMo step, so the orchestrating process never holds NeMo's
    process groups or threads while the entry scripts run.
    """
    import argparse

    parser = argparse.ArgumentParser(description="pre-train the tiny base model and save it as a .nemo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=BaseSpec.steps)
    args = parser.parse_args(argv)
    path, report = build_base_model(Path(args.out), corpus=Path(args.corpus), tokenizer_model=Path(args.tokenizer),
                                    spec=BaseSpec(steps=args.steps))
    print(f"base model: {path} (final pre-training loss {report['final_loss']:.3f})")


if __name__ == "__main__":
    main()
