"""The `tiedlora` PEFT scheme in NeMo 1.x: config class, registration, and the hook that wraps `linear_qkv`.

NeMo's scripts do ``model.add_adapter(PEFT_CONFIG_MAP[scheme](model_cfg))`` to train and
``model.load_adapters(path, peft_cfg)`` to restore. `register()` puts `TiedLoraPEFTConfig` in that map and adds
one step in front of `NLPAdapterModelMixin.add_adapter`: for a Tied-LoRA config it wraps `linear_qkv` of every
selected layer in a `TiedLoraQKV` and attaches a `TiedLoraShared` owner to each model chunk, *before* NeMo
records the base keys. NeMo's own loop then adds the adapters to those wrappers (they are `AdapterModuleMixin`s),
and NeMo's freezing, optimizer groups, PEFT state dict, saving, loading and generation run unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from nemo.collections.nlp.parts import peft_config as nemo_peft_config
from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP, PEFTConfig
from omegaconf import OmegaConf

from nemo_tiedlora.config import TiedLoraConfig
from nemo_tiedlora.errors import TiedLoraConfigError
from nemo_tiedlora.functional import qkv_out_width
from nemo_tiedlora.nemo.adapters import ADAPTER_NAME, TiedLoraAdapterConfig, TiedLoraQKV, TiedLoraShared

logger = logging.getLogger("nemo_tiedlora")

SCHEME = "tiedlora"
TUNING_KEY = "tiedlora_tuning"
SHARED_ATTR = "tiedlora_shared"


def model_shape(model_cfg: Any) -> dict[str, int]:
    """hidden size, layers, heads, query groups, head dim and fused-QKV width of a NeMo GPT model config."""
    heads = int(model_cfg.num_attention_heads)
    groups = model_cfg.get("num_query_groups", None) or heads
    kv_channels = model_cfg.get("kv_channels", None)
    hidden = int(model_cfg.hidden_size)
    out = qkv_out_width(hidden, heads, int(groups), kv_channels)
    return {
        "hidden_size": hidden,
        "num_layers": int(model_cfg.num_layers),
        "num_attention_heads": heads,
        "num_query_groups": int(groups),
        "kv_channels": int(kv_channels) if kv_channels else hidden // heads,
        "out_features": out,
    }


class TiedLoraPEFTConfig(PEFTConfig):
    """`model.peft.peft_scheme=tiedlora`, configured by `model.peft.tiedlora_tuning` (validated once, here)."""

    def __init__(self, cfg: Any, *, tiedlora: TiedLoraConfig | None = None) -> None:
        """`cfg` is the NeMo model config; `tiedlora` (e.g. from an adapter archive) replaces its tiedlora_tuning."""
        peft = cfg.get("peft", None)
        tuning = peft.get(TUNING_KEY, None) if peft is not None else None
        if tuning is None and tiedlora is None:
            raise TiedLoraConfigError(
                f"model.peft.{TUNING_KEY} is missing: add the section (see the finetuning YAML) or "
                f"override e.g. +model.peft.{TUNING_KEY}.preset=tl6"
            )
        tuning = OmegaConf.to_container(tuning, resolve=True) if OmegaConf.is_config(tuning) else dict(tuning or {})
        self.check_replicas_every = int(tuning.pop("check_replicas_every", 0) or 0)
        self.tiedlora = tiedlora if tiedlora is not None else TiedLoraConfig.from_nemo(tuning)
        self.shape = model_shape(cfg)
        check_parallel_layout(cfg, self.shape)
        self.tiedlora.validate_for_model(
            hidden_size=self.shape["hidden_size"],
            num_layers=self.shape["num_layers"],
            out_features=self.shape["out_features"],
        )
        self.tensor_parallel_size = int(cfg.get("tensor_model_parallel_size", 1))
        self.sequence_parallel = bool(cfg.get("sequence_parallel", False))
        adapter_cfg = TiedLoraAdapterConfig(
            in_features=self.shape["hidden_size"],
            out_features=self.shape["out_features"],
            tiedlora=self.tiedlora.to_dict(),
        )
        # No mcore mixin: the wrapped linear_qkv is itself the AdapterModuleMixin NeMo adds the adapter to.
        self.name_key_to_mcore_mixins = None
        layer_selection = list(self.tiedlora.layer_selection) if self.tiedlora.layer_selection else None
        super().__init__(
            OmegaConf.create({"layer_selection": layer_selection, "weight_tying": False}),
            name_key_to_cfg={ADAPTER_NAME: adapter_cfg},
        )


def check_parallel_layout(cfg: Any, shape: dict[str, int]) -> None:
    """Refuse, before anything is built, a TP/PP layout the adapter (or megatron) cannot run."""
    tp = int(cfg.get("tensor_model_parallel_size", 1) or 1)
    pp = int(cfg.get("pipeline_model_parallel_size", 1) or 1)
    vpp = cfg.get("virtual_pipeline_model_parallel_size", None)
    groups, layers = shape["num_query_groups"], shape["num_layers"]
    if groups % tp:
        raise TiedLoraConfigError(
            f"tensor_model_parallel_size={tp} does not divide num_query_groups={groups}: tensor parallelism splits "
            f"linear_qkv by whole query groups; choose a TP size among {[n for n in range(1, groups + 1) if groups % n == 0]}"
        )
    if pp > layers:
        raise TiedLoraConfigError(
            f"pipeline_model_parallel_size={pp} exceeds num_layers={layers}: every stage needs at least one layer; "
            f"choose pipeline_model_parallel_size <= {layers}"
        )
    if vpp and int(vpp) > 1:
        raise TiedLoraConfigError(
            f"virtual_pipeline_model_parallel_size={vpp}: NeMo 2.4.1's GPT models (the 1.x collection) do not build "
            "interleaved pipelines (nemo/collections/nlp/modules/common/megatron/build_model.py raises 'Virtual "
            "pipeline model parallel size is no longer supported for nemo 1.0'); remove it"
        )
    distributed_optimizer = cfg.get("optim", {}).get("name") == "mcore_distributed_optim"
    if bool(cfg.get("megatron_amp_O2", False)) and (tp > 1 or pp > 1) and not distributed_optimizer:
        raise TiedLoraConfigError(
            "megatron_amp_O2=True with TP/PP > 1 keeps gradients in apex's main-params wrapper, where tiedlora cannot "
            "sum its replicated factors: use model.optim.name=mcore_distributed_optim or megatron_amp_O2=False"
        )


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The megatron GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    return module


def _model_chunks(model: NLPAdapterModelMixin) -> list[torch.nn.Module]:
    """The megatron GPTModel of every (virtual pipeline) chunk on this rank."""
    chunks = model.model if isinstance(model.model, list) else [model.model]
    return [_unwrap(chunk) for chunk in chunks]


def _out_rows(out_features: int, tensor_parallel_size: int) -> slice | None:
    if tensor_parallel_size == 1:
        return None
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    width = out_features // tensor_parallel_size
    return slice(rank * width, (rank + 1) * width)


def attach(model: NLPAdapterModelMixin, peft_cfg: TiedLoraPEFTConfig) -> int:
    """Wrap `linear_qkv` of the selected layers and attach the shared owner; return the number of wrappers."""
    selection = set(peft_cfg.tiedlora.layer_selection or range(1, peft_cfg.shape["num_layers"] + 1))
    tied = peft_cfg.tiedlora.flags.tied
    wrapped = 0
    for chunk in _model_chunks(model):
        owner = None
        if tied:
            owner = getattr(chunk, SHARED_ATTR, None)
            if owner is None:
                owner = TiedLoraShared()
                setattr(chunk, SHARED_ATTR, owner)
        for layer in chunk.decoder.layers:
            attention = layer.self_attention
            if layer.layer_number not in selection or isinstance(attention.linear_qkv, TiedLoraQKV):
                continue
            attention.linear_qkv = TiedLoraQKV(
                attention.linear_qkv,
                layer_number=layer.layer_number,
                shared_owner=owner,
                out_rows=_out_rows(peft_cfg.shape["out_features"], peft_cfg.tensor_parallel_size),
                tensor_parallel_size=peft_cfg.tensor_parallel_size,
                sequence_parallel=peft_cfg.sequence_parallel,
            )
            wrapped += 1
    return wrapped


def _tiedlora_configs(peft_cfgs: Any) -> list[TiedLoraPEFTConfig]:
    cfgs = peft_cfgs if isinstance(peft_cfgs, (list, tuple)) else [peft_cfgs]
    return [cfg for cfg in cfgs if isinstance(cfg, TiedLoraPEFTConfig)]


_ORIGINAL_ADD_ADAPTER = NLPAdapterModelMixin.add_adapter


def add_adapter(self: NLPAdapterModelMixin, peft_cfgs: Any) -> None:
    """NLPAdapterModelMixin.add_adapter with Tied-LoRA's wrappers put in place first."""
    tied_cfgs = _tiedlora_configs(peft_cfgs)
    if len(tied_cfgs) > 1:
        raise TiedLoraConfigError("more than one tiedlora config given: combine them into one tiedlora_tuning")
    if tied_cfgs and getattr(self, "mcore_gpt", False) is not True:
        raise TiedLoraConfigError("tiedlora needs a megatron-core GPT model: set model.mcore_gpt=True")
    if tied_cfgs:
        attach(self, tied_cfgs[0])
    _ORIGINAL_ADD_ADAPTER(self, peft_cfgs)
    if tied_cfgs:
        from nemo_tiedlora.nemo.summary import log_parameter_summary
        from nemo_tiedlora.parallel import tag_for_clipping

        tag_for_clipping(_model_chunks(self))
        self._tiedlora_peft_cfg = tied_cfgs[0]
        self._tiedlora_check_every = tied_cfgs[0].check_replicas_every
        self._tiedlora_steps = 0
        _OWNERS[id(_model_chunks(self)[0])] = self
        _hook_finalize_model_grads()
        log_parameter_summary(self, tied_cfgs[0])


def _before_data_parallel_reduction(model: Any) -> None:
    """Once per optimizer step, before the DP reduction: (optionally) check replicas, then sum adapter grads."""
    if not hasattr(model, "_tiedlora_steps"):
        return  # no tiedlora adapters in this model
    from nemo_tiedlora.anomaly import check_finite_grads
    from nemo_tiedlora.parallel import check_replicas, reduce_adapter_grads

    chunks = _model_chunks(model)
    every = getattr(model, "_tiedlora_check_every", 0)
    if every and model._tiedlora_steps % every == 0:
        step = model._tiedlora_steps  # optimizer steps done: the check sees the state the previous step left
        checked = check_replicas(chunks, step=step)
        _log_replica_check(checked, step)
    model._tiedlora_steps += 1
    reduce_adapter_grads(chunks)
    trainer = getattr(model, "_trainer", None)  # steps done, resumed runs included (our counter restarts at 0)
    check_finite_grads(chunks, step=trainer.global_step if trainer is not None else model._tiedlora_steps - 1)


_REPLICA_LOG_SECONDS = 60.0  # after the first check, at most one INFO line a minute (every check at DEBUG)
_last_replica_log: list[float] = []


def _log_replica_check(checked: int, step: int) -> None:
    """Rank 0: say that the replicas were checked (INFO for the first check, then at most once a minute)."""
    import time

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if not dist.is_initialized():  # one process holds the only copy of every tensor: nothing to compare
        logger.debug("Tied-LoRA: replica check at step %d skipped: no process group", step)
        return
    now = time.monotonic()
    world = dist.get_world_size()
    level = logging.DEBUG
    if not _last_replica_log or now - _last_replica_log[-1] >= _REPLICA_LOG_SECONDS:
        _last_replica_log[:] = [now]
        level = logging.INFO
    logger.log(level, "Tied-LoRA: checked %d replicas at step %d: bitwise identical on all %d rank(s)", checked, step,
               world)


def _wrap_allreduce_gradients(original):
    def allreduce_gradients(self):
        _before_data_parallel_reduction(self)
        return original(self)

    allreduce_gradients._nemo_tiedlora = True
    return allreduce_gradients


def _wrap_finalize_model_grads(original):
    def finalize_model_grads(model, *args, **kwargs):
        # megatron DDP (distributed optimizer): our TP/PP sums must precede its DP reduce-scatter
        first = model[0] if isinstance(model, list) else model
        owner = _OWNERS.get(id(_unwrap(first)))
        if owner is not None:
            _before_data_parallel_reduction(owner)
        return original(model, *args, **kwargs)

    finalize_model_grads._nemo_tiedlora = True
    return finalize_model_grads


# id(first GPTModel chunk) -> the NeMo model that owns it: megatron's finalize_model_grads only sees the chunks.
_OWNERS: dict[int, Any] = {}


def iter_layer_adapters(model: NLPAdapterModelMixin) -> Iterable[tuple[int, Any]]:
    """(global layer number, TiedLoraLayerAdapter) for every adapted layer on this rank."""
    for chunk in _model_chunks(model):
        for layer in chunk.decoder.layers:
            qkv = layer.self_attention.linear_qkv
            if isinstance(qkv, TiedLoraQKV) and qkv.get_adapter_module(ADAPTER_NAME) is not None:
                yield layer.layer_number, qkv.get_adapter_module(ADAPTER_NAME)


def iter_shared_adapters(model: NLPAdapterModelMixin) -> Iterable[Any]:
    """The TiedLoraSharedAdapter (A, B) replica of every model chunk on this rank."""
    for chunk in _model_chunks(model):
        owner = getattr(chunk, SHARED_ATTR, None)
        if owner is not None and owner.get_adapter_module(ADAPTER_NAME) is not None:
            yield owner.get_adapter_module(ADAPTER_NAME)


def register() -> None:
    """Make `tiedlora` a NeMo PEFT scheme and hook its gradient sums into NeMo's step (idempotent)."""
    import importlib

    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    importlib.import_module("nemo.collections.nlp.models.language_modeling.megatron_gpt_model")

    PEFT_CONFIG_MAP[SCHEME] = TiedLoraPEFTConfig
    nemo_peft_config.TiedLoraPEFTConfig = TiedLoraPEFTConfig
    if NLPAdapterModelMixin.add_adapter is not add_adapter:
        NLPAdapterModelMixin.add_adapter = add_adapter
    from nemo_tiedlora.nemo import adapter_io

    adapter_io.install()
    # Plain optimizers: NeMo's training_step calls allreduce_gradients (DP all-reduce) after the pipeline.
    if not getattr(MegatronBaseModel.allreduce_gradients, "_nemo_tiedlora", False):
        MegatronBaseModel.allreduce_gradients = _wrap_allreduce_gradients(MegatronBaseModel.allreduce_gradients)
    _hook_finalize_model_grads()


def _hook_finalize_model_grads() -> None:
    """Distributed optimizer: fwd_bwd_step installs megatron's finalize_model_grads (DP reduce-scatter) as the
    schedule's last step. The GPT model and the SFT model (which overrides fwd_bwd_step) each import their own
    reference to it: wrap both. Idempotent; called again when adapters are added, because register() can run while
    the SFT module is still being imported (its name does not exist yet)."""
    import sys

    for name in ("nemo.collections.nlp.models.language_modeling.megatron_gpt_model",
                 "nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model"):
        module = sys.modules.get(name)
        original = getattr(module, "finalize_model_grads", None) if module is not None else None
        if original is not None and not getattr(original, "_nemo_tiedlora", False):
            module.finalize_model_grads = _wrap_finalize_model_grads(original)
