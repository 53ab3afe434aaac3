"""Merge a Tied-LoRA adapter into its base .nemo, NeMo-style (CPU, one process; the CLI's `merge` underneath).

    python examples/nlp/language_modeling/tuning/megatron_gpt_tiedlora_merge.py \
        base=base.nemo adapter=adapter.nemo out=merged.nemo [tp=2 pp=2 format=legacy first_stage_layers=3]

W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A in every adapted layer. `base` may be a distributed or a legacy
per-rank checkpoint at any TP/PP; `format=dist` (default) loads at any TP/PP, `format=legacy` at exactly tp/pp.

From an installed wheel: `python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_tiedlora_merge ...` (the same
arguments); the YAML is `conf/megatron_gpt_tiedlora_merge_config.yaml` next to this file.
"""

from nemo.core.config import hydra_runner

from nemo_tiedlora.nemo.launch import user_errors
from nemo_tiedlora.tools.merge import merge


@hydra_runner(config_path="conf", config_name="megatron_gpt_tiedlora_merge_config")
def main(cfg) -> None:
    with user_errors():
        out = merge(base=cfg.base, adapter=cfg.adapter, out=cfg.out, tp=cfg.tp, pp=cfg.pp, fmt=cfg.format,
                    first_stage_layers=cfg.first_stage_layers, vocab_size=cfg.vocab_size, overwrite=cfg.overwrite)
    print(f"merged .nemo: {out}")


if __name__ == "__main__":
    main()
