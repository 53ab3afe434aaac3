"""The NeMo 1.x GPT model config this package builds and restores bases with (nemo glue layer: OmegaConf only).

:func:`llama_gpt_config` is a megatron-core GPT in Llama's layout (RMSNorm, SwiGLU, RoPE, optional GQA, no biases)
with the runtime settings that build, train and restore on CPU (local layer spec, fp32, CPU initialisation, no
fused kernels). The demo's tiny base is built from it and ``import-hf`` writes it, with the imported architecture
over it, into every base it imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


def llama_gpt_config(*, tokenizer: Mapping[str, Any], num_layers: int, hidden_size: int, ffn_hidden_size: int,
                     num_attention_heads: int, num_query_groups: Optional[int], seq_length: int, batch_size: int,
                     lr: float = 3e-3, seed: int = 1234) -> DictConfig:
    """A NeMo 1.x MegatronGPTModel config for a Llama-style model (local layer spec, fp32, CPU-initialised).

    `tokenizer` is the ``model.tokenizer`` section; `batch_size` is the micro and global batch size and `lr` the
    Adam learning rate of ``optim`` (what the demo pre-trains its base with).
    """
    return OmegaConf.create(
        {
            "micro_batch_size": batch_size,
            "global_batch_size": batch_size,
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 1,
            "encoder_seq_length": seq_length,
            "max_position_embeddings": seq_length,
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "ffn_hidden_size": ffn_hidden_size,
            "num_attention_heads": num_attention_heads,
            "num_query_groups": num_query_groups,
            "kv_channels": None,
            "init_method_std": 0.02,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "ffn_dropout": 0.0,
            "apply_query_key_layer_scaling": False,
            "normalization": "rmsnorm",
            "layernorm_epsilon": 1e-5,
            "do_layer_norm_weight_decay": False,
            "make_vocab_size_divisible_by": 128,
            "pre_process": True,
            "post_process": True,
            "persist_layer_norm": False,
            "bias": False,
            "activation": "fast-swiglu",
            "headscale": False,
            "transformer_block_type": "pre_ln",
            "openai_gelu": False,
            "normalize_attention_scores": True,
            "position_embedding_type": "rope",
            "rotary_percentage": 1.0,
            "share_embeddings_and_output_weights": False,
            "mcore_gpt": True,
            "transformer_engine": False,
            "use_cpu_initialization": True,
            "megatron_amp_O2": False,
            "precision": 32,
            "native_amp_init_scale": 4294967296,
            "native_amp_growth_interval": 1000,
            "hysteresis": 2,
            "fp32_residual_connection": False,
            "fp16_lm_cross_entropy": False,
            "seed": seed,
            "onnx_safe": False,
            "apex_transformer_log_level": 30,
            "gradient_as_bucket_view": False,
            "gradient_accumulation_fusion": False,
            "masked_softmax_fusion": False,
            "bias_activation_fusion": False,
            "bias_dropout_add_fusion": False,
            "get_attention_mask_from_fusion": True,
            "apply_rope_fusion": False,
            "cross_entropy_loss_fusion": False,
            "dist_ckpt_load_on_device": False,
            "sequence_parallel": False,
            "tokenizer": dict(tokenizer),
            "data": {
                "data_impl": "mock",
                "data_prefix": [],
                "splits_string": "900,50,50",
                "seq_length": seq_length,
                "num_workers": 0,
                "dataloader_type": "single",
                "skip_warmup": True,
                "index_mapping_dir": None,
            },
            "optim": {"name": "adam", "lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.95]},
        }
    )
