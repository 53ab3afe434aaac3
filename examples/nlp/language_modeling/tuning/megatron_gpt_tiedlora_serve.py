"""Serve many Tied-LoRA adapters of one base over an OpenAI-compatible HTTP API, NeMo-style.

The script ships in the package: this file runs ``nemo_tiedlora/apps/entry_scripts/megatron_gpt_tiedlora_serve.py``
(an installed wheel runs the same as ``python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_tiedlora_serve``),
with the YAML in ``conf/`` here (a link to the package's ``nemo_tiedlora/apps/entry_scripts/conf``). Usage and
arguments: see that module.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("nemo_tiedlora.apps.entry_scripts.megatron_gpt_tiedlora_serve", run_name="__main__",
                     alter_sys=True)
