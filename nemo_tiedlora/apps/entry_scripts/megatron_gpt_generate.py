"""Generate / evaluate with a base GPT .nemo and a PEFT adapter .nemo (Tied-LoRA included), NeMo-style.

    python examples/nlp/language_modeling/tuning/megatron_gpt_generate.py \
        model.restore_from_path=base.nemo model.peft.restore_from_path=adapter.nemo \
        model.data.test_ds.file_names=[test.jsonl] model.data.test_ds.names=[test] \
        model.data.test_ds.tokens_to_generate=8 inference.greedy=True \
        model.data.test_ds.write_predictions_to_file=True model.data.test_ds.output_file_path_prefix=preds

From an installed wheel: `python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_generate ...` (the same arguments);
the YAML is `conf/megatron_gpt_generate_config.yaml` next to this file.
"""

import torch.multiprocessing as mp
from nemo.core.config import hydra_runner

import nemo_tiedlora  # noqa: F401  (registers the `tiedlora` PEFT scheme)
from nemo_tiedlora.nemo.finetune import evaluate
from nemo_tiedlora.nemo.launch import finish_distributed, user_errors

mp.set_start_method("spawn", force=True)


@hydra_runner(config_path="conf", config_name="megatron_gpt_generate_config")
def main(cfg) -> None:
    with user_errors():  # our errors end with their one-line cause (HYDRA_FULL_ERROR=1: traceback)
        evaluate(cfg)
    finish_distributed()


if __name__ == "__main__":
    main()
