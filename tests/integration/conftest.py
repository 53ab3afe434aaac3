"""Real NeMo + megatron-core on CPU: a tiny Llama-style base .nemo and task data, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[2]

# Small enough to restore in seconds; GQA (4 heads, 2 query groups) so the fused QKV width is not 3d.
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4, num_query_groups=2,
            seq_length=64, steps=40, batch_size=8, lr=3e-3)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(base .nemo path, DemoData, BaseSpec) for the whole session."""
    from nemo_tiedlora.apps.demo.base_model import BaseSpec, build_base_model
    from nemo_tiedlora.apps.demo.data import build_all

    work = tmp_path_factory.mktemp("tiny")
    data = build_all(work / "data")
    spec = BaseSpec(**TINY)
    base, _ = build_base_model(work / "base.nemo", corpus=data.corpus, tokenizer_model=data.tokenizer_model, spec=spec)
    return base, data, spec


@pytest.fixture(scope="session")
def default_demo(tmp_path_factory):
    """(work folder, completed process) of `python -m nemo_tiedlora demo --no-compare` as a user runs it, once per
    session: the default recipe on its own base, built from scratch in a fresh folder. Other tests reuse its data and
    base (the demo's cache) instead of pre-training the base again."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("default_demo")
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora", "demo", "--no-compare", "--work", str(work)],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)
    return work, result


def finetune_cfg(base: Path, data, work: Path, **tuning):
    """The project's finetuning YAML with the overrides a CPU test run needs."""
    from nemo_tiedlora.nemo.finetune import tuning_config

    cfg = tuning_config("finetuning")
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.max_steps = 8
        cfg.trainer.val_check_interval = 8
        cfg.trainer.limit_val_batches = 2
        cfg.trainer.log_every_n_steps = 1
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.gradient_clip_val = 0.0
        cfg.exp_manager.exp_dir = str(work / "runs")
        cfg.exp_manager.resume_if_exists = False
        cfg.model.restore_from_path = str(base)
        cfg.model.global_batch_size = 8
        cfg.model.micro_batch_size = 8
        cfg.model.optim.lr = 1e-2
        cfg.model.optim.sched.warmup_steps = 0
        cfg.model.data.train_ds.file_names = [str(data.train)]
        cfg.model.data.validation_ds.file_names = [str(data.validation)]
        cfg.model.data.validation_ds.names = ["validation"]
        for split in ("train_ds", "validation_ds"):
            cfg.model.data[split].max_seq_length = 64
            cfg.model.data[split].memmap_workers = 1
        for key, value in tuning.items():
            cfg.model.peft.tiedlora_tuning[key] = value
    return cfg
