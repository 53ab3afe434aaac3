"""NeMo-style entry scripts, shipped in the package (applications layer) so that an installed wheel runs them as a
checkout does: ``python -m nemo_tiedlora.apps.entry_scripts.megatron_gpt_finetuning ...``,
``...megatron_gpt_generate ...``, ``...megatron_gpt_tiedlora_merge ...``; their hydra YAML is ``conf/`` here (package
data).

In a checkout, ``examples/nlp/language_modeling/tuning/`` is the NeMo-style place a user finds them: the scripts
there run these modules, and its ``conf`` is a link to this ``conf``.
"""
