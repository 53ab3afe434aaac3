"""The checkpoint tools (tools layer): the user-facing operations behind ``python -m nemo_tiedlora <command>``.

- ``convert``: a base ``.nemo`` to another TP/PP layout or checkpoint format;
- ``merge``: an adapter into its base, a standard ``.nemo``;
- ``export``: an adapter as Hugging Face PEFT LoRA (and the base as a HF Llama checkpoint) or as NeMo's ``lora``;
- ``import_hf``: a Hugging Face Llama-family checkpoint as a base ``.nemo``;
- ``inspect``: what an adapter archive holds (no NeMo).

They import the core and the formats (``formats.reshard``, ``formats.merge_delta``, ``formats.adapter_archive``,
``formats.hf``, ``core.model_shape``) and the NeMo glue (``nemo.base_archive``, the one ``.nemo`` base reader /
writer), never the applications (cli, demo, study, bench), which import them.
"""
