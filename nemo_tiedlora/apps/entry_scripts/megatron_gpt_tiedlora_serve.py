"""Serve many Tied-LoRA adapters of one base over an OpenAI-compatible HTTP API, NeMo-style (the CLI's `serve`).

    python examples/nlp/language_modeling/tuning/megatron_gpt_tiedlora_serve.py \
        base=base.nemo adapters=adapters/ port=8000 [max_batch_size=32 max_wait_ms=20 enable_lora_loading=True]

Every key of `conf/megatron_gpt_tiedlora_serve_config.yaml` is the same-named option of
`python -m nemo_tiedlora serve` (`max_batch_size` is `--max-batch-size`); see `nemo_tiedlora.apps.serve`.
From an installed wheel: `python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_tiedlora_serve ...`.
"""

import argparse
from pathlib import Path

from nemo.core.config import hydra_runner

from nemo_tiedlora.apps import serve


@hydra_runner(config_path="conf", config_name="megatron_gpt_tiedlora_serve_config")
def main(cfg) -> None:
    adapters = cfg.adapters if cfg.adapters is None or isinstance(cfg.adapters, str) else list(cfg.adapters)
    args = argparse.Namespace(
        base=Path(cfg.base), adapters=[] if adapters is None else [adapters] if isinstance(adapters, str) else adapters,
        host=cfg.host, port=int(cfg.port), served_model_name=cfg.served_model_name,
        max_batch_size=int(cfg.max_batch_size), max_wait_ms=float(cfg.max_wait_ms), max_queue=int(cfg.max_queue),
        max_loras=cfg.max_loras, max_lora_rank=cfg.max_lora_rank, enable_lora_loading=bool(cfg.enable_lora_loading),
        tp=int(cfg.tp))
    raise SystemExit(serve.run(args))


if __name__ == "__main__":
    main()
