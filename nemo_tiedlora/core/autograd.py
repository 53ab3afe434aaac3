"""The Tied-LoRA update as hand-written autograd functions that keep only rank-sized tensors for backward.

    z = s * v ⊙ (B (u ⊙ (A x)))          x [T, d], A [r, d], B [out, r], u [r], v [out]; T = tokens

The plain composition of torch ops (:func:`nemo_tiedlora.core.functional.tied_lora_update`, kept as the reference
implementation) lets autograd keep ``B (u ⊙ (A x))`` [T, out] whenever v is trained (vera, tl2, tl6), for v's
gradient: about 3 x the layer's own input. The functions here keep, beyond ``x`` itself (the tensor the base
layer keeps anyway; saved by reference, never copied), at most two [T, r] tensors:

- ``h = A x`` [T, r] when u is trained (``grad_u`` needs it) and, for the one-piece function, when B or v is
  trained (``g = u ⊙ h`` is recomputed from it in backward);
- ``g = u ⊙ h`` [T, r] in the second half of the split form, when B or v is trained.

Backward (docs/design.md section 5), with ``M = dz^T g`` [out, r]::

    grad_B = s * v[:, None] * M          grad_v = s * (M * B).sum(-1)
    dg = dz @ (s * v[:, None] * B)       grad_u = (dg * h).sum(tokens)
    dh = dg * u                          grad_A = dh^T x            dx = dh @ A

No [T, out] tensor exists in backward beyond the incoming ``dz``. A factor that does not require grad gets no
gradient and costs no work (its matmul is skipped); ``x`` is kept only if A is trained.

Split form (tensor parallelism): :func:`tied_lora_down` computes ``g = u ⊙ (A x)`` [T, r] on the rank's own
input, the caller moves ``g`` across ranks (``region``: megatron's copy-to-TP-region or sequence-parallel
gather), and :func:`tied_lora_up` applies this rank's rows of B and v. What crosses ranks is r values per token.

Dropout on x (``keep_mask``: a bool [T, d] mask, ``keep_prob = 1 - p``; :func:`sequence_keep_mask` draws a
sequence shard's rows of the whole sequence's mask, for sequence parallelism): the function applies
``x * keep_mask / keep_prob`` itself and keeps the *mask* (1 byte per element: d bytes per token per layer) next
to the undropped x, instead of a dropped copy of x (2 d bytes in bf16, 4 d in fp32, which the reference
composition keeps in addition to the mask). A [T, d] dropped input exists in backward only transiently, while
``grad_A`` is formed. Without dropout the cost is zero. Under autocast a float32 x is cast to autocast's dtype
first and that copy is what is kept (as ``F.linear`` under autocast keeps its own cast).

Autocast (CPU or CUDA, bf16 or fp16), the dtype contract:

- The public functions (:func:`fused_tied_lora_update`, :func:`tied_lora_down`, :func:`tied_lora_up`) pick the
  compute dtype: autocast's dtype for x's device when autocast is on there, else x's dtype; they cast x and every
  factor to it (``Tensor.to``, a no-op when it already matches). The output has the compute dtype, as ``F.linear``'s.
- The autograd functions compute in exactly the dtype of their inputs: forward *and* backward run with autocast
  disabled (:func:`_autocast_off`), so neither an autocast region around forward nor one around ``backward()``
  (CPU autocast is thread-local to the caller, who runs CPU backward) changes what they compute; their gradients
  come out in the compute dtype.
- Each gradient then reaches its tensor in that tensor's own dtype through the backward of the cast: float32
  parameters get float32 gradients, bf16 parameters (megatron_amp_O2) bf16 ones.

``torch.amp.custom_fwd/custom_bwd`` are not used: their ``device_type`` is fixed when the function is decorated
(these run on CPU and CUDA) and ``cast_inputs`` fixes one dtype for fp16 and bf16 runs alike. Nothing here imports
NeMo or Megatron.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor


def dropout_keep_mask(x: Tensor, p: float, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """A bool keep-mask shaped like ``x`` with P(keep) = 1 - p, drawn from ``generator`` (default: torch's)."""
    return _keep_draw(x.shape, x.device, p, generator).bool()


def _keep_draw(shape: torch.Size, device: torch.device, p: float, generator: Optional[torch.Generator]) -> Tensor:
    """The one draw every keep-mask comes from: float32 ones (kept) and zeros, P(one) = 1 - p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - p, generator=generator)


def sequence_keep_mask(x: Tensor, p: float, *, shard: Optional[tuple[int, int]] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """The keep-mask of ``x``, which is sequence shard ``k`` of ``n`` (``shard=(k, n)``): rows ``k s .. (k+1) s``
    (dim 0, ``s = x.shape[0]``) of the mask :func:`dropout_keep_mask` draws for the whole sequence ``[n s, ...]``.

    From the same generator state this is exactly the slice of the mask one process draws for the unsharded input
    (the draw of a CPU or CUDA generator depends on the whole tensor's size, so the full mask is drawn, transiently,
    and sliced). ``shard=None``: the mask of ``x`` itself.
    """
    if shard is None:
        return dropout_keep_mask(x, p, generator=generator)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"sequence shard index must be in [0, {count}), got {index}")
    rows = x.shape[0]
    full = _keep_draw(torch.Size((count * rows, *x.shape[1:])), x.device, p, generator)  # [n s, ...]
    return full[index * rows:(index + 1) * rows].bool()  # a copy of this shard's rows only: [s, ...]


def _autocast_off(method: Callable) -> Callable:
    """Run an autograd function's forward or backward with autocast disabled on its first tensor argument's device,
    so that it computes in its inputs' dtype (see the module docstring)."""

    @functools.wraps(method)
    def run(ctx, *args):
        device = next(arg.device.type for arg in args if isinstance(arg, Tensor))
        off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else (
            contextlib.nullcontext())
        with off:
            return method(ctx, *args)

    return run


def _apply_mask(x: Tensor, keep_mask: Optional[Tensor], keep_prob: float) -> Tensor:
    return x if keep_mask is None else x * keep_mask / keep_prob


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])  # [..., n] -> [T, n] (a view for contiguous inputs)


def _up_backward(dz: Tensor, g: Optional[Tensor], b: Tensor, v: Tensor, scale: float, needs: tuple[bool, bool, bool]):
    """(dg, grad_B, grad_v) of ``z = s * v ⊙ (B g)``; ``needs`` = which of g, B, v need a gradient."""
    need_g, need_b, need_v = needs
    dz2 = _rows(dz)  # [T, out]
    dg = grad_b = grad_v = None
    if need_b or need_v:
        m = dz2.t() @ _rows(g)  # [out, T] @ [T, r] -> [out, r]
        if need_b:
            grad_b = (scale * v).unsqueeze(-1) * m  # [out, r]
        if need_v:
            grad_v = scale * (m * b).sum(-1)  # [out]
    if need_g:
        dg = dz2 @ ((scale * v).unsqueeze(-1) * b)  # [T, out] @ [out, r] -> [T, r]
    return dg, grad_b, grad_v


def _down_backward(dg: Tensor, x: Optional[Tensor], h: Optional[Tensor], a: Tensor, u: Tensor,
                   keep_mask: Optional[Tensor], keep_prob: float, needs: tuple[bool, bool, bool]):
    """(dx, grad_A, grad_u) of ``g = u ⊙ (A drop(x))``; ``needs`` = which of x, A, u need a gradient."""
    need_x, need_a, need_u = needs
    dx = grad_a = grad_u = None
    if need_u:
        grad_u = (dg * _rows(h)).sum(0)  # [r]
    if need_x or need_a:
        dh = dg * u  # [T, r]
        if need_a:
            grad_a = dh.t() @ _rows(_apply_mask(x, keep_mask, keep_prob))  # [r, T] @ [T, d] -> [r, d]
        if need_x:
            dx = dh @ a  # [T, d]
            if keep_mask is not None:
                dx = dx * _rows(keep_mask) / keep_prob
    return dx, grad_a, grad_u


class TiedLoraUpdate(torch.autograd.Function):
    """``s * v ⊙ (B (u ⊙ (A drop(x))))`` in one piece: keeps x (by reference, if A trains), the keep-mask (with
    dropout) and ``h = A x`` [T, r] (if u, B or v trains)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, a, b, u, v, scale: float, keep_mask: Optional[Tensor], keep_prob: float):
        h = _rows(_apply_mask(x, keep_mask, keep_prob)) @ a.t()  # [T, d] @ [d, r] -> [T, r]
        z = ((h * u) @ b.t()) * (scale * v)  # [T, r] @ [r, out] -> [T, out]
        _, need_a, need_b, need_u, need_v = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x if need_a else None, h if (need_u or need_b or need_v) else None, a, b, u, v,
                              keep_mask)
        ctx.scale, ctx.keep_prob = scale, keep_prob
        return z.reshape(*x.shape[:-1], b.shape[0])  # [..., out]

    @staticmethod
    @_autocast_off
    def backward(ctx, dz):
        x, h, a, b, u, v, keep_mask = ctx.saved_tensors
        need_x, need_a, need_b, need_u, need_v = ctx.needs_input_grad[:5]
        g = h * u if (need_b or need_v) else None  # [T, r], recomputed: cheaper than keeping it
        dg, grad_b, grad_v = _up_backward(dz, g, b, v, ctx.scale, (need_x or need_a or need_u, need_b, need_v))
        dx, grad_a, grad_u = (None, None, None) if dg is None else _down_backward(
            dg, x, h, a, u, keep_mask, ctx.keep_prob, (need_x, need_a, need_u))
        if dx is not None:
            dx = dx.reshape(dz.shape[:-1] + (a.shape[1],))
        return dx, grad_a, grad_b, grad_u, grad_v, None, None, None


class TiedLoraDown(torch.autograd.Function):
    """First half of the split form: ``g = u ⊙ (A drop(x))`` [..., r]. Keeps x (if A trains), the keep-mask and
    ``h = A x`` (if u trains)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, a, u, keep_mask: Optional[Tensor], keep_prob: float):
        h = _rows(_apply_mask(x, keep_mask, keep_prob)) @ a.t()  # [T, r]
        _, need_a, need_u = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if need_a else None, h if need_u else None, a, u, keep_mask)
        ctx.keep_prob = keep_prob
        return (h * u).reshape(*x.shape[:-1], a.shape[0])  # [..., r]

    @staticmethod
    @_autocast_off
    def backward(ctx, dg):
        x, h, a, u, keep_mask = ctx.saved_tensors
        dx, grad_a, grad_u = _down_backward(_rows(dg), x, h, a, u, keep_mask, ctx.keep_prob,
                                            tuple(ctx.needs_input_grad[:3]))
        if dx is not None:
            dx = dx.reshape(dg.shape[:-1] + (a.shape[1],))
        return dx, grad_a, grad_u, None, None


class TiedLoraUp(torch.autograd.Function):
    """Second half of the split form: ``z = s * v ⊙ (B g)`` [..., out]. Keeps g [T, r] (if B or v trains)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, g, b, v, scale: float):
        z = (_rows(g) @ b.t()) * (scale * v)  # [T, r] @ [r, out] -> [T, out]
        _, need_b, need_v = ctx.needs_input_grad[:3]
        ctx.save_for_backward(g if (need_b or need_v) else None, b, v)
        ctx.scale = scale
        return z.reshape(*g.shape[:-1], b.shape[0])

    @staticmethod
    @_autocast_off
    def backward(ctx, dz):
        g, b, v = ctx.saved_tensors
        dg, grad_b, grad_v = _up_backward(dz, g, b, v, ctx.scale, tuple(ctx.needs_input_grad[:3]))
        if dg is not None:
            dg = dg.reshape(dz.shape[:-1] + (b.shape[1],))
        return dg, grad_b, grad_v, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the reference composition would compute in: autocast's if it is on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def tied_lora_down(x: Tensor, a: Tensor, u: Tensor, *, keep_mask: Optional[Tensor] = None,
                   keep_prob: float = 1.0) -> Tensor:
    """``g = u ⊙ (A drop(x))``: ``x [..., d]`` -> ``[..., r]`` (see :class:`TiedLoraDown`)."""
    dtype = _compute_dtype(x)
    return TiedLoraDown.apply(x.to(dtype), a.to(dtype), u.to(dtype), keep_mask, keep_prob)


def tied_lora_up(g: Tensor, b: Tensor, v: Tensor, scale: float) -> Tensor:
    """``s * v ⊙ (B g)``: ``g [..., r]`` -> ``[..., out]``; pass a TP rank's rows of B and v for its partition."""
    dtype = _compute_dtype(g)
    return TiedLoraUp.apply(g.to(dtype), b.to(dtype), v.to(dtype), scale)


def fused_tied_lora_update(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    scale: float,
    *,
    keep_mask: Optional[Tensor] = None,
    keep_prob: float = 1.0,
    region: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """The update ``s * v ⊙ (B (u ⊙ (A drop(x))))`` with rank-sized saved state; equal to
    :func:`nemo_tiedlora.core.functional.tied_lora_update` (the reference) in value and in every gradient.

    ``region`` (for tensor/sequence parallelism) is applied to ``g = u ⊙ (A x)`` [..., r] between the two halves;
    without it the one-piece :class:`TiedLoraUpdate` runs. ``keep_mask``/``keep_prob``: dropout on x (see the
    module docstring). Under autocast the factors are cast to autocast's dtype, as ``F.linear`` would.
    """
    if region is not None:
        return tied_lora_up(region(tied_lora_down(x, a, u, keep_mask=keep_mask, keep_prob=keep_prob)), b, v, scale)
    dtype = _compute_dtype(x)
    return TiedLoraUpdate.apply(x.to(dtype), a.to(dtype), b.to(dtype), u.to(dtype), v.to(dtype), scale,
                                keep_mask, keep_prob)
