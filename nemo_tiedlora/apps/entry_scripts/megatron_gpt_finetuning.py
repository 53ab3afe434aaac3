"""Fine-tune a base GPT .nemo with a PEFT scheme, NeMo-style; `model.peft.peft_scheme=tiedlora` selects Tied-LoRA.

    python examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py \
        model.restore_from_path=base.nemo \
        model.peft.peft_scheme=tiedlora model.peft.tiedlora_tuning.preset=tl6 model.peft.tiedlora_tuning.adapter_dim=8 \
        model.data.train_ds.file_names=[train.jsonl] model.data.validation_ds.file_names=[val.jsonl] \
        exp_manager.exp_dir=runs/tl6

Only adapter weights are trained and saved: exp_manager writes the adapter .nemo under
<exp_dir>/<name>/checkpoints at the end of training. Multi-GPU/multi-node: launch with torchrun or SLURM and set
trainer.devices, trainer.num_nodes, model.tensor_model_parallel_size, model.pipeline_model_parallel_size.

From an installed wheel: `python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_finetuning ...` (the same arguments);
the YAML is `conf/megatron_gpt_finetuning_config.yaml` next to this file.
"""

import torch.multiprocessing as mp
from nemo.core.config import hydra_runner

import nemo_tiedlora  # noqa: F401  (registers the `tiedlora` PEFT scheme)
from nemo_tiedlora.nemo.finetune import finetune
from nemo_tiedlora.nemo.launch import finish_distributed, user_errors

mp.set_start_method("spawn", force=True)


@hydra_runner(config_path="conf", config_name="megatron_gpt_finetuning_config")
def main(cfg) -> None:
    with user_errors():  # our errors end with their one-line cause (HYDRA_FULL_ERROR=1: traceback)
        finetune(cfg)
    finish_distributed()


if __name__ == "__main__":
    main()
