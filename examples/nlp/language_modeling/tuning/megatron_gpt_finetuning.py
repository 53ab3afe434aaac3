"""Fine-tune a base GPT .nemo with a PEFT scheme, NeMo-style; `model.peft.peft_scheme=tiedlora` selects Tied-LoRA.

The script ships in the package: this file runs ``nemo_tiedlora/apps/entry_scripts/megatron_gpt_finetuning.py`` (an
installed wheel runs the same as ``python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_finetuning``), with the YAML
in ``conf/`` here (a link to the package's ``nemo_tiedlora/apps/entry_scripts/conf``). Usage and arguments: see that
module.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("nemo_tiedlora.apps.entry_scripts.megatron_gpt_finetuning", run_name="__main__", alter_sys=True)
