"""The tied-adapter mixins: Tied-LoRA presented to NeMo's adapter machinery (docs/design.md section 8).

NeMo finds adapters through `AdapterModuleMixin` modules (`add_adapter` by name, `get_adapter_module`,
`unfreeze_enabled_adapters`, tensors under `adapter_layer.<name>.` keys). Two such modules carry Tied-LoRA:

- `TiedLoraQKV` wraps megatron's `linear_qkv` in each selected layer (wrap, don't swap: no `__class__` assignment,
  no copied upstream `forward`). It returns `(out, bias)` like the module it wraps, with the update added.
  Its adapter is a `TiedLoraLayerAdapter` holding u_l, v_l (and A_l, B_l when untied).
- `TiedLoraShared` is attached once to each model chunk (`GPTModel.tiedlora_shared`) and holds the tied A and B as
  its adapter `TiedLoraSharedAdapter`. NeMo's optimizer setup and PEFT state dict therefore see A and B exactly
  once, although every layer uses them (NeMo assumes one tensor per layer elsewhere, e.g. in `tie_weights`).

Both take part in megatron-core's distributed checkpointing (`sharded_state_dict`, what `dist_checkpointing.save` of
`model.sharded_state_dict()` writes): the wrapped linear's entries keep their checkpoint keys (a base checkpoint's
weights load into the adapted model), the adapter tensors are added, each written once (its `replica_id` is zero on
one rank only). NeMo's own PEFT checkpoints do not go through it: once the model is set up with PEFT, NeMo's
`sharded_state_dict()` returns None and the adapter-only state dict is saved as a plain torch checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from nemo.collections.common.parts.adapter_modules import AdapterModuleUtil
from nemo.core.classes.mixins.adapter_mixins import AdapterModuleMixin
from torch import nn

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors

ADAPTER_NAME = "tiedlora"


@dataclass
class TiedLoraAdapterConfig:
    """What NeMo's `add_adapter` instantiates in each wrapped `linear_qkv` (a hydra `_target_` config)."""

    in_features: int
    out_features: int
    tiedlora: dict = field(default_factory=dict)  # TiedLoraConfig.to_dict()
    _target_: str = "nemo_tiedlora.nemo.adapters.TiedLoraLayerAdapter"


@dataclass
class TiedLoraSharedAdapterConfig:
    """The model-wide A and B, instantiated once per model chunk."""

    in_features: int
    out_features: int
    tiedlora: dict = field(default_factory=dict)
    _target_: str = "nemo_tiedlora.nemo.adapters.TiedLoraSharedAdapter"


def _config(tiedlora: Any) -> TiedLoraConfig:
    if isinstance(tiedlora, TiedLoraConfig):
        return tiedlora
    from omegaconf import OmegaConf

    if OmegaConf.is_config(tiedlora):
        tiedlora = OmegaConf.to_container(tiedlora, resolve=True)
    return TiedLoraConfig.from_dict(tiedlora)


def _to_model_dtype(module: nn.Module, nemo_kwargs: dict[str, Any]) -> None:
    """Cast the (float32-initialized) factors to the model's parameter dtype, as NeMo's own adapters are built:
    with megatron_amp_O2 the base is bf16/fp16 and its optimizer keeps float32 main copies of every parameter."""
    dtype = getattr(nemo_kwargs.get("model_parallel_config"), "params_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float32:
        module.to(dtype)


class TiedLoraSharedAdapter(SharedFactors, AdapterModuleUtil):
    """SharedFactors as a NeMo adapter module; `adapter_unfreeze` keeps frozen random factors frozen."""

    def __init__(self, *, in_features: int, out_features: int, tiedlora: Any, **_nemo_kwargs: Any) -> None:
        super().__init__(_config(tiedlora), in_features=in_features, out_features=out_features)
        _to_model_dtype(self, _nemo_kwargs)

    def adapter_unfreeze(self) -> None:
        self.set_trainable()


class TiedLoraLayerAdapter(LayerFactors, AdapterModuleUtil):
    """LayerFactors as a NeMo adapter module. NeMo passes `base_model_cfg` and `model_parallel_config`."""

    def __init__(
        self, *, in_features: int, out_features: int, tiedlora: Any, layer_number: int, **_nemo_kwargs: Any
    ) -> None:
        cfg = _config(tiedlora)
        # The shared factors are bound right after instantiation by TiedLoraQKV.add_adapter (hydra cannot pass
        # a module through its config), so a tied layer starts with a placeholder reference.
        super().__init__(
            cfg,
            in_features=in_features,
            out_features=out_features,
            layer_number=layer_number,
            shared=_UNBOUND if cfg.flags.tied else None,
        )
        _to_model_dtype(self, _nemo_kwargs)

    def adapter_unfreeze(self) -> None:
        self.set_trainable()


class _Unbound(nn.Module):
    @property
    def factors(self):
        raise RuntimeError("TiedLoraLayerAdapter used before TiedLoraQKV bound the model's shared A and B")


_UNBOUND = _Unbound()


class TiedLoraShared(nn.Module, AdapterModuleMixin):
    """Owner of the model-wide A and B on one model chunk (registered as `GPTModel.tiedlora_shared`)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_accepted_adapter_types([TiedLoraSharedAdapter])

    def ensure_adapter(self, name: str, cfg: TiedLoraSharedAdapterConfig, **kwargs: Any) -> TiedLoraSharedAdapter:
        if self.get_adapter_module(name) is None:
            self.add_adapter(name=name, cfg=cfg, **kwargs)
        return self.get_adapter_module(name)

    def forward(self, *args: Any, **kwargs: Any):  # pragma: no cover - it only owns tensors
        raise RuntimeError("TiedLoraShared owns the shared A and B; the layers' TiedLoraQKV apply them")

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict[str, Any]:
        """A and B for megatron's distributed checkpoint, under their state-dict keys (`{prefix}adapter_layer.<name>.
        lora_a`). They are full replicas on every TP, PP and DP rank (megatron's default replica id leaves out the
        pipeline rank: every stage would claim to be the main copy), so the replica id is (PP, TP, DP) rank and
        only pipeline stage 0's TP 0 / DP 0 rank writes them; every rank reads them back. `sharded_offsets` (GPTModel
        passes none to its own children) are not applied: A and B are one tensor for the whole model."""
        from megatron.core import parallel_state
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        replica_id = (parallel_state.get_pipeline_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_data_parallel_rank(with_context_parallel=True))
        return {f"{prefix}{key}": make_sharded_tensor_for_checkpoint(tensor, f"{prefix}{key}", replica_id=replica_id)
                for key, tensor in self.state_dict(prefix="", keep_vars=True).items()}


def ask_for_normalized_input(base: nn.Module) -> bool:
    """With TransformerEngine's fused layernorm-linear as `linear_qkv` (`base`), ask it to also return the normalized
    input, this rank's shard, not gathered over the sequence (see TiedLoraQKV); whether it is such a module."""
    if not hasattr(base, "return_layernorm_output"):
        return False
    base.return_layernorm_output = True
    if hasattr(base, "return_layernorm_output_gathered"):
        base.return_layernorm_output_gathered = False
    return True


def tensor_parallel_rows(out_features: int, tensor_parallel_size: int) -> Optional[slice]:
    """This TP rank's rows of the fused QKV output (None without tensor parallelism)."""
    if tensor_parallel_size == 1:
        return None
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    width = out_features // tensor_parallel_size
    return slice(rank * width, (rank + 1) * width)


class TiedLoraQKV(nn.Module, AdapterModuleMixin):
    """`linear_qkv` with the Tied-LoRA update added: returns `(out + update, bias)` like the wrapped module.

    The update runs as the fused functions of `nemo_tiedlora.core.autograd` (rank-sized saved state) on every path. A
    and u are applied to this rank's own input, *before* the tensor-parallel region, so what crosses ranks is
    g = u * (A x) [tokens, r], never the [tokens, d] input (docs/design.md section 5):

    - TP = 1: no region; the one-piece fused function.
    - TP > 1, no sequence parallelism: x is the same on every TP rank; `copy_to_tensor_model_parallel_region(g)`
      (forward: identity; backward: all-reduce of dg [s, b, r]). The gradients of A and u are then complete on
      every TP rank (`nemo/grad_sync.py` does not sum them over TP); B's and v's rows are partial and summed.
    - Sequence parallelism: x is this rank's sequence shard [s/tp, b, d]; g_local = u * (A x_local) [s/tp, b, r]
      goes through `gather_from_sequence_parallel_region` (forward: all-gather to [s, b, r]; backward:
      reduce-scatter of dg). A's and u's gradients are partial over the shards and summed over TP.

    Input (docs/design.md section 4): with the local spec (CPU, and GPU without TransformerEngine) `linear_qkv` is a
    ColumnParallelLinear whose input is already normalized (and, with SP, the local shard); the adapter reads it.
    With the TransformerEngine spec `linear_qkv` fuses the input layernorm; the wrapper asks it to return the
    normalized output too (`return_layernorm_output`), *not gathered*: TE could also return it already gathered
    over the sequence (`return_layernorm_output_gathered`, no adapter collective at all), but then every rank
    would apply A to all s tokens and, when A is trained, keep the gathered [s, b, d] tensor alive for A's
    gradient (TE itself keeps at most its local shard, re-gathered in backward for a weight gradient): tp-1 extra
    shards of the layer's input per layer (4 KB per token per layer in bf16 at d=4096, TP2), against two collectives of
    [s, b, r] (2 x 16 bytes per token per layer in bf16 at r=8) for the local shard. The local shard is cheaper
    in memory by a factor of about d / (2 r), and the two rank-sized collectives are small next to TE's own
    all-gather and reduce-scatter of [s, b, d]; so the wrapper uses the local shard.

    Adapter dropout is applied before the region, so the TP ranks must keep what the TP1 run keeps: every layer
    draws the whole [s, b, d] keep-mask from megatron's data-parallel RNG state (the same on every TP rank and at
    TP1; set up by `nemo_tiedlora.nemo.injection.configure_dropout`), and under SP keeps its own sequence rows; a
    mismatch would show as replica drift of A/u.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        layer_number: int,
        shared_owner: Optional[TiedLoraShared],
        out_rows: Optional[slice],
        tensor_parallel_size: int,
        sequence_parallel: bool,
    ) -> None:
        super().__init__()
        self.base = base
        self.layer_number = layer_number
        self.out_rows = out_rows
        self.tensor_parallel_size = tensor_parallel_size
        self.sequence_parallel = sequence_parallel
        # Kept out of the module registry: the owner is registered once on the model chunk.
        self._owner_ref: tuple[TiedLoraShared, ...] = (shared_owner,) if shared_owner is not None else ()
        self.te_fused_norm = ask_for_normalized_input(base)
        self.set_accepted_adapter_types([TiedLoraLayerAdapter])

    def __getattr__(self, name: str):
        # Attributes megatron reads off `linear_qkv` (weight, config, ...) resolve to the wrapped module
        # (not `sharded_state_dict`: defined below, so that the adapter tensors are in it).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict[str, Any]:
        """The wrapped linear's sharded state dict plus this layer's adapter tensors (megatron dist checkpointing).

        - The wrapped linear's entries keep their checkpoint keys and sharding (`...linear_qkv.weight`, the same
          as without the adapter) and are filed under this module's state-dict keys (`{prefix}base.weight`), so the
          dict that `dist_checkpointing.load` returns goes straight into `load_state_dict`.
        - The adapter tensors (u_l, v_l; A_l, B_l when untied) are filed under their state-dict keys
          (`{prefix}adapter_layer.<name>.vec_u`) with one checkpoint key per *global* layer
          (`...linear_qkv.adapter_layer.<name>.global_layer_<l-1>.vec_u`), without the layer axis megatron stacks
          the base weights on: only the selected layers carry an adapter, so a stacked tensor would have holes.
          They are full replicas on the TP and DP ranks of the layer's stage (replica id (0, TP, DP)): TP 0 / DP 0
          writes them.
        """
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        base = super().__getattr__("base")
        entries = {}
        for key, value in base.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                                  metadata=metadata).items():
            if not key.startswith(prefix):
                raise RuntimeError(f"TiedLoraQKV: the wrapped {type(base).__name__}'s sharded state dict has key "
                                   f"{key!r} outside its prefix {prefix!r}; its entries cannot be filed under "
                                   f"{prefix}base.*: a distributed checkpoint of this model is not supported")
            entries[f"{prefix}base.{key[len(prefix):]}"] = value
        if "adapter_layer" in self._modules:
            layer = f"global_layer_{self.layer_number - 1}"
            for key, tensor in self.adapter_layer.state_dict(prefix="", keep_vars=True).items():
                name, param = key.split(".", 1)  # "<adapter name>.vec_u"
                entries[f"{prefix}adapter_layer.{key}"] = make_sharded_tensor_for_checkpoint(
                    tensor, f"{prefix}adapter_layer.{name}.{layer}.{param}")
        return entries

    def add_adapter(self, name: str, cfg: Any, **kwargs: Any) -> None:
        """NeMo's add_adapter, plus this layer's global number and the binding to the shared A and B."""
        tied = _config(cfg.tiedlora).flags.tied
        if tied:
            shared_cfg = TiedLoraSharedAdapterConfig(
                in_features=cfg.in_features, out_features=cfg.out_features, tiedlora=cfg.tiedlora
            )
            shared = self._owner_ref[0].ensure_adapter(name, shared_cfg, **kwargs)
        super().add_adapter(name=name, cfg=cfg, layer_number=self.layer_number, **kwargs)
        if tied:
            self.get_adapter_module(name).bind_shared(shared)

    def _region(self):
        """What moves g = u * (A x) [..., r] between TP ranks (None: nothing to move)."""
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if self.sequence_parallel:
            return gather_from_sequence_parallel_region  # g_local [s/tp, b, r] -> [s, b, r]
        if self.tensor_parallel_size > 1:
            return copy_to_tensor_model_parallel_region  # backward: all-reduce of dg [s, b, r]
        return None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        result, bias = self.base(hidden_states, *args, **kwargs)
        out, normalized = result if self.te_fused_norm else (result, hidden_states)  # TE: (linear, layernorm) outputs
        enabled = self.get_enabled_adapters() if self.is_adapter_available() else []
        if enabled:
            region = self._region()
            for name in enabled:
                # x [s(/tp), b, d] -> [s, b, out/tp]: this rank's rows of the fused, group-interleaved QKV output
                out = out + self.adapter_layer[name](normalized, self.out_rows, region)
        return out, bias
