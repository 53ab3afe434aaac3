"""Registration of the `tiedlora` PEFT scheme (nemo glue layer): the PEFT config class and its PEFT_CONFIG_MAP entry.

NeMo's scripts do ``model.add_adapter(PEFT_CONFIG_MAP[scheme](model_cfg))`` to train and
``model.load_adapters(path, peft_cfg)`` to restore. `register()` puts `TiedLoraPEFTConfig` in that map; it runs as
soon as ``nemo.collections.nlp.parts.peft_config`` is imported (``nemo_tiedlora._autoregister``), and needs nothing of
NeMo beyond that module. What the config does to a model lives beside it: `injection` (wrapping `linear_qkv`),
`grad_hooks` (the adapter's gradient sums in NeMo's step), `find_adapters` (finding the adapters), `adapter_io`
(save/load); every runtime replacement of a NeMo function they make is declared in `nemo_tiedlora.nemo.compat`.
"""

from __future__ import annotations

from typing import Any

from nemo.collections.nlp.parts import peft_config as nemo_peft_config
from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP, PEFTConfig
from omegaconf import OmegaConf

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.nemo.adapters import ADAPTER_NAME, TiedLoraAdapterConfig
from nemo_tiedlora.core.model_shape import model_shape

SCHEME = "tiedlora"
TUNING_KEY = "tiedlora_tuning"


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
            f"linear_qkv by whole query groups; choose a TP size among "
            f"{[n for n in range(1, groups + 1) if groups % n == 0]}"
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


def register() -> None:
    """Make `tiedlora` a NeMo PEFT scheme: ``PEFT_CONFIG_MAP["tiedlora"]`` (idempotent)."""
    PEFT_CONFIG_MAP[SCHEME] = TiedLoraPEFTConfig
    nemo_peft_config.TiedLoraPEFTConfig = TiedLoraPEFTConfig  # found by name, as NeMo's own config classes are
