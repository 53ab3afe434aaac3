"""Generate / evaluate with a base GPT .nemo and a PEFT adapter .nemo (Tied-LoRA included), NeMo-style.

The script ships in the package: this file runs ``nemo_tiedlora/apps/entry_scripts/megatron_gpt_generate.py`` (an
installed wheel runs the same as ``python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_generate``), with the YAML in
``conf/`` here (a link to the package's ``nemo_tiedlora/apps/entry_scripts/conf``). Usage and arguments: see that
module.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("nemo_tiedlora.apps.entry_scripts.megatron_gpt_generate", run_name="__main__", alter_sys=True)
