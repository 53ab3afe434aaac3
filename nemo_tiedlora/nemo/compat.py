"""Compatibility fixes for nemo_toolkit 2.4.1 + megatron-core 0.13.1 outside NVIDIA's containers.

This is the one place that patches upstream code at run time (site-packages are never edited). Every fix is a
`Fix` in `FIXES` naming the upstream defect it covers, the scope in which the defect exists, and a `needed()`
test, so a fix is applied only where its defect is present:

- ``environment``: NeMo's 1.x NLP collection outside NVIDIA's PyTorch container (no apex, no TransformerEngine,
  no ``NVIDIA_PYTORCH_VERSION``). Applies on CPU and GPU machines alike; inside the container none is needed.
- ``mcore``: NeMo 2.4.1 against megatron-core 0.13 (both on GPU and CPU).
- ``lightning``: NeMo 2.4.1's data path against Lightning 2.x's loop bookkeeping (everywhere).
- ``nemo``: NeMo 2.4.1 disagreeing with itself (everywhere, GPU included).
- ``cpu``: CUDA-only calls in NeMo and megatron-core on a machine without a CUDA device. ``needed()`` is false
  wherever ``torch.cuda.is_available()``, so the GPU path stays untouched by CPU-only fixes.

``apply()`` is idempotent and returns the fixes in force; ``python -m nemo_tiedlora compat`` prints the table.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

_APPLIED: dict[str, "Fix"] = {}


@dataclass(frozen=True)
class Fix:
    """One run-time fix for one upstream defect."""

    name: str
    scope: str  # "environment" | "mcore" | "lightning" | "nemo" | "cpu"
    defect: str  # the upstream defect, with the file it lives in
    needed: Callable[[], bool]
    patch: Callable[[], None]
    on_demand: bool = False  # applied by apply(only=...) for the runs that need it, not by a plain apply()


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


def _have_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# environment: outside NVIDIA's container
# ----------------------------------------------------------------------------------------------------------------
def _nvidia_version_env() -> None:
    os.environ["NVIDIA_PYTORCH_VERSION"] = "25.07"


def _apex_gate() -> None:
    import nemo.collections.nlp.parts.nlp_overrides as nlo

    nlo.HAVE_APEX = True


def _apex_only_names() -> None:
    import nemo.collections.nlp.modules.common.megatron.build_model as build_model
    import nemo.collections.nlp.modules.common.megatron.utils as mutils
    from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes

    if not hasattr(build_model, "set_defaults_if_not_set_tensor_model_parallel_attributes"):
        build_model.set_defaults_if_not_set_tensor_model_parallel_attributes = (
            set_defaults_if_not_set_tensor_model_parallel_attributes
        )
    if not hasattr(mutils, "listify_model"):
        mutils.listify_model = lambda model: model if isinstance(model, list) else [model]
    for name, norm in (
        ("FusedLayerNorm", torch.nn.LayerNorm),
        ("FastLayerNorm", torch.nn.LayerNorm),
        ("MixedFusedRMSNorm", torch.nn.RMSNorm),
    ):
        if not hasattr(mutils, name):
            setattr(mutils, name, norm)


def _apex_names_missing() -> bool:
    import nemo.collections.nlp.modules.common.megatron.utils as mutils

    return not hasattr(mutils, "listify_model")


def _torch_multi_tensor_l2norm() -> None:
    import nemo.collections.nlp.modules.common.megatron.clip_grads as clip_grads

    def multi_tensor_applier(op, overflow_buf, tensor_lists, per_tensor):  # apex signature, l2norm only
        norms = [torch.linalg.vector_norm(t.float()) for t in tensor_lists[0]]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float32)
        return total, None

    clip_grads.multi_tensor_applier = multi_tensor_applier
    clip_grads.amp_C = types.SimpleNamespace(multi_tensor_l2norm="l2norm")


def _clip_grads_lacks_apex() -> bool:
    import nemo.collections.nlp.modules.common.megatron.clip_grads as clip_grads

    return not hasattr(clip_grads, "multi_tensor_applier")


_DISPATCHER_IMPORTS = {
    # module imported unconditionally by text_generation_strategy.model_inference_strategy_dispatcher: class used
    "nemo.collections.multimodal.models.multimodal_llm.neva.neva_model": "MegatronNevaModel",  # torchvision
    "nemo.collections.nlp.models.language_modeling.megatron_griffin_model": "MegatronGriffinModel",  # accelerated_scan
    "nemo.collections.nlp.models.language_modeling.megatron_mamba_model": "MegatronMambaModel",  # mamba_ssm
}


def _dispatcher_imports_fail() -> bool:
    import importlib

    for module in _DISPATCHER_IMPORTS:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - any failure here is the defect (NameError without torchvision)
            return True
    return False


def _stub_dispatcher_imports() -> None:
    import importlib

    for module, class_name in _DISPATCHER_IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            stub = types.ModuleType(module)
            # A class no model is an instance of: the dispatcher's isinstance test is simply false.
            setattr(stub, class_name, type(class_name, (), {}))
            sys.modules[module] = stub


def _torch_norm_sequence_parallel() -> None:
    import copy

    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_nemo_tiedlora_fix", False):
        return

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        local = copy.copy(config)  # never mutate the shared config
        local.sequence_parallel = False
        norm = original_new(cls, local, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            # as apex's FusedLayerNorm does: NeMo / megatron all-reduce these grads over the TP group
            param.sequence_parallel = True
        return norm

    __new__._nemo_tiedlora_fix = True
    torch_norm.WrappedTorchNorm.__new__ = __new__


def _torch_norm_refuses_sequence_parallel() -> bool:
    return not _have_module("apex")


def _te_free_specs() -> None:
    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model as gpt_model

    original = gpt_model.get_specs
    if getattr(original, "_nemo_tiedlora_fix", False):
        return

    def get_specs(spec_name, transformer_config=None, use_te=True, hyena_cfg=None, fp8=False):
        if spec_name == "" and not use_te:
            num_experts = transformer_config.num_moe_experts if transformer_config else None
            grouped = transformer_config.moe_grouped_gemm if transformer_config else False
            return gpt_model.get_gpt_layer_local_spec(num_experts, grouped)
        return original(spec_name, transformer_config, use_te, hyena_cfg, fp8)

    get_specs._nemo_tiedlora_fix = True
    gpt_model.get_specs = get_specs


def _te_missing() -> bool:
    return not _have_module("transformer_engine")


# ----------------------------------------------------------------------------------------------------------------
# mcore: NeMo 2.4.1 vs megatron-core 0.13
# ----------------------------------------------------------------------------------------------------------------
def _real_process_groups() -> None:
    import nemo.collections.nlp.models.language_modeling.megatron_base_model as base_model

    original = base_model.initialize_model_parallel_for_nemo
    if getattr(original, "_nemo_tiedlora_fix", False):
        return

    def initialize_model_parallel_for_nemo(*args, **kwargs):
        original(*args, **kwargs)
        ensure_process_groups(
            world_size=kwargs["world_size"],
            global_rank=kwargs["global_rank"],
            tensor_model_parallel_size=kwargs.get("tensor_model_parallel_size", 1),
            pipeline_model_parallel_size=kwargs.get("pipeline_model_parallel_size", 1),
            virtual_pipeline_model_parallel_size=kwargs.get("virtual_pipeline_model_parallel_size"),
            context_parallel_size=kwargs.get("context_parallel_size", 1),
            seed=kwargs.get("seed", 1234),
        )

    initialize_model_parallel_for_nemo._nemo_tiedlora_fix = True
    base_model.initialize_model_parallel_for_nemo = initialize_model_parallel_for_nemo


def ensure_process_groups(
    *,
    world_size: int,
    global_rank: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """Create the real torch.distributed and megatron-core groups before NeMo builds the model.

    megatron-core 0.13 modules read their process groups at construction, while NeMo 1.x only *fakes* the
    model-parallel init there and creates the groups later in ``NLPDDPStrategy.setup_distributed`` (which skips
    them when they already exist). Launch multi-process runs with torchrun (or SLURM), so every rank exists now.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_tiedlora.nemo.launch import dist_timeout

    timeout = dist_timeout()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A private port, not exported: child processes (e.g. a script this one launches) must not inherit it.
            from nemo_tiedlora.nemo.launch import free_port

            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            init_method = "env://"
        # A bounded wait for a lost rank (launch.dist_timeout; torch's default is 30 minutes).
        dist.init_process_group(backend=backend, init_method=init_method, rank=global_rank, world_size=world_size,
                                timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            distributed_timeout_minutes=int(max(1, timeout.total_seconds() // 60)),
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
        )
        model_parallel_cuda_manual_seed(seed)
        # NLPDDPStrategy.setup_distributed skips NeMo's init_model_parallel once the groups exist, and with it
        # the AppState fields it fills in; checkpoint saving reads them (data_parallel_rank == 0 saves).
        from nemo.utils import AppState

        app_state = AppState()
        app_state.tensor_model_parallel_group = parallel_state.get_tensor_model_parallel_group()
        app_state.data_parallel_group = parallel_state.get_data_parallel_group()
        app_state.data_parallel_rank = parallel_state.get_data_parallel_rank()
        app_state.data_parallel_size = parallel_state.get_data_parallel_world_size()
        app_state.pipeline_model_parallel_group = parallel_state.get_pipeline_model_parallel_group()




# ----------------------------------------------------------------------------------------------------------------
# cpu: CUDA-only calls on a machine without CUDA
# ----------------------------------------------------------------------------------------------------------------
def _cpu_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    for name in ("LongTensor", "FloatTensor", "IntTensor", "HalfTensor", "BFloat16Tensor", "ByteTensor", "BoolTensor"):
        setattr(torch.cuda, name, getattr(torch, name))


def _cpu_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)


class _CudaLiteralsToCpu(types.ModuleType):
    """Stands in for ``torch`` inside one upstream module: factory calls with device="cuda" get the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "ones_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name not in self._FACTORIES:
            return value

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if (isinstance(device, str) and device.startswith("cuda")) or (
                isinstance(device, torch.device) and device.type == "cuda"
            ):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return factory


_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # forward_backward_*: torch.zeros([], device="cuda")
    "megatron.core.transformer.utils",  # get_default_causal_mask: torch.ones(sq, sq, device="cuda")
    "megatron.core.tensor_parallel.data",  # broadcast_data: torch.empty(..., device="cuda")
    "megatron.core.optimizer.clip_grads",  # get_grad_norm_fp32: torch.tensor(..., device="cuda")
    "megatron.core.optimizer.optimizer",  # found-inf buffers: torch.tensor(..., device="cuda")
    "megatron.core.utils",  # device-side helpers: torch.tensor(..., device="cuda")
    "nemo.collections.nlp.modules.common.megatron.clip_grads",  # clip_grad_norm_fp32: torch.zeros(1, device="cuda")
)


def _cpu_device_literals() -> None:
    import importlib

    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CudaLiteralsToCpu):
            module.torch = _CudaLiteralsToCpu()


def _cpu_cp_stream() -> None:
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    MegatronBaseModel.setup_transformer_engine_cp_groups = lambda self: None


def _cpu_tensor_type() -> None:
    original = torch.Tensor.type
    if getattr(original, "_nemo_tiedlora_fix", False):
        return

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    tensor_type._nemo_tiedlora_fix = True
    torch.Tensor.type = tensor_type


def _attention_mixin_forward_is_stale() -> bool:
    import inspect

    from nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins import MCoreSelfAttentionMixin

    return "inference_context" not in inspect.signature(MCoreSelfAttentionMixin.forward).parameters


def _attention_mixin_forward() -> None:
    from megatron.core.transformer.attention import SelfAttention
    from nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins import MCoreSelfAttentionMixin
    from nemo.collections.nlp.modules.common.megatron.adapters.parallel_adapters import AdapterName

    if getattr(MCoreSelfAttentionMixin.forward, "_nemo_tiedlora_fix", False):
        return

    def forward(self, *args, **kwargs):
        # megatron-core's own forward (current signature and return arity); it calls the mixin's
        # get_query_key_value_tensors, where NeMo applies its QKV LoRA / IA3 / ptuning adapters.
        dense = None
        if self.is_adapter_available():
            dense = self.get_adapter_module(AdapterName.LORA_DENSE_ATTENTION_ADAPTER)
            if dense is not None and not self.adapter_cfg[AdapterName.LORA_DENSE_ATTENTION_ADAPTER]["enabled"]:
                dense = None
        if dense is None:
            return SelfAttention.forward(self, *args, **kwargs)

        def add_dense_lora(_module, inputs, output):  # NeMo: output = linear_proj(x) + lora(x)
            out, bias = output
            return out + dense(inputs[0]), bias

        handle = self.linear_proj.register_forward_hook(add_dense_lora)
        try:
            return SelfAttention.forward(self, *args, **kwargs)
        finally:
            handle.remove()

    forward._nemo_tiedlora_fix = True
    MCoreSelfAttentionMixin.forward = forward


# ----------------------------------------------------------------------------------------------------------------
# lightning: NeMo's batch samplers vs Lightning's restored loop state
# ----------------------------------------------------------------------------------------------------------------
def _epoch_length_from_epoch_start() -> None:
    import copy

    from nemo.collections.nlp.data.language_modeling.megatron import megatron_batch_samplers as samplers

    for cls in (samplers.MegatronPretrainingBatchSampler, samplers.MegatronPretrainingRandomBatchSampler):
        original = cls.__len__
        if getattr(original, "_nemo_tiedlora_fix", False):
            continue

        def __len__(self, _original=original):
            # Lightning counts an epoch's batches from the epoch's start and restores that count on resume; the
            # sampler still yields only the batches not yet consumed, so the two meet at the epoch's end.
            probe = copy.copy(self)
            probe.consumed_samples = 0
            return _original(probe)

        __len__._nemo_tiedlora_fix = True
        cls.__len__ = __len__


# ----------------------------------------------------------------------------------------------------------------
# nemo: the PEFT checkpoint of a model held as a list of chunks without a virtual pipeline
# ----------------------------------------------------------------------------------------------------------------
def _peft_checkpoint_chunk_keys() -> None:
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin

    original = NLPAdapterModelMixin.on_load_checkpoint
    if getattr(original, "_nemo_tiedlora_fix", False):
        return

    def on_load_checkpoint(self, checkpoint) -> None:
        # get_peft_state_dict saves a list-held model (the distributed optimizer keeps [McoreDDP(chunk)] even
        # without a virtual pipeline) as {"model_0": {...}}; on_load_checkpoint unwraps "model_<i>" only under a
        # virtual pipeline. Unwrap the single chunk here; NeMo's hook then loads it (and empties it, as it does).
        state = checkpoint.get("state_dict")
        model = getattr(self, "model", None)
        if (isinstance(model, list) and len(model) == 1 and self.cfg.get("virtual_pipeline_model_parallel_size") is None
                and isinstance(state, dict) and set(state) == {"model_0"}):
            checkpoint["state_dict"] = state["model_0"]
        return original(self, checkpoint)

    on_load_checkpoint._nemo_tiedlora_fix = True
    NLPAdapterModelMixin.on_load_checkpoint = on_load_checkpoint


PARAM_STATE_KEY = "nemo_tiedlora:distributed_optimizer_param_state"


def _dist_optimizers(optimizer) -> list:
    """The megatron DistributedOptimizers behind NeMo's McoreDistributedOptimizer (chained or not)."""
    inner = getattr(optimizer, "mcore_optimizer", None)
    if inner is None:
        return []
    chained = getattr(inner, "chained_optimizers", None) or [inner]
    return [opt for opt in chained if hasattr(opt, "get_parameter_state_dp_zero")]


def _peft_distributed_optimizer_state() -> None:
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
    from nemo.core.optim.mcore_optim import McoreDistributedOptimizer

    if getattr(NLPAdapterModelMixin.__dict__.get("on_save_checkpoint"), "_nemo_tiedlora_fix", False):
        return

    def on_save_checkpoint(self, checkpoint) -> None:
        super(NLPAdapterModelMixin, self).on_save_checkpoint(checkpoint)
        if not (getattr(self, "use_peft", False) and getattr(self, "setup_complete", False)):
            return
        trainer = getattr(self, "_trainer", None)
        optimizers = trainer.optimizers if trainer is not None else []
        states = checkpoint.get("optimizer_states") or []
        for optimizer, state in zip(optimizers, states):
            dist_opts = _dist_optimizers(optimizer)
            if dist_opts and isinstance(state, dict):
                # collective over the data-parallel group: every rank dumps the checkpoint, DP rank 0 gets it all
                state[PARAM_STATE_KEY] = [opt.get_parameter_state_dp_zero() for opt in dist_opts]

    on_save_checkpoint._nemo_tiedlora_fix = True
    NLPAdapterModelMixin.on_save_checkpoint = on_save_checkpoint

    original_load = McoreDistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        param_states = state_dict.pop(PARAM_STATE_KEY, None) if isinstance(state_dict, dict) else None
        original_load(self, state_dict)
        if param_states is not None:  # every DP rank read the same file; DP rank 0 scatters the shards
            with torch.no_grad():  # fp32 main params are views of the trained parameters
                for opt, param_state in zip(_dist_optimizers(self), param_states):
                    # torch's Adam keeps a "step" tensor per parameter (set from param_groups by load_state_dict)
                    # that the parameter state does not carry: megatron would look it up there (KeyError)
                    inner = opt.optimizer.state
                    steps = {param: state.pop("step") for param, state in inner.items() if "step" in state}
                    opt.load_parameter_state_from_dp_zero(param_state)
                    for param, step in steps.items():  # one tensor each: megatron hands every parameter the
                        inner[param]["step"] = step.clone()  # same one, which Adam's in-place += 1 would count N times

    load_state_dict._nemo_tiedlora_fix = True
    McoreDistributedOptimizer.load_state_dict = load_state_dict


# ----------------------------------------------------------------------------------------------------------------
# environment: a Hugging Face tokenizer carried inside the .nemo
# ----------------------------------------------------------------------------------------------------------------
HF_TOKENIZER_IN_ARCHIVE = "nemo_tiedlora:hf_files"  # tokenizer.type of a .nemo whose HF tokenizer is in the archive


def _hf_tokenizer_from_archive() -> None:
    import shutil
    import tempfile

    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel
    from omegaconf import open_dict

    original = MegatronBaseModel._build_tokenizer
    if getattr(original, "_nemo_tiedlora_fix", False):
        return

    def _build_tokenizer(self):
        tok = self._cfg.tokenizer
        if tok.get("library") != "huggingface" or tok.get("type") != HF_TOKENIZER_IN_ARCHIVE:
            return original(self)
        # tokenizer.hf_files.<name with '.' as '_'>: one registered artifact per file (NeMo's artifacts are files)
        folder = tempfile.mkdtemp(prefix="tiedlora-hf-tokenizer-")
        try:
            for key in list(tok.hf_files.keys()):
                path = self.register_artifact(f"tokenizer.hf_files.{key}", tok.hf_files[key])
                stem, ext = key.rsplit("_", 1)
                shutil.copyfile(path, os.path.join(folder, f"{stem}.{ext}"))
            with open_dict(self._cfg):
                tok.type = folder  # AutoTokenizer.from_pretrained(folder): read into memory now
            original(self)
        finally:
            with open_dict(self._cfg):
                tok.type = HF_TOKENIZER_IN_ARCHIVE
            shutil.rmtree(folder, ignore_errors=True)

    _build_tokenizer._nemo_tiedlora_fix = True
    MegatronBaseModel._build_tokenizer = _build_tokenizer


FIXES: tuple[Fix, ...] = (
    Fix(
        "nvidia-pytorch-version",
        "environment",
        "megatron_base_model.py MegatronBaseModel._enable_nvidia_optimizations: re.fullmatch(None) TypeError when "
        "NVIDIA_PYTORCH_VERSION is unset (it is set only inside NVIDIA's containers)",
        lambda: "NVIDIA_PYTORCH_VERSION" not in os.environ,
        _nvidia_version_env,
    ),
    Fix(
        "apex-gate",
        "environment",
        "nlp_overrides.py NLPDDPStrategy.__init__ / NLPSaveRestoreConnector raise ImportError('Apex was not found') "
        "although the mcore GPT path uses no apex code",
        lambda: not _have_module("apex.transformer"),
        _apex_gate,
    ),
    Fix(
        "apex-only-names",
        "environment",
        "build_model.py uses set_defaults_if_not_set_tensor_model_parallel_attributes and megatron/utils.py uses "
        "listify_model, FusedLayerNorm, FastLayerNorm, MixedFusedRMSNorm, all imported only from apex: NameError",
        _apex_names_missing,
        _apex_only_names,
    ),
    Fix(
        "apex-free-grad-norm",
        "environment",
        "megatron/clip_grads.py clip_grad_norm_fp32 (gradient_clip_val > 0) calls apex's multi_tensor_applier and "
        "amp_C.multi_tensor_l2norm unguarded: NameError without apex",
        _clip_grads_lacks_apex,
        _torch_multi_tensor_l2norm,
    ),
    Fix(
        "generation-dispatcher-imports",
        "environment",
        "text_generation_strategy.py model_inference_strategy_dispatcher imports the NeVA (needs torchvision: "
        "NameError InterpolationMode), Griffin (accelerated_scan/triton) and Mamba models unconditionally: "
        "generation fails for every GPT model without them",
        _dispatcher_imports_fail,
        _stub_dispatcher_imports,
    ),
    Fix(
        "torch-norm-sequence-parallel",
        "environment",
        "megatron/core/transformer/torch_norm.py WrappedTorchNorm (the norm of the local spec without apex) asserts "
        "not sequence_parallel, although only its weights' TP gradient all-reduce is needed (apex's FusedLayerNorm "
        "tags them sequence_parallel)",
        _torch_norm_refuses_sequence_parallel,
        _torch_norm_sequence_parallel,
    ),
    Fix(
        "te-free-specs",
        "environment",
        "megatron_gpt_model.py get_specs builds every spec eagerly, TransformerEngine's too: NameError "
        "TESpecProvider without TransformerEngine even when transformer_engine=False",
        _te_missing,
        _te_free_specs,
    ),
    Fix(
        "real-process-groups",
        "mcore",
        "megatron_base_model.py builds the model after megatron_init.fake_initialize_model_parallel, but "
        "megatron-core 0.13 modules need real process groups at construction (ModelCommProcessGroups)",
        lambda: True,
        _real_process_groups,
    ),
    Fix(
        "nemo-lora-attention-forward",
        "mcore",
        "mcore_mixins.py MCoreSelfAttentionMixin.forward (the attention of NeMo's own lora/ia3 schemes) has "
        "megatron-core 0.11's signature: TypeError on 0.13's inference_context keyword (and it unpacks 5 of the 6 "
        "values _adjust_key_value_for_inference returns). Replaced by megatron-core's forward plus NeMo's dense "
        "LoRA on linear_proj; Tied-LoRA does not use this mixin",
        _attention_mixin_forward_is_stale,
        _attention_mixin_forward,
    ),
    Fix(
        "resume-epoch-length",
        "lightning",
        "megatron_batch_samplers.py MegatronPretraining(Random)BatchSampler.__len__ counts only the batches left "
        "after consumed_samples, while Lightning restores the epoch's batch count on resume: the resumed epoch "
        "ends one step early and restarts the sampler at the resume point, replaying batches (resumed losses "
        "differ from an uninterrupted run). The length becomes the whole epoch's",
        lambda: True,
        _epoch_length_from_epoch_start,
    ),
    Fix(
        "peft-checkpoint-chunk-keys",
        "nemo",
        "nlp_adapter_mixins.py NLPAdapterModelMixin: get_peft_state_dict saves a model held as a list (the mcore "
        "distributed optimizer's [McoreDDP], no virtual pipeline) under 'model_0', on_load_checkpoint unwraps "
        "'model_<i>' only with a virtual pipeline: the end-of-training best-checkpoint restore "
        "(nemo_model_checkpoint.py on_train_end) fails with 'Unexpected key(s) in state_dict: \"model_0\"' and no "
        "adapter .nemo is written (every PEFT scheme, GPU too). The single chunk is unwrapped before loading",
        lambda: True,
        _peft_checkpoint_chunk_keys,
    ),
    Fix(
        "peft-distributed-optimizer-state",
        "nemo",
        "nlp_overrides.py NLPDDPStrategy.save_checkpoint writes a PEFT run's checkpoint as a plain torch file, whose "
        "optimizer state is mcore_optim.py McoreDistributedOptimizer.state_dict(): megatron's DistributedOptimizer "
        "leaves the Adam moments and main params out of it (distrib_optimizer.py: they travel only in a "
        "distributed checkpoint), and on resume load_state_dict fills them with torch.empty: garbage moments, NaN "
        "factors after the first resumed step (every PEFT scheme, GPU too). The moments and main params "
        "(get_parameter_state_dp_zero) are added to the checkpoint and scattered back on load (torch Adam's per-"
        "parameter 'step' set aside meanwhile: load_parameter_state_from_dp_zero would look it up: KeyError; and "
        "given back as one tensor per parameter: load_state_dict shares one, which Adam's in-place step += 1 "
        "advances once per parameter, skewing the bias correction after a resume)",
        lambda: True,
        _peft_distributed_optimizer_state,
    ),
    Fix(
        "cpu-device",
        "cpu",
        "torch.cuda.current_device(), Tensor.cuda(), Module.cuda(), torch.cuda.LongTensor & co, synchronize and "
        "empty_cache called unconditionally in NeMo (megatron_gpt_model.py, text_generation_*.py, dataset_utils) "
        "and megatron-core (rotary_pos_embedding.py, transformer_layer.py)",
        _no_cuda,
        _cpu_device,
    ),
    Fix(
        "cpu-rng",
        "cpu",
        "megatron/core/tensor_parallel/random.py CudaRNGStatesTracker reads and writes the CUDA RNG state",
        _no_cuda,
        _cpu_rng,
    ),
    Fix(
        "cpu-device-literals",
        "cpu",
        "device='cuda' literals in factory calls: megatron-core schedules.py (total_num_tokens), "
        "transformer/utils.py (get_default_causal_mask), tensor_parallel/data.py, optimizer/clip_grads.py, "
        "optimizer/optimizer.py, utils.py; NeMo megatron/clip_grads.py",
        _no_cuda,
        _cpu_device_literals,
    ),
    Fix(
        "cpu-distributed-optimizer-type-checks",
        "cpu",
        "megatron/core/optimizer/distrib_optimizer.py, optimizer.py and clip_grads.py accept parameters only if "
        "Tensor.type() == 'torch.cuda.FloatTensor' (TypeError for CPU tensors). Applied only to runs with "
        "optim.name=mcore_distributed_optim on CPU: it makes a CPU tensor's type() read 'torch.cuda.*'",
        _no_cuda,
        _cpu_tensor_type,
        on_demand=True,
    ),
    Fix(
        "cpu-cp-stream",
        "cpu",
        "megatron_base_model.py setup_transformer_engine_cp_groups creates torch.cuda.Stream() in setup()",
        _no_cuda,
        _cpu_cp_stream,
    ),
    Fix(
        "hf-tokenizer-in-archive",
        "environment",
        "megatron_base_model.py MegatronBaseModel._build_tokenizer passes tokenizer.type (a hub name or an absolute "
        "folder) to AutoTokenizer and .nemo artifacts are single files, so a huggingface tokenizer cannot travel "
        "inside the archive. For archives written by import-hf (tokenizer.type == 'nemo_tiedlora:hf_files') the "
        "registered tokenizer.hf_files.* artifacts are assembled into a temporary folder for AutoTokenizer",
        lambda: True,
        _hf_tokenizer_from_archive,
    ),
)


def apply(*, on_demand: tuple[str, ...] = ()) -> list[Fix]:
    """Apply every fix whose defect is present here (idempotent), plus the named on-demand fixes; return the
    fixes in force."""
    unknown = set(on_demand) - {fix.name for fix in FIXES if fix.on_demand}
    if unknown:
        raise ValueError(f"unknown on-demand fixes {sorted(unknown)}")
    for fix in FIXES:
        if fix.name in _APPLIED or (fix.on_demand and fix.name not in on_demand):
            continue
        if fix.needed():
            fix.patch()
            _APPLIED[fix.name] = fix
            logger.debug("nemo_tiedlora compat: applied %s (%s)", fix.name, fix.defect)
    return list(_APPLIED.values())


def applied() -> list[Fix]:
    """The fixes applied in this process so far."""
    return list(_APPLIED.values())


def describe() -> str:
    """A plain-text table of every fix: name, scope, whether it is applied here, and the defect it covers."""
    lines = [f"{'fix':<24} {'scope':<12} {'here':<8} upstream defect"]
    for fix in FIXES:
        state = "applied" if fix.name in _APPLIED else "-"
        lines.append(f"{fix.name:<24} {fix.scope:<12} {state:<8} {fix.defect}")
    return "\n".join(lines)
