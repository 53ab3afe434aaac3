"""One fine-tuning run of the tiny base under torchrun (gloo on CPU), recording what the equivalence tests compare.

    torchrun --nproc_per_node=N tests/distributed/driver.py --base B --data D --out O.pt --tp 2 --pp 1 ...

Runs the project's finetuning YAML through nemo_tiedlora.nemo.finetune (the code behind the entry script) with a
callback that records, on global rank 0, the loss and NeMo's gradient norm (before clipping at --clip) of every
step; at the end it gathers the adapter state (A, B once, u/v by global layer), checks that every replica is bitwise
identical on all ranks, and rank 0 saves everything to --out.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True, help="folder with train.jsonl and validation.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--vpp", type=int, default=None, help="virtual_pipeline_model_parallel_size")
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--o2", action="store_true", help="megatron_amp_O2 with a bf16 model (VPP needs it)")
    parser.add_argument("--optim", default="adam")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eps", type=float, default=1e-8,
                        help="Adam's epsilon; with eps >> |grad| Adam is momentum SGD with step lr / eps")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--clip", type=float, default=1.0e9,
                        help="trainer.gradient_clip_val (default: so large that clipping never changes a step)")
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--preset", default="tl6")
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl)")
    parser.add_argument("--te", action="store_true", help="TransformerEngine layer spec (GPU)")
    parser.add_argument("--save-adapter", help="write the adapter archive here after training")
    parser.add_argument("--load-adapter", help="start from this adapter archive (model.peft.restore_from_path)")
    parser.add_argument("--logits-out", help="no training: run one validation batch and write the full-vocabulary "
                        "logits of the model's output layer here (from the last stage's TP rank 0), and the batch's "
                        "input ids to LOGITS_OUT.input_ids.pt (from global rank 0)")
    parser.add_argument("--max-seq-length", type=int, default=64, help="max_seq_length of the train/validation data")
    parser.add_argument("--adapter-dim", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=None, help="model.peft.tiedlora_tuning.adapter_dropout")
    parser.add_argument("--skip-grad-sum", action="store_true",
                        help="negative control: disable the TP/PP gradient sums (the equivalence must then fail)")
    return parser.parse_args()


def main() -> None:
    args = parse()
    from lightning.pytorch import Callback
    from omegaconf import OmegaConf, open_dict

    from nemo_tiedlora.nemo.finetune import build, tuning_config
    from nemo_tiedlora.nemo.launch import finish_distributed
    from nemo_tiedlora.nemo.adapter_state import gather_adapter_state
    from nemo_tiedlora.nemo.reduction_stats import STATS
    from nemo_tiedlora.nemo.replica_check import check_replicas

    STATS.timed = True  # the report's reduction seconds (a device synchronize around each one on CUDA)
    cfg = tuning_config("finetuning")
    world = int(os.environ.get("WORLD_SIZE", 1))
    with open_dict(cfg):
        cfg.trainer.update(accelerator=args.accelerator, devices=world, precision=32, max_steps=args.steps,
                           val_check_interval=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                           log_every_n_steps=1, enable_progress_bar=False, gradient_clip_val=args.clip)
        cfg.exp_manager = None
        cfg.model.update(restore_from_path=args.base, tensor_model_parallel_size=args.tp,
                         pipeline_model_parallel_size=args.pp, sequence_parallel=args.sp,
                         global_batch_size=args.gbs, micro_batch_size=args.mbs)
        if args.te:
            cfg.model.transformer_engine = True
        if args.vpp:
            cfg.model.virtual_pipeline_model_parallel_size = args.vpp
        if args.o2:
            cfg.model.megatron_amp_O2 = True
            cfg.trainer.precision = "bf16-mixed"
        if args.first_stage_layers:
            cfg.model.num_layers_in_first_pipeline_stage = args.first_stage_layers
        cfg.model.optim = OmegaConf.create({"name": args.optim, "lr": args.lr, "weight_decay": 0.0,
                                           "betas": [0.9, 0.98], "eps": args.eps})
        cfg.model.peft.tiedlora_tuning.preset = args.preset
        cfg.model.peft.tiedlora_tuning.adapter_dim = args.adapter_dim
        cfg.model.peft.tiedlora_tuning.check_replicas_every = 2
        if args.dropout is not None:
            cfg.model.peft.tiedlora_tuning.adapter_dropout = args.dropout
        for split, name in (("train_ds", "train.jsonl"), ("validation_ds", "validation.jsonl")):
            cfg.model.data[split].file_names = [str(Path(args.data) / name)]
            cfg.model.data[split].max_seq_length = args.max_seq_length
            cfg.model.data[split].memmap_workers = 1
            cfg.model.data[split].shuffle = False
        cfg.model.data.validation_ds.names = ["validation"]
        cfg.model.peft.restore_from_path = args.load_adapter

    class Recorder(Callback):
        def __init__(self):
            self.losses, self.grad_norms, self.step_seconds = [], [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.step_seconds.append(time.perf_counter() - self.started)
            metrics = trainer.callback_metrics
            self.losses.append(float(metrics["reduced_train_loss"]))
            self.grad_norms.append(float(metrics["grad_norm"]) if "grad_norm" in metrics else float("nan"))

    if args.skip_grad_sum:
        import nemo_tiedlora.nemo.grad_sync as grad_sync

        grad_sync.reduce_adapter_grads = lambda chunks: None

    recorder = Recorder()
    if args.logits_out:
        with open_dict(cfg):
            cfg.trainer.limit_val_batches = 1
    trainer, model, _, _ = build(cfg, callbacks=[recorder])
    if args.logits_out:
        write_logits(trainer, model, args.logits_out)
        if torch.distributed.get_rank() == 0:
            torch.save({"logits_out": args.logits_out}, args.out)
        finish_distributed()
        return
    initial = gather_adapter_state(model)
    if args.steps > 0:
        trainer.fit(model)
    if args.save_adapter:
        from nemo_tiedlora.nemo.adapter_io import save_adapter

        save_adapter(model, args.save_adapter)
    from nemo_tiedlora.nemo.find_adapters import model_chunks

    checked = check_replicas(model_chunks(model))
    state = gather_adapter_state(model)
    from nemo_tiedlora.nemo.reduction_stats import STATS

    if torch.distributed.get_rank() == 0:
        torch.save({"losses": recorder.losses, "grad_norms": recorder.grad_norms, "state": state, "initial": initial,
                    "replicas_checked": checked, "step_seconds": recorder.step_seconds,
                    "reduction": {"calls": STATS.calls, "bytes": STATS.bytes, "seconds": STATS.seconds}}, args.out)
    finish_distributed()



def write_logits(trainer, model, out: str) -> None:
    """Validate on one batch; the output layer's logits (gathered over TP) go to `out` from one rank."""
    from megatron.core import parallel_state

    captured, input_ids = [], []
    hook = None
    module = model.model[-1] if isinstance(model.model, list) else model.model
    first = model.model[0] if isinstance(model.model, list) else model.model
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        hook = module.output_layer.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output[0].detach().clone()) if not captured else None)

    def keep_ids(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and not input_ids:
            input_ids.append(ids.detach().clone())

    ids_hook = first.register_forward_pre_hook(keep_ids, with_kwargs=True)
    trainer.validate(model)
    ids_hook.remove()
    if torch.distributed.get_rank() == 0 and input_ids:
        torch.save(input_ids[0], f"{out}.input_ids.pt")
    if hook is not None:
        hook.remove()
        logits = captured[0]
        group = parallel_state.get_tensor_model_parallel_group()
        size = parallel_state.get_tensor_model_parallel_world_size()
        if size > 1:
            parts = [torch.empty_like(logits) for _ in range(size)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=group)
            logits = torch.cat(parts, dim=-1)
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            torch.save(logits, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
