"""Run a script (an entry script, `-m nemo_tiedlora ...`) with one fault injected, for the fault tests.

    python tests/fault_injection.py SCRIPT_OR_-m_MODULE ARGS...      (also as torchrun's script)

The fault comes from $TIEDLORA_FAULT (nothing else changes: same arguments, same code path):
- ``kill-after-step:N``   SIGKILL this process at the end of optimizer step N (before that step's validation and
                          checkpoint, which Lightning runs after the batch-end hooks)
- ``kill-in-ckpt:N``      SIGKILL during the N-th checkpoint save: half its bytes written under the final name,
                          as a non-atomic file system would leave it (NeMo's "-unfinished" marker is in place)
- ``kill-in-nemo``        SIGKILL while the end-of-training adapter .nemo is written (half the archive in its
                          temporary file)
- ``kill-in-output``      SIGKILL while merge / convert pack their output .nemo (after its first member)
- ``wait-after-step:N``   at the end of step N write $TIEDLORA_FAULT_MARKER and sleep (the test then kills the whole
                          job, torchrun included, as a scheduler or a power loss would)
- ``kill-in-collective:N`` in optimizer step N, at this rank's first collective (torch.distributed.all_reduce: the
                          TP forward's reductions, the gradient sums), wait until the other ranks are blocked in it,
                          write $TIEDLORA_FAULT_MARKER and SIGKILL this process: a rank lost inside a collective
- ``nan-grad:N``          put a NaN into one adapter gradient at optimizer step N (before the adapter's checks)
$TIEDLORA_FAULT_RANK limits the fault to one global rank (default: every rank).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from pathlib import Path

FAULT = os.environ.get("TIEDLORA_FAULT", "")
ONLY_RANK = os.environ.get("TIEDLORA_FAULT_RANK")


def _mine() -> bool:
    return ONLY_RANK is None or os.environ.get("RANK", "0") == ONLY_RANK


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kind_and_step() -> tuple[str, int]:
    kind, _, number = FAULT.partition(":")
    return kind, int(number or 0)


def _install() -> None:
    kind, number = _kind_and_step()
    if not FAULT or not _mine():
        return
    if kind in ("kill-after-step", "wait-after-step"):
        from lightning.pytorch import Callback
        from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronLMPPTrainerBuilder

        class AtStep(Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                if trainer.global_step != number:
                    return
                marker = os.environ.get("TIEDLORA_FAULT_MARKER")
                if marker:  # when the fault struck (wall clock), for the test to measure what follows
                    Path(marker).write_text(f"{time.time()}")
                if kind == "kill-after-step":
                    _die()
                while True:
                    time.sleep(1)

        original = MegatronLMPPTrainerBuilder.create_trainer

        def create_trainer(self, callbacks=None):
            return original(self, callbacks=[*(callbacks or []), AtStep()])

        MegatronLMPPTrainerBuilder.create_trainer = create_trainer
    elif kind == "kill-in-collective":
        import torch.distributed as dist
        from lightning.pytorch import Callback
        from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronLMPPTrainerBuilder

        armed = []
        original_all_reduce = dist.all_reduce

        def all_reduce(*args, **kwargs):
            if armed:
                time.sleep(3.0)  # the peers enter the same collective and block in it
                marker = os.environ.get("TIEDLORA_FAULT_MARKER")
                if marker:
                    Path(marker).write_text(f"{time.time()}")
                _die()
            return original_all_reduce(*args, **kwargs)

        class Arm(Callback):
            def on_train_batch_start(self, trainer, *args) -> None:
                if trainer.global_step == number:
                    armed.append(True)

        original_create = MegatronLMPPTrainerBuilder.create_trainer

        def create_trainer_armed(self, callbacks=None):
            return original_create(self, callbacks=[*(callbacks or []), Arm()])

        dist.all_reduce = all_reduce
        MegatronLMPPTrainerBuilder.create_trainer = create_trainer_armed
    elif kind == "kill-in-ckpt":
        import lightning.fabric.plugins.io.torch_io as torch_io

        calls = []

        def _atomic_save(checkpoint, filepath) -> None:
            calls.append(filepath)
            if len(calls) < number:
                return original(checkpoint, filepath)
            import io

            import torch

            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            with open(filepath, "wb") as handle:  # worst case: no atomic rename, half the bytes under the name
                handle.write(data[: len(data) // 2])
            _die()

        original = torch_io._atomic_save
        torch_io._atomic_save = _atomic_save
    elif kind == "kill-in-nemo":
        import tarfile

        original_addfile = tarfile.TarFile.addfile

        def addfile(self, tarinfo, fileobj=None):
            if tarinfo.name == "adapter.safetensors":  # the second member: the archive is half written
                _die()
            return original_addfile(self, tarinfo, fileobj)

        tarfile.TarFile.addfile = addfile
    elif kind == "kill-in-output":
        import tarfile

        original_addfile = tarfile.TarFile.addfile
        added = []

        def addfile(self, tarinfo, fileobj=None):  # every .nemo writer packs with addfile: die after one member
            if added:
                _die()
            added.append(tarinfo.name)
            return original_addfile(self, tarinfo, fileobj)

        tarfile.TarFile.addfile = addfile
    elif kind == "nan-grad":
        import nemo_tiedlora.nemo.grad_sync as grad_sync

        original_reduce = grad_sync.reduce_adapter_grads
        steps = []

        def reduce_adapter_grads(chunks, **kwargs):
            original_reduce(chunks, **kwargs)
            steps.append(1)
            if len(steps) == number:
                for chunk in chunks:
                    for name, param in chunk.named_parameters():
                        grad = getattr(param, "main_grad", None)
                        grad = grad if grad is not None else param.grad
                        if "tiedlora" in name and grad is not None:
                            grad.view(-1)[0] = float("nan")
                            return

        grad_sync.reduce_adapter_grads = reduce_adapter_grads
    else:
        raise SystemExit(f"unknown TIEDLORA_FAULT={FAULT!r}")


if __name__ == "__main__":
    target, *rest = sys.argv[1:]
    if target == "-m":
        module, *rest = rest
        sys.argv = [module, *rest]
        _install()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        sys.path.insert(0, str(Path(target).resolve().parent))
        _install()
        runpy.run_path(target, run_name="__main__")
