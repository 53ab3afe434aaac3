"""``export``: an adapter as plain per-layer LoRA, for serving stacks (tools layer; CPU, one process).

- :func:`export_hf_peft`: Hugging Face PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) and, with
  ``base_out``, the base as a HF ``LlamaForCausalLM`` checkpoint (the pure mapping:
  ``nemo_tiedlora.formats.hf.nemo_to_hf``) with the tokenizer files the base carries (what vLLM or transformers load
  with it);
- :func:`export_nemo_lora`: NeMo's own ``lora`` adapter ``.nemo``, written by NeMo.

The adapter archive is read and validated once (``formats.adapter_archive.load_archive``) and checked against the base's
shape.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_tiedlora.formats.adapter_archive import AdapterArchive, check_base_shape, load_archive
from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.core.fileio import check_output
from nemo_tiedlora.formats.hf.nemo_to_hf import hf_peft_adapter, nemo_gpt_to_hf_llama, write_hf_model, write_hf_peft
from nemo_tiedlora.formats.hf.tokenizer import from_gguf_before_repair, portable_files, special_token_ids
from nemo_tiedlora.formats.merge_delta import per_layer_lora
from nemo_tiedlora.nemo.base_archive import base_config, loadable_at_tp1, read_base
from nemo_tiedlora.nemo.cpu_restore import batch_sizes_in_force, save_to
from nemo_tiedlora.nemo.hf_base_config import archive_tokenizer_files
from nemo_tiedlora.core.model_shape import model_shape

logger = logging.getLogger("nemo_tiedlora")


def _adapter_for(adapter: Path, base: Path) -> tuple[AdapterArchive, dict[str, int]]:
    """The adapter archive (read and validated once) and the base's shape, which must be the adapter's."""
    archive = load_archive(Path(adapter))
    shape = model_shape(base_config(Path(base)))
    check_base_shape(archive.shape, shape)
    return archive, shape


def export_hf_peft(*, adapter: Path, base: Path, out: Path, base_out: Optional[Path] = None,
                   overwrite: bool = False) -> dict[str, Path]:
    """Write the adapter as HF PEFT LoRA to `out`; with `base_out`, also the base as a HF Llama checkpoint."""
    archive, shape = _adapter_for(adapter, base)
    written = {}
    config, tensors = hf_peft_adapter(archive.tensors, archive.config, shape, check=False)
    written["adapter"] = write_hf_peft(out, config, tensors, overwrite=overwrite)
    if base_out is not None:
        source = read_base(Path(base))  # either checkpoint format, any TP/PP
        state, llama_cfg = nemo_gpt_to_hf_llama(source.state, source.cfg)
        files = export_tokenizer_files(source.cfg.tokenizer, source.artifacts, base, base_out)
        llama_cfg.update(special_token_ids(files))  # where generation stops, for servers that read config.json
        written["base"] = write_hf_model(base_out, state, llama_cfg, overwrite=overwrite, files=files)
    return written


def export_tokenizer_files(tokenizer: DictConfig, artifacts: dict[str, bytes], base: Path, base_out: Path) -> dict:
    """The base's Hugging Face tokenizer files, declared so that every transformers release (vLLM's included) reads
    them as NeMo does (``hf_tokenizer.portable_files``: repairs archives imported before that rule); none, with a
    warning, for a tokenizer that is not a Hugging Face one."""
    files = archive_tokenizer_files(tokenizer, artifacts)
    if not files:
        logger.warning("%s: its tokenizer (library %s) is not a Hugging Face tokenizer, so %s gets no tokenizer files: "
                       "copy the model's Hugging Face tokenizer files there before serving it", base,
                       tokenizer.get("library"), base_out)
        return {}
    if from_gguf_before_repair(json.loads(files.get("tokenizer.json", b"{}"))):
        logger.warning("%s was imported from a GGUF file before import-hf kept the GGUF's pre-tokenizer rule: its "
                       "tokenizer is exported as transformers 4.x reads it (same ids in 5.x), which may split numerals "
                       "differently from llama.cpp; run import-hf on the GGUF again for the exact rule", base)
    return portable_files(files)


def export_nemo_lora(*, adapter: Path, base: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the adapter as NeMo's own ``lora`` PEFT .nemo (TP1/PP1), written by NeMo itself.

    Per layer l: ``linear_in = diag(u_l) A`` [r, d] and ``linear_out = diag(v_l) B`` [out, r] of NeMo's
    ``lora_kqv_adapter`` (Megatron's fused QKV order, as the base), with the same rank and alpha (NeMo scales by
    alpha/r), on the same layers (``layer_selection``). NeMo loads it with ``model.peft.peft_scheme=lora``
    ``model.peft.restore_from_path=<out>`` (any NeMo script: megatron_gpt_generate.py, ...).
    """
    from nemo_tiedlora.nemo.finetune import build, tuning_config

    out = check_output(out, overwrite=overwrite)
    archive, _ = _adapter_for(adapter, base)
    tcfg = archive.config
    factors = per_layer_lora(archive.tensors, tcfg, check=False)
    num_layers = int(archive.shape["num_layers"])
    cfg = tuning_config("finetuning")
    with open_dict(cfg):
        cfg.trainer.update(accelerator="cpu", devices=1, num_nodes=1, logger=False, enable_checkpointing=False)
        cfg.exp_manager = None
        cfg.model.update(restore_from_path=str(base), tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        cfg.model.update(batch_sizes_in_force() or {})
        for split in cfg.model.data.values():  # no data: nothing is trained or evaluated here
            if isinstance(split, DictConfig) and OmegaConf.is_missing(split, "file_names"):
                split.file_names = []
        cfg.model.peft.peft_scheme = "lora"
        cfg.model.peft.restore_from_path = None
        lora = cfg.model.peft.lora_tuning
        lora.update(variant="nemo", target_modules=["attention_qkv"], adapter_dim=int(tcfg.rank),
                    alpha=float(tcfg.resolved_alpha), adapter_dropout=0.0, weight_tying=False)
        lora.layer_selection = None if sorted(factors) == list(range(1, num_layers + 1)) else sorted(factors)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NeMo reads the tokenizer from the restored archive when it saves: the TP1 copy (if any) lives until then.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        with open_dict(cfg):
            cfg.model.restore_from_path = str(loadable_at_tp1(Path(base), Path(tmp)))
        _, model, _, _ = build(cfg)
        scale = float(tcfg.scale)
        written = set()
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                number = layer.layer_number
                if number not in factors:
                    continue
                lora_module = layer.self_attention.get_adapter_module("lora_kqv_adapter")
                a_l, b_l = factors[number]
                lora_module.linear_in.weight.copy_(a_l.to(torch.float32))
                lora_module.linear_out.weight.copy_(b_l.to(torch.float32) / scale)  # NeMo applies alpha/r itself
                written.add(number)
        if written != set(factors):
            missing = sorted(set(factors) - written)
            raise TiedLoraCheckpointError(f"NeMo's LoRA model has no adapter on layers {missing}")
        model.setup_complete = True  # NeMo's PEFT state: the adapter weights only, in NeMo's per-rank format
        return save_to(model, out)
