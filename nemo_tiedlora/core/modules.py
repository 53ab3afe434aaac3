"""The Tied-LoRA modules in plain torch: the model-wide shared factors and the per-layer factors.

    z = W_l x + s * v_l * (B (u_l * (A x)))          (docs/design.md section 1; s = alpha / r)

`SharedFactors` owns the tied A [r, d] and B [out, r] once per model replica. `LayerFactors` owns the per-layer
u_l [r] and v_l [out] (and A_l, B_l when untied, i.e. plain LoRA) and only *refers* to the shared factors: the
reference is kept outside torch's module registry, so A and B appear once in `parameters()` and `state_dict()`.

The update runs as the hand-written autograd functions of `core/autograd.py` (rank-sized saved state; the plain
composition `functional.tied_lora_update` is the reference it is tested against).

Every adapter tensor is stored full-size (unsharded) on every rank. Under tensor parallelism a layer uses the rows
of B and v that belong to its `linear_qkv` output partition (`out_rows`), and the caller passes the parallel
`region` that moves `g = u * (A x)` [tokens, r] between ranks: A and u are applied before it, B and v after it.
Which gradients are then partial and summed over the TP group is in `nemo/grad_sync.py`.

Adapter dropout (on x, before A) under tensor parallelism keeps what the TP1 run keeps, token for token: the glue
names, through `LayerFactors.set_dropout_source`, a generator state shared by the TP group and the TP1 run, and
with sequence parallelism this rank's shard of the sequence; each rank then draws the whole-sequence mask and keeps
its shard's rows (without SP, every TP rank applies the whole mask to the same x). Nothing here imports NeMo or
Megatron.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager, Optional

import torch
from torch import nn

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.functional import delta_weight, init_factors
from nemo_tiedlora.core.autograd import fused_tied_lora_update, sequence_keep_mask

# The one place that lists every adapter parameter name (state-dict keys end in these).
PARAM_NAMES: dict[str, str] = {"A": "lora_a", "B": "lora_b", "u": "vec_u", "v": "vec_v"}
FACTOR_OF_PARAM: dict[str, str] = {name: factor for factor, name in PARAM_NAMES.items()}

# Tags read by nemo/grad_sync.py (tag, don't match names): how a parameter is replicated across ranks.
REPLICA_TAG = "tiedlora_replica"
REPLICATED_MODEL_WIDE = "model"  # one logical tensor for the whole model: sum grads over TP, PP and VPP chunks
REPLICATED_IN_LAYER = "layer"  # belongs to one layer: sum grads over TP only
# Set on A and u (tied or not): applied before the TP region, so without sequence parallelism their gradients are
# already complete on every TP rank (nemo/grad_sync.py skips their TP sum); with it they are partial over sequence
# shards.
BEFORE_TP_REGION_TAG = "tiedlora_before_tp_region"


def _parameter(cfg: TiedLoraConfig, init: dict[str, torch.Tensor], factor: str, *, replica: str) -> nn.Parameter:
    param = nn.Parameter(init[factor], requires_grad=cfg.flags.trains(factor))
    setattr(param, REPLICA_TAG, replica)
    setattr(param, BEFORE_TP_REGION_TAG, factor in ("A", "u"))
    return param


class SharedFactors(nn.Module):
    """The tied A [r, d] and B [out, r] of a model: one replica per rank, identical everywhere."""

    def __init__(self, cfg: TiedLoraConfig, *, in_features: int, out_features: int) -> None:
        super().__init__()
        if not cfg.flags.tied:
            raise ValueError("SharedFactors needs a tied configuration (tied=True); untied A/B live in each layer")
        self.cfg = cfg
        init = init_factors(cfg, in_features=in_features, out_features=out_features, layer_index=None)
        for factor in ("A", "B"):
            setattr(self, PARAM_NAMES[factor], _parameter(cfg, init, factor, replica=REPLICATED_MODEL_WIDE))

    @property
    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, PARAM_NAMES["A"]), getattr(self, PARAM_NAMES["B"])

    def set_trainable(self) -> None:
        """requires_grad from the config's flags (frozen random factors stay frozen)."""
        a, b = self.factors
        a.requires_grad_(self.cfg.flags.train_a)
        b.requires_grad_(self.cfg.flags.train_b)


class LayerFactors(nn.Module):
    """The factors of one transformer layer: u_l [r], v_l [out], plus A_l, B_l when untied.

    `layer_number` is the 1-based *global* layer number (megatron's `TransformerLayer.layer_number`), so the
    initial values and checkpoint keys do not depend on how the layers are split over pipeline stages.
    """

    def __init__(
        self,
        cfg: TiedLoraConfig,
        *,
        in_features: int,
        out_features: int,
        layer_number: int,
        shared: Optional[SharedFactors] = None,
    ) -> None:
        super().__init__()
        flags = cfg.flags
        if flags.tied and shared is None:
            raise ValueError("a tied configuration needs the model's SharedFactors")
        self.cfg = cfg
        self.layer_number = layer_number
        self.in_features = in_features
        self.out_features = out_features
        init = init_factors(cfg, in_features=in_features, out_features=out_features, layer_index=layer_number - 1)
        for factor in ("u", "v") if flags.tied else ("u", "v", "A", "B"):
            setattr(self, PARAM_NAMES[factor], _parameter(cfg, init, factor, replica=REPLICATED_IN_LAYER))
        # A plain attribute holding a tuple is invisible to nn.Module's registry: the shared A and B stay owned by
        # the model (one tensor, one state-dict key) although every layer uses them.
        self._shared_ref: tuple[SharedFactors, ...] = (shared,) if flags.tied else ()
        self.dropout_p = float(cfg.dropout)  # applied inside the fused update (the keep-mask is what it keeps)
        # Where the keep-mask comes from (see `set_dropout_source`); the defaults fit one process.
        self.sequence_shard: Optional[tuple[int, int]] = None
        self.mask_rng: Callable[[], ContextManager] = contextlib.nullcontext

    def set_dropout_source(
        self,
        *,
        sequence_shard: Optional[tuple[int, int]] = None,
        rng: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> None:
        """Make the dropout keep-masks of a parallel run those of the unsharded run, token for token.

        `rng()`: a context in which torch's default generator (of x's device) holds a state that every rank of
        the tensor-parallel group shares and that does not depend on the parallel layout, e.g. megatron's
        data-parallel RNG tracker state. `sequence_shard=(k, n)`: x is sequence shard k of n (sequence
        parallelism); the mask of the whole sequence is drawn and rows k*s .. (k+1)*s kept
        (`autograd.sequence_keep_mask`). Without sequence parallelism every TP rank draws the same whole mask.
        """
        self.sequence_shard = sequence_shard
        self.mask_rng = rng

    def bind_shared(self, shared: SharedFactors) -> None:
        """Point this layer at (another replica of) the model's shared factors."""
        if not self.cfg.flags.tied:
            raise ValueError("an untied layer has its own A and B")
        self._shared_ref = (shared,)

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [r, d], B [out, r], u [r], v [out]) as used by this layer, full size."""
        if self.cfg.flags.tied:
            a, b = self._shared_ref[0].factors
        else:
            a, b = getattr(self, PARAM_NAMES["A"]), getattr(self, PARAM_NAMES["B"])
        return a, b, getattr(self, PARAM_NAMES["u"]), getattr(self, PARAM_NAMES["v"])

    def set_trainable(self) -> None:
        """requires_grad of this layer's own tensors from the config's flags."""
        flags = self.cfg.flags
        getattr(self, PARAM_NAMES["u"]).requires_grad_(flags.train_u)
        getattr(self, PARAM_NAMES["v"]).requires_grad_(flags.train_v)
        if not flags.tied:
            getattr(self, PARAM_NAMES["A"]).requires_grad_(flags.train_a)
            getattr(self, PARAM_NAMES["B"]).requires_grad_(flags.train_b)

    def forward(
        self,
        x: torch.Tensor,
        out_rows: Optional[slice] = None,
        region: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The update for input x [..., d]: s * v * (B (u * (A x))) [..., out], or its `out_rows` partition.

        `region` (tensor parallelism) moves g = u * (A x) [..., r] between ranks: e.g. megatron's
        `copy_to_tensor_model_parallel_region`, or `gather_from_sequence_parallel_region` when x is this rank's
        sequence shard [s/tp, b, d] (the result is then [s, b, out/tp]).
        """
        a, b, u, v = self.factors
        if out_rows is not None:
            b, v = b[out_rows], v[out_rows]  # this rank's linear_qkv output partition (whole query groups)
        keep_mask = None
        if self.training and self.dropout_p > 0:
            with self.mask_rng():
                keep_mask = sequence_keep_mask(x, self.dropout_p, shard=self.sequence_shard)  # bool, shaped like x
        return fused_tied_lora_update(x, a, b, u, v, self.cfg.scale, keep_mask=keep_mask,
                                      keep_prob=1.0 - self.dropout_p, region=region)

    def delta_weight(self) -> torch.Tensor:
        """s * diag(v) B diag(u) A  [out, d]: what merging adds to W_l."""
        a, b, u, v = self.factors
        return delta_weight(a, b, u, v, self.cfg.scale)

    def extra_repr(self) -> str:
        return f"layer={self.layer_number}, in={self.in_features}, out={self.out_features}, r={self.cfg.rank}"
