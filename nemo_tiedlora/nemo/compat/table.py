"""THE table of every runtime replacement of a NeMo, megatron-core or torch function that nemo_tiedlora makes
(nemo glue layer). Nothing in the package patches upstream code except through an entry here;
``python -m nemo_tiedlora compat`` lists them all (name, target, kind, scope, reason, needed/installed here).

Fixes are grouped by upstream area in `environment`, `mcore`, `training_state`, `cpu`; the Tied-LoRA hooks live with
the code they serve (`injection`, `grad_hooks`, `adapter_io`, `logs`) and are referenced lazily, so importing this
table imports no NeMo. Order matters: `apply()` installs in this order (fixes before hooks).
"""

from __future__ import annotations

from nemo_tiedlora.nemo.compat import cpu, environment, mcore, training_state
from nemo_tiedlora.nemo.compat.patch import (
    ALWAYS,
    CPU_DIST_OPT_CALLS,
    CPU_ONLY,
    ENVIRONMENT,
    FIX,
    HOOK,
    IMPORT_HF_ONLY,
    LOGGING_ONLY,
    TIEDLORA_ONLY,
    Patch,
    exists,
    lazy,
)

_NLP = "nemo.collections.nlp"
_MIXINS = f"{_NLP}.parts.mixins.nlp_adapter_mixins"
_BASE_MODEL = f"{_NLP}.models.language_modeling.megatron_base_model"
_GPT_MODEL = f"{_NLP}.models.language_modeling.megatron_gpt_model"
_SFT_MODEL = f"{_NLP}.models.language_modeling.megatron_gpt_sft_model"
_MEGATRON_UTILS = f"{_NLP}.modules.common.megatron.utils"
_CUDA_NAMES = ("current_device", "synchronize", "empty_cache", "LongTensor", "FloatTensor", "IntTensor",
               "HalfTensor", "BFloat16Tensor", "ByteTensor", "BoolTensor")

ENVIRONMENT_FIXES: tuple[Patch, ...] = (
    Patch(
        name="nvidia-pytorch-version", kind=FIX, area="environment", scope=ENVIRONMENT,
        target=("os:environ.NVIDIA_PYTORCH_VERSION",),
        reason="megatron_base_model.py MegatronBaseModel._enable_nvidia_optimizations: re.fullmatch(None) TypeError "
               "when NVIDIA_PYTORCH_VERSION is unset (it is set only inside NVIDIA's containers)",
        needed=environment.nvidia_pytorch_version_unset, install=environment.set_nvidia_pytorch_version,
    ),
    Patch(
        name="apex-gate", kind=FIX, area="environment", scope=ALWAYS,
        target=(f"{_NLP}.parts.nlp_overrides:HAVE_APEX",),
        reason="nlp_overrides.py NLPDDPStrategy.__init__ / NLPSaveRestoreConnector raise ImportError('Apex was not "
               "found') although the mcore GPT path uses no apex code",
        needed=environment.apex_transformer_missing, install=environment.open_apex_gate,
    ),
    Patch(
        name="apex-only-names", kind=FIX, area="environment", scope=ALWAYS,
        target=(f"{_NLP}.modules.common.megatron.build_model:set_defaults_if_not_set_tensor_model_parallel_attributes",
                *(f"{_MEGATRON_UTILS}:{name}" for name in ("listify_model", "FusedLayerNorm", "FastLayerNorm",
                                                           "MixedFusedRMSNorm"))),
        reason="build_model.py uses set_defaults_if_not_set_tensor_model_parallel_attributes and megatron/utils.py "
               "uses listify_model, FusedLayerNorm, FastLayerNorm, MixedFusedRMSNorm, all imported only from apex: "
               "NameError",
        needed=environment.apex_only_names_missing, install=environment.define_apex_only_names,
    ),
    Patch(
        name="apex-free-grad-norm", kind=FIX, area="environment", scope=ALWAYS,
        target=(f"{_NLP}.modules.common.megatron.clip_grads:multi_tensor_applier",
                f"{_NLP}.modules.common.megatron.clip_grads:amp_C"),
        reason="megatron/clip_grads.py clip_grad_norm_fp32 (gradient_clip_val > 0) calls apex's multi_tensor_applier "
               "and amp_C.multi_tensor_l2norm unguarded: NameError without apex",
        needed=environment.clip_grads_lacks_apex, install=environment.torch_multi_tensor_l2norm,
    ),
    Patch(
        name="generation-dispatcher-imports", kind=FIX, area="environment", scope=ALWAYS,
        target=tuple(f"sys:modules[{module!r}]" for module in environment.DISPATCHER_IMPORTS),
        reason="text_generation_strategy.py model_inference_strategy_dispatcher imports the NeVA (needs torchvision: "
               "NameError InterpolationMode), Griffin (accelerated_scan/triton) and Mamba models unconditionally: "
               "generation fails for every GPT model without them; the failing modules become stubs",
        needed=environment.dispatcher_imports_fail, install=environment.stub_dispatcher_imports,
    ),
    Patch(
        name="torch-norm-sequence-parallel", kind=FIX, area="environment", scope=ALWAYS,
        target=("megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",),
        reason="megatron/core/transformer/torch_norm.py WrappedTorchNorm (the norm of the local spec without apex) "
               "asserts not sequence_parallel, although only its weights' TP gradient all-reduce is needed (apex's "
               "FusedLayerNorm tags them sequence_parallel)",
        needed=environment.torch_norm_refuses_sequence_parallel, install=environment.torch_norm_sequence_parallel,
    ),
    Patch(
        name="te-free-specs", kind=FIX, area="environment", scope=ALWAYS,
        target=(f"{_GPT_MODEL}:get_specs",),
        reason="megatron_gpt_model.py get_specs builds every spec eagerly, TransformerEngine's too: NameError "
               "TESpecProvider without TransformerEngine even when transformer_engine=False",
        needed=environment.te_specs_built_without_te, install=environment.te_free_specs,
    ),
)

MCORE_FIXES: tuple[Patch, ...] = (
    Patch(
        name="real-process-groups", kind=FIX, area="mcore", scope=ALWAYS,
        target=(f"{_BASE_MODEL}:initialize_model_parallel_for_nemo",),
        reason="megatron_base_model.py builds the model after megatron_init.py fake_initialize_model_parallel, but "
               "megatron-core 0.13 modules need real process groups at construction (process_groups_config.py "
               "ModelCommProcessGroups); the groups are created by nemo_tiedlora.nemo.launch.ensure_process_groups",
        needed=mcore.nemo_fakes_process_groups, install=mcore.real_process_groups,
    ),
    Patch(
        name="nemo-lora-attention-forward", kind=FIX, area="mcore", scope=ALWAYS,
        target=(f"{_NLP}.modules.common.megatron.adapters.mcore_mixins:MCoreSelfAttentionMixin.forward",),
        reason="mcore_mixins.py MCoreSelfAttentionMixin.forward (the attention of NeMo's own lora/ia3 schemes) has "
               "megatron-core 0.11's signature: TypeError on 0.13's inference_context keyword (and it unpacks 5 of "
               "the 6 values _adjust_key_value_for_inference returns). Replaced by megatron-core's forward plus "
               "NeMo's dense LoRA on linear_proj; Tied-LoRA does not use this mixin",
        needed=mcore.attention_mixin_forward_is_stale, install=mcore.attention_mixin_forward,
    ),
)

CHECKPOINT_FIXES: tuple[Patch, ...] = (
    Patch(
        name="resume-epoch-length", kind=FIX, area="lightning", scope=ALWAYS,
        target=(f"{_NLP}.data.language_modeling.megatron.megatron_batch_samplers:MegatronPretrainingBatchSampler."
                "__len__",
                f"{_NLP}.data.language_modeling.megatron.megatron_batch_samplers:"
                "MegatronPretrainingRandomBatchSampler.__len__"),
        reason="megatron_batch_samplers.py MegatronPretraining(Random)BatchSampler.__len__ counts only the batches "
               "left after consumed_samples, while Lightning restores the epoch's batch count on resume: the "
               "resumed epoch ends one step early and restarts the sampler at the resume point, replaying batches "
               "(resumed losses differ from an uninterrupted run). The length becomes the whole epoch's",
        needed=training_state.sampler_length_counts_from_resume_point,
        install=training_state.epoch_length_from_epoch_start,
    ),
    Patch(
        name="peft-checkpoint-chunk-keys", kind=FIX, area="nemo", scope=ALWAYS,
        target=(f"{_MIXINS}:NLPAdapterModelMixin.on_load_checkpoint",),
        reason="nlp_adapter_mixins.py NLPAdapterModelMixin: get_peft_state_dict saves a model held as a list (the "
               "mcore distributed optimizer's [McoreDDP], no virtual pipeline) under 'model_0', on_load_checkpoint "
               "unwraps 'model_<i>' only with a virtual pipeline: the end-of-training best-checkpoint restore "
               "(nemo_model_checkpoint.py on_train_end) fails with 'Unexpected key(s) in state_dict: \"model_0\"' "
               "and no adapter .nemo is written (every PEFT scheme, GPU too). The single chunk is unwrapped before "
               "loading",
        needed=training_state.peft_chunk_keys_disagree, install=training_state.peft_checkpoint_chunk_keys,
    ),
    Patch(
        name="peft-distributed-optimizer-state", kind=FIX, area="nemo", scope=ALWAYS,
        target=(f"{_MIXINS}:NLPAdapterModelMixin.on_save_checkpoint",
                "nemo.core.optim.mcore_optim:McoreDistributedOptimizer.load_state_dict"),
        reason="nlp_overrides.py NLPDDPStrategy.save_checkpoint writes a PEFT run's checkpoint as a plain torch "
               "file, whose optimizer state is mcore_optim.py McoreDistributedOptimizer.state_dict(): megatron's "
               "DistributedOptimizer leaves the Adam moments and main params out of it (distrib_optimizer.py: they "
               "travel only in a distributed checkpoint), and on resume load_state_dict fills them with "
               "torch.empty: garbage moments, NaN factors after the first resumed step (every PEFT scheme, GPU "
               "too). The moments and main params (get_parameter_state_dp_zero) are added to the checkpoint and "
               "scattered back on load (torch Adam's per-parameter 'step' set aside meanwhile: "
               "load_parameter_state_from_dp_zero would look it up: KeyError; and given back as one tensor per "
               "parameter: load_state_dict shares one, which Adam's in-place step += 1 advances once per parameter, "
               "skewing the bias correction after a resume)",
        needed=training_state.peft_checkpoint_lacks_optimizer_moments,
        install=training_state.peft_distributed_optimizer_state,
    ),
)

CPU_FIXES: tuple[Patch, ...] = (
    Patch(
        name="cpu-device", kind=FIX, area="cpu", scope=CPU_ONLY,
        target=(*(f"torch.cuda:{name}" for name in _CUDA_NAMES), "torch:Tensor.cuda", "torch.nn:Module.cuda"),
        reason="torch.cuda.current_device(), Tensor.cuda(), Module.cuda(), torch.cuda.LongTensor & co, synchronize "
               "and empty_cache called unconditionally in NeMo (megatron_gpt_model.py, text_generation_*.py, "
               "dataset_utils) and megatron-core (rotary_pos_embedding.py, transformer_layer.py)",
        needed=cpu.no_cuda, install=cpu.cpu_device,
    ),
    Patch(
        name="cpu-rng", kind=FIX, area="cpu", scope=CPU_ONLY,
        target=("torch.cuda:get_rng_state", "torch.cuda:set_rng_state", "torch.cuda:manual_seed",
                "torch.cuda:manual_seed_all", "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
                "megatron.core.tensor_parallel.random:_set_cuda_rng_state"),
        reason="megatron/core/tensor_parallel/random.py CudaRNGStatesTracker reads and writes the CUDA RNG state",
        needed=cpu.no_cuda, install=cpu.cpu_rng,
    ),
    Patch(
        name="cpu-device-literals", kind=FIX, area="cpu", scope=CPU_ONLY,
        target=tuple(f"{module}:torch" for module in cpu.CUDA_LITERAL_MODULES),
        reason="device='cuda' literals in factory calls: megatron-core schedules.py (total_num_tokens), "
               "transformer/utils.py (get_default_causal_mask), tensor_parallel/data.py, optimizer/clip_grads.py, "
               "optimizer/optimizer.py, utils.py; NeMo megatron/clip_grads.py. Those modules' name `torch` becomes "
               "a stand-in whose factories put device='cuda' tensors on the CPU",
        needed=cpu.no_cuda, install=cpu.cpu_device_literals,
    ),
    Patch(
        name="cpu-distributed-optimizer-type-checks", kind=FIX, area="cpu", scope=CPU_DIST_OPT_CALLS,
        target=cpu.TYPE_CHECKING_CALLS, on_demand=True,
        reason="megatron/core/optimizer/distrib_optimizer.py, optimizer.py and clip_grads.py accept parameters only "
               "if Tensor.type() == 'torch.cuda.FloatTensor' (TypeError for CPU tensors). Those calls run inside "
               "a context that makes a CPU tensor's type() read 'torch.cuda.*'; applied only to runs with "
               "optim.name=mcore_distributed_optim on CPU",
        needed=cpu.optimizer_checks_cuda_type_names, install=cpu.cpu_tensor_type_in_optimizer_calls,
    ),
    Patch(
        name="cpu-cp-stream", kind=FIX, area="cpu", scope=CPU_ONLY,
        target=(f"{_BASE_MODEL}:MegatronBaseModel.setup_transformer_engine_cp_groups",),
        reason="megatron_base_model.py setup_transformer_engine_cp_groups creates torch.cuda.Stream() in setup()",
        needed=cpu.cp_groups_need_a_cuda_stream, install=cpu.cpu_cp_stream,
    ),
)

HOOKS: tuple[Patch, ...] = (
    Patch(
        name="hf-tokenizer-in-archive", kind=HOOK, area="environment", scope=IMPORT_HF_ONLY,
        target=(f"{_BASE_MODEL}:MegatronBaseModel._build_tokenizer",),
        reason="megatron_base_model.py MegatronBaseModel._build_tokenizer passes tokenizer.type (a hub name or an "
               "absolute folder) to AutoTokenizer and .nemo artifacts are single files, so a huggingface tokenizer "
               "cannot travel inside the archive. For archives written by import-hf (tokenizer.type == "
               "'nemo_tiedlora:hf_files') the registered tokenizer.hf_files.* artifacts are assembled into a "
               "temporary folder for AutoTokenizer",
        needed=exists(f"{_BASE_MODEL}:MegatronBaseModel._build_tokenizer"),
        install=lazy("nemo_tiedlora.nemo.hf_base_config:hf_tokenizer_from_archive"),
    ),
    Patch(
        name="log-unused-config-keys", kind=HOOK, area="tiedlora", scope=LOGGING_ONLY,
        target=(f"{_BASE_MODEL}:MegatronBaseModel.build_transformer_config",),
        reason="megatron_base_model.py build_transformer_config is the last of a model's config builds, each of "
               "which logs one warning per unset field (~200 lines): after it, nemo_tiedlora.nemo.logs reports them "
               "in one line",
        needed=exists(f"{_BASE_MODEL}:MegatronBaseModel.build_transformer_config"),
        install=lazy("nemo_tiedlora.nemo.logs:install_flush_hook"),
    ),
    Patch(
        name="tiedlora-add-adapter", kind=HOOK, area="tiedlora", scope=TIEDLORA_ONLY,
        target=(f"{_MIXINS}:NLPAdapterModelMixin.add_adapter",),
        reason="nlp_adapter_mixins.py NLPAdapterModelMixin.add_adapter adds adapters to AdapterModuleMixin modules "
               "only: Tied-LoRA's wrappers around linear_qkv and the shared A/B owner are put in place first, then "
               "NeMo's loop runs unchanged (nemo_tiedlora.nemo.injection)",
        needed=exists(f"{_MIXINS}:NLPAdapterModelMixin.add_adapter"),
        install=lazy("nemo_tiedlora.nemo.injection:install_add_adapter"),
    ),
    Patch(
        name="tiedlora-allreduce-gradients", kind=HOOK, area="tiedlora", scope=TIEDLORA_ONLY,
        target=(f"{_BASE_MODEL}:MegatronBaseModel.allreduce_gradients",),
        reason="megatron_base_model.py allreduce_gradients is the DP all-reduce of plain optimizers: the adapter's "
               "TP/PP gradient sums, replica check and NaN check run just before it (nemo_tiedlora.nemo.grad_hooks)",
        needed=exists(f"{_BASE_MODEL}:MegatronBaseModel.allreduce_gradients"),
        install=lazy("nemo_tiedlora.nemo.grad_hooks:install_allreduce_gradients"),
    ),
    Patch(
        name="tiedlora-finalize-model-grads", kind=HOOK, area="tiedlora", scope=TIEDLORA_ONLY,
        target=(f"{_GPT_MODEL}:finalize_model_grads", f"{_SFT_MODEL}:finalize_model_grads"),
        reason="megatron-core finalize_model_grads.py finalize_model_grads (the distributed optimizer's DP "
               "reduce-scatter), imported by name into megatron_gpt_model.py and megatron_gpt_sft_model.py: the "
               "adapter's gradient sums run just before it (nemo_tiedlora.nemo.grad_hooks)",
        needed=lazy("nemo_tiedlora.nemo.grad_hooks:finalize_model_grads_exists"),
        install=lazy("nemo_tiedlora.nemo.grad_hooks:install_finalize_model_grads"),
    ),
    Patch(
        name="tiedlora-load-adapters", kind=HOOK, area="tiedlora", scope=TIEDLORA_ONLY,
        target=(f"{_MIXINS}:NLPAdapterModelMixin.load_adapters",),
        reason="nlp_adapter_mixins.py NLPAdapterModelMixin.load_adapters (model.peft.restore_from_path) reads "
               "NeMo's per-rank adapter state: a Tied-LoRA archive (TP/PP-independent) is loaded by "
               "nemo_tiedlora.nemo.adapter_io instead; other files go to NeMo's",
        needed=exists(f"{_MIXINS}:NLPAdapterModelMixin.load_adapters"),
        install=lazy("nemo_tiedlora.nemo.adapter_io:install_load_adapters"),
    ),
    Patch(
        name="tiedlora-save-to", kind=HOOK, area="tiedlora", scope=TIEDLORA_ONLY,
        target=(f"{_MIXINS}:NLPAdapterModelMixin.save_to",),
        reason="modelPT.py ModelPT.save_to (what exp_manager calls for the adapter .nemo) writes NeMo's per-rank "
               "state: a Tied-LoRA model writes its TP/PP-independent archive (nemo_tiedlora.nemo.adapter_io); "
               "other models call ModelPT.save_to",
        needed=exists("nemo.core.classes.modelPT:ModelPT.save_to"),
        install=lazy("nemo_tiedlora.nemo.adapter_io:install_save_to"),
    ),
)

PATCHES: tuple[Patch, ...] = ENVIRONMENT_FIXES + MCORE_FIXES + CHECKPOINT_FIXES + CPU_FIXES + HOOKS
