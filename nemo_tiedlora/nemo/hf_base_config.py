"""The NeMo model config of a base imported from Hugging Face by ``import-hf`` (nemo glue layer).

The mapping is pure (``formats.hf.llama_to_nemo``, ``formats.hf.source``); this module assembles the NeMo config
around it (:func:`nemo_config`, on ``nemo.gpt_config.llama_gpt_config``) and its tokenizer section
(:func:`tokenizer_config`); the tool ``tools.import_hf`` writes the archive through ``nemo.base_archive``. The
tokenizer travels inside the archive as NeMo's ``huggingface`` tokenizer: its files are archive artifacts
``tokenizer.hf_files.*`` (``tokenizer.type`` is ``nemo_tiedlora:hf_files``; the compat hook
``hf-tokenizer-in-archive``, :func:`hf_tokenizer_from_archive`, lets NeMo read them), so loading needs no
hub access and no path outside the archive.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.nemo.gpt_config import llama_gpt_config


HF_TOKENIZER_IN_ARCHIVE = "nemo_tiedlora:hf_files"  # tokenizer.type of a .nemo whose HF tokenizer is in the archive


def _artifact_key(filename: str) -> str:
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}_{ext}"  # OmegaConf keys cannot hold '.'; artifact_file_name maps it back


def artifact_file_name(key: str) -> str:
    """The file name of a ``tokenizer.hf_files`` key (the inverse of ``_artifact_key``: ``tokenizer_json`` ->
    ``tokenizer.json``)."""
    stem, ext = str(key).rsplit("_", 1)
    return f"{stem}.{ext}"


def tokenizer_config(files: dict[str, bytes], chat_template: Any = None) -> dict[str, Any]:
    """``model.tokenizer`` of an imported archive: NeMo's huggingface tokenizer over the archive's files."""
    return {
        "library": "huggingface",
        "type": _hf_tokenizer_type(),
        "model": None,
        "vocab_file": None,
        "merge_file": None,
        "delimiter": None,
        "use_fast": True,
        "hf_files": {_artifact_key(name): f"nemo:{name}" for name in sorted(files)},
        **({"chat_template": chat_template} if isinstance(chat_template, str) else {}),
    }


def archive_tokenizer_files(tokenizer: Any, artifacts: dict[str, bytes]) -> dict[str, bytes]:
    """The Hugging Face tokenizer files (file name -> bytes) that a base archive carries as ``tokenizer.hf_files``
    artifacts (``artifacts``: the archive's top-level members, ``nemo.base_archive.read_base``); empty for any other
    tokenizer (NeMo's SentencePiece or GPT-2 vocabulary files)."""
    if tokenizer.get("type") != _hf_tokenizer_type():
        return {}
    files = {}
    for key, value in (tokenizer.get("hf_files") or {}).items():
        member = str(value).removeprefix("nemo:")
        if member not in artifacts:
            raise TiedLoraCheckpointError(f"the archive's tokenizer names {member} but does not hold it: the archive "
                                          "is incomplete; import the model again with import-hf")
        files[artifact_file_name(key)] = artifacts[member]
    return files


def _hf_tokenizer_type() -> str:
    return HF_TOKENIZER_IN_ARCHIVE


def nemo_config(model_keys: dict[str, Any], tokenizer: dict[str, Any], *, divisor: int, dtype: str) -> Any:
    """The full ``model_config.yaml``: the CPU-safe runtime settings of ``llama_gpt_config``, the imported
    architecture, the tokenizer and the vocabulary divisor (TP1/PP1; the writer records the target layout)."""
    seq_length = model_keys["encoder_seq_length"]
    cfg = OmegaConf.to_container(llama_gpt_config(
        tokenizer=tokenizer, num_layers=model_keys["num_layers"], hidden_size=model_keys["hidden_size"],
        ffn_hidden_size=model_keys["ffn_hidden_size"], num_attention_heads=model_keys["num_attention_heads"],
        num_query_groups=model_keys["num_query_groups"], seq_length=seq_length, batch_size=1))
    cfg.update(model_keys)
    cfg.update({
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tokenizer": tokenizer,
        "make_vocab_size_divisible_by": divisor,
        "precision": 32 if dtype == "fp32" else "bf16",
        "data": {**cfg["data"], "seq_length": seq_length},
    })
    return OmegaConf.create(cfg)


def hf_tokenizer_from_archive() -> None:
    """NeMo builds the tokenizer of a base whose Hugging Face tokenizer files are archive artifacts (this module's
    tokenizer section): the compat table installs it (``hf-tokenizer-in-archive``)."""
    import os
    import shutil
    import tempfile

    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.compat.patch import replace

    def make(original):
        def _build_tokenizer(self):
            tok = self._cfg.tokenizer
            if tok.get("library") != "huggingface" or tok.get("type") != HF_TOKENIZER_IN_ARCHIVE:
                return original(self)
            # tokenizer.hf_files.<name with '.' as '_'>: one registered artifact per file (NeMo's artifacts are files)
            folder = tempfile.mkdtemp(prefix="tiedlora-hf-tokenizer-")
            try:
                for key in list(tok.hf_files.keys()):
                    path = self.register_artifact(f"tokenizer.hf_files.{key}", tok.hf_files[key])
                    shutil.copyfile(path, os.path.join(folder, artifact_file_name(key)))
                with open_dict(self._cfg):
                    tok.type = folder  # AutoTokenizer.from_pretrained(folder): read into memory now
                original(self)
            finally:
                with open_dict(self._cfg):
                    tok.type = HF_TOKENIZER_IN_ARCHIVE
                shutil.rmtree(folder, ignore_errors=True)

        return _build_tokenizer

    replace(MegatronBaseModel, "_build_tokenizer", make)
