"""One generation for a batch of requests that each name their own adapter (nemo glue layer).

:class:`BankEngine` restores a base `.nemo` on this host, puts an adapter bank behind its `linear_qkv` layers
(``nemo.bank_qkv``) and runs NeMo's own text generation (``text_generation_utils.generate``: the model's inference
strategy, its sampling, end-of-sequence handling) for a whole batch at once, each sequence through its adapter. A
request's tokens are handed to its ``on_token`` as the step that makes them finishes (streaming), and a request
stops at its end-of-sequence token or at its own ``max_tokens``; the batch ends when every request has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_tiedlora.core.bank import AdapterBank
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.core.model_shape import model_shape
from nemo_tiedlora.formats.bank_entry import archive_bank_adapter, load_bank, read_for_base
from nemo_tiedlora.nemo.bank_qkv import BankContext, attach_bank

logger = logging.getLogger("nemo_tiedlora")


@dataclass(frozen=True)
class Sampling:
    """How a batch samples: greedy, or temperature with top-k / top-p (one setting per batch, as NeMo's generate)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0


@dataclass
class GenerationRequest:
    """One sequence of a batch: its prompt's token ids, its adapter (None: the base), its token budget."""

    prompt_ids: list[int]
    adapter: Optional[str]
    max_tokens: int
    on_token: Callable[[int], None] = lambda token: None
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (end of sequence) or "length" (max_tokens)


class BankEngine:
    """A base model on this host with a bank of adapters, generating batches that mix them."""

    def __init__(self, model: Any, context: BankContext) -> None:
        self.model, self.context = model, context
        self.tokenizer = model.tokenizer
        self.eos_id = int(self.tokenizer.eos_id)
        self.max_length = int(model.cfg.get("encoder_seq_length") or model.cfg.get("max_position_embeddings"))

    @property
    def bank(self) -> AdapterBank:
        return self.context.bank

    @classmethod
    def restore(cls, base: Path, adapters: dict[str, Path], *, max_rank: Optional[int] = None,
                max_loras: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> BankEngine:
        """Restore `base` on CPU (one process, TP1) and load `adapters` into its bank."""
        from nemo_tiedlora.nemo.cpu_restore import restore_base

        _check_max_loras(adapters, max_loras)
        model = restore_base(Path(base))
        model.eval()
        bank = load_bank(adapters, model_shape(model.cfg), max_rank=max_rank, progress=progress)
        return cls(model, attach_bank(model, bank))

    # ---- the bank ---------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Path) -> None:
        """Add one adapter archive to the live bank (refused with the reason: another base, rank, duplicate)."""
        self.bank.add(name, archive_bank_adapter(read_for_base(name, Path(path), model_shape(self.model.cfg))))

    def unload_adapter(self, name: str) -> None:
        self.bank.remove(name)

    # ---- text -------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.text_to_ids(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.ids_to_text(list(ids)) if ids else ""

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The base's chat template applied to `messages` with the assistant's turn opened."""
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is None or not getattr(hf, "chat_template", None):
            raise TiedLoraConfigError("this base's tokenizer has no chat template: use /v1/completions")
        return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest], sampling: Sampling) -> None:
        """Generate for every request at once (see the module docstring); fills each request's tokens and reason."""
        from nemo.collections.nlp.modules.common.text_generation_utils import generate

        if not requests:
            return
        longest = max(len(r.prompt_ids) for r in requests)
        budget = max(r.max_tokens for r in requests)
        if longest + budget > self.max_length:
            raise TiedLoraConfigError(f"prompt plus max_tokens ({longest} + {budget}) exceed the model's context of "
                                      f"{self.max_length} tokens")
        tokens = torch.full((len(requests), longest + budget), self.eos_id, dtype=torch.long)
        for row, request in enumerate(requests):
            tokens[row, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
        lengths = torch.tensor([len(r.prompt_ids) for r in requests])
        strategy = _streaming_strategy(self.model, requests, self.eos_id)
        with torch.no_grad(), self.context.batch([r.adapter for r in requests]):
            generate(self.model, inputs=(tokens, lengths), tokens_to_generate=budget, all_probs=False,
                     compute_logprob=False, greedy=sampling.greedy, temperature=sampling.temperature,
                     top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=1.0,
                     min_tokens_to_generate=0, end_strings=["<|endoftext|>"], strategy=strategy)
        for request in requests:
            request.finish_reason = request.finish_reason or "length"


def _streaming_strategy(model: Any, requests: Sequence[GenerationRequest], eos_id: int) -> Any:
    """The model's own inference strategy, also handing each new token to its request and ending a request at its
    own max_tokens (NeMo's loop ends the batch when every sequence is done)."""
    from nemo.collections.nlp.modules.common.text_generation_strategy import model_inference_strategy_dispatcher

    base = model_inference_strategy_dispatcher(model)

    class Streaming(type(base)):
        def post_process(self, tokens, new_tokens, context_length):  # called once per step, every row
            super().post_process(tokens, new_tokens, context_length)
            for row, request in enumerate(requests):
                if request.finish_reason is not None or context_length < len(request.prompt_ids):
                    continue
                token = int(new_tokens[row])
                if token == eos_id:
                    request.finish_reason = "stop"
                    continue
                request.tokens.append(token)
                request.on_token(token)
                if len(request.tokens) >= request.max_tokens:
                    request.finish_reason = "length"

        def end_of_generation_condition(self, tokens, prev, eod_id, end_strings):
            done = super().end_of_generation_condition(tokens, prev, eod_id, end_strings)
            finished = torch.tensor([r.finish_reason is not None for r in requests], device=done.device)
            return done | finished

    base.__class__ = Streaming
    return base


def _check_max_loras(adapters: dict[str, Path], max_loras: Optional[int]) -> None:
    if max_loras is not None and len(adapters) > max_loras:
        raise TiedLoraConfigError(f"{len(adapters)} adapters found but --max-loras is {max_loras}: raise it "
                                  "or serve fewer")


# ---- tensor parallelism: rank 0 serves, the other ranks follow -----------------------------------------------------
def restore_parallel(base: Path, adapters: dict[str, Path], *, tp: int, max_rank: Optional[int] = None,
                     max_loras: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> BankEngine:
    """Restore `base` at tensor-parallel size `tp` (this process relaunches itself under torchrun with `tp` ranks
    when no launcher started it; every rank returns from here) with `adapters` in each rank's bank."""
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import load_for_inference, tuning_config

    _check_max_loras(adapters, max_loras)
    cfg = tuning_config("generate")
    with open_dict(cfg):
        cfg.model.restore_from_path = str(base)
        cfg.model.peft.restore_from_path = None
        cfg.trainer.devices = tp
        cfg.trainer.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        cfg.trainer.precision = 32
        cfg.model.tensor_model_parallel_size = tp
        cfg.model.pipeline_model_parallel_size = 1
        cfg.model.data.test_ds.file_names = []  # no test set: the server brings the prompts
        cfg.model.data.test_ds.names = []
    _, model = load_for_inference(cfg)
    bank = load_bank(adapters, model_shape(model.cfg), max_rank=max_rank, progress=progress)
    return BankEngine(model, attach_bank(model, bank))


class LeadingEngine:
    """Rank 0's engine at TP > 1: each generation and each change of the bank is first broadcast to the other ranks
    (which run :func:`follow`), then done here; NeMo's generate then broadcasts the batch's tokens itself."""

    def __init__(self, engine: BankEngine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def _tell(self, command: tuple) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=0)

    def generate(self, requests: Sequence[GenerationRequest], sampling: Sampling) -> None:
        self._tell(("generate", [(r.prompt_ids, r.adapter, r.max_tokens) for r in requests], sampling))
        self.engine.generate(requests, sampling)

    def load_adapter(self, name: str, path: Path) -> None:
        self._tell(("load", name, str(path)))
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self._tell(("unload", name))
        self.engine.unload_adapter(name)


def follow(engine: BankEngine) -> None:
    """The loop of a rank other than 0 at TP > 1: do what rank 0 broadcasts, in the same order, until it stops
    (the process ends with the job). A failure here is rank 0's failure too (same inputs), so it is logged and the
    loop goes on, as rank 0's server does."""
    import torch.distributed as dist

    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        kind, *payload = box[0]
        try:
            if kind == "generate":
                items, sampling = payload
                engine.generate([GenerationRequest(prompt_ids=ids, adapter=adapter, max_tokens=budget)
                                 for ids, adapter, budget in items], sampling)
            elif kind == "load":
                engine.load_adapter(payload[0], Path(payload[1]))
            elif kind == "unload":
                engine.unload_adapter(payload[0])
        except Exception:  # noqa: BLE001 - rank 0 reports it to its client; this rank stays in step
            logger.debug("rank %d: %s failed", dist.get_rank(), kind, exc_info=True)
