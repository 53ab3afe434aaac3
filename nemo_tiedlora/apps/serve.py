"""``python -m nemo_tiedlora serve``: many Tied-LoRA adapters on one base behind an OpenAI-compatible HTTP API.

    python -m nemo_tiedlora serve --base base.nemo --adapters adapters/ --port 8000

Every adapter ``.nemo`` of the folder is resident in one adapter bank (``core.bank``); ``model`` in a request names
an adapter (its file name without ``.nemo``) or the base (``--served-model-name``, by default the base file's stem).
Concurrent requests wait in a bounded queue (``--max-queue``; full: 429) and are batched, up to
``--max-batch-size`` requests gathered for at most ``--max-wait-ms``, into one generation that mixes their adapters
(``nemo.bank_generate``); one batch runs at a time. Endpoints follow OpenAI's API as vLLM serves it:
``POST /v1/completions``, ``POST /v1/chat/completions`` (the base's chat template; ``stream: true`` sends
server-sent events), ``GET /v1/models`` (each adapter with ``parent`` = the base), ``GET /health``, and, with
``--enable-lora-loading``, ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``.
Errors carry OpenAI's error body: unknown model 404, malformed body 400, prompt plus max_tokens beyond the context
400 naming the limit, queue full 429, an adapter for another base 400 with the reason.
"""

import argparse
import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError

logger = logging.getLogger("nemo_tiedlora")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    """One request in the queue: what to generate, and where its tokens go (an asyncio queue of the server loop)."""

    prompt_ids: list[int]
    adapter: Optional[str]
    max_tokens: int
    sampling: Any
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Any = None


class Batcher:
    """The bounded queue and the one worker that turns queued jobs into batched generations."""

    def __init__(self, engine: Any, *, max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
        self.engine, self.max_batch_size, self.max_wait = engine, max_batch_size, max_wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1)  # the model: one batch (or bank change) at a time
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(429, f"the server's queue is full ({self.queue.maxsize} requests waiting): retry later",
                           "RateLimitError") from None

    async def on_model(self, function, *args):
        """Run `function(*args)` on the model's thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(jobs) < self.max_batch_size:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), timeout=left))
            except asyncio.TimeoutError:
                break
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            groups: dict[Any, list[Job]] = {}
            for job in jobs:  # NeMo's generate samples a batch one way: one batch per sampling setting
                groups.setdefault(job.sampling, []).append(job)
            for sampling, group in groups.items():
                await self._generate(group, sampling)

    async def _generate(self, jobs: list[Job], sampling: Any) -> None:
        from nemo_tiedlora.nemo.bank_generate import GenerationRequest

        loop = asyncio.get_running_loop()
        for job in jobs:
            job.request = GenerationRequest(
                prompt_ids=job.prompt_ids, adapter=job.adapter, max_tokens=job.max_tokens,
                on_token=lambda token, q=job.events: loop.call_soon_threadsafe(q.put_nowait, ("token", token)))
        try:
            await self.on_model(self.engine.generate, [job.request for job in jobs], sampling)
            for job in jobs:
                job.events.put_nowait(("done", job.request.finish_reason))
        except Exception as error:  # the requests of this batch fail; the server goes on
            logger.exception("generation failed")
            for job in jobs:
                job.events.put_nowait(("error", str(error)))


class AdapterServer:
    """The HTTP side: requests -> jobs, job events -> OpenAI bodies or server-sent events."""

    def __init__(self, engine: Any, batcher: Batcher, *, base_name: str, allow_loading: bool) -> None:
        self.engine, self.batcher, self.base_name, self.allow_loading = engine, batcher, base_name, allow_loading

    def adapter_of(self, model: str) -> Optional[str]:
        if model == self.base_name:
            return None
        if model not in self.engine.bank:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return model

    def job(self, body: Any, prompt: str) -> Job:
        from nemo_tiedlora.nemo.bank_generate import Sampling

        adapter = self.adapter_of(body.model)
        if body.stop:
            raise ApiError(400, "stop strings are not supported: generation ends at the end-of-sequence token or "
                           "max_tokens", "BadRequestError", "stop")
        ids = self.engine.encode(prompt)
        limit = self.engine.max_length
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(16, limit - len(ids))
        if len(ids) + wanted > limit or wanted < 1:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} in the completion). "
                           "Please reduce the length of the prompt or max_tokens.", "BadRequestError", "max_tokens")
        greedy = body.temperature == 0.0
        sampling = Sampling(greedy=greedy, temperature=1.0 if greedy else body.temperature,
                            top_k=max(body.top_k, 0), top_p=0.0 if body.top_p >= 1.0 else body.top_p)
        return Job(prompt_ids=ids, adapter=adapter, max_tokens=wanted, sampling=sampling)

    async def events(self, job: Job) -> AsyncIterator[tuple[str, Any]]:
        while True:
            kind, value = await job.events.get()
            yield kind, value
            if kind != "token":
                return

    async def answer(self, job: Job) -> tuple[str, str]:
        """The whole completion: (text, finish reason)."""
        tokens: list[int] = []
        async for kind, value in self.events(job):
            if kind == "token":
                tokens.append(value)
            elif kind == "error":
                raise ApiError(500, f"generation failed: {value}", "InternalServerError")
            else:
                return self.engine.decode(tokens), value
        raise ApiError(500, "generation ended without an answer", "InternalServerError")

    async def stream(self, job: Job, chunk) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of new text, the last with the finish reason, then [DONE]."""
        tokens: list[int] = []
        sent = ""
        async for kind, value in self.events(job):
            if kind == "token":
                tokens.append(value)
                text = self.engine.decode(tokens)
                if text.startswith(sent) and len(text) > len(sent):
                    yield _sse(chunk(text[len(sent):], None))
                    sent = text
            elif kind == "error":
                yield _sse({"error": {"message": f"generation failed: {value}", "type": "InternalServerError"}})
                break
            else:
                text = self.engine.decode(tokens)
                yield _sse(chunk(text[len(sent):] if text.startswith(sent) else "", value))
        yield "data: [DONE]\n\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def build_app(server: AdapterServer):
    """The FastAPI application of `server` (its routes, its error bodies)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from nemo_tiedlora.apps import openai_api as api  # the request models: annotations evaluated here (no
    # postponed annotations in this module), so the serving extra is imported only when a server is built


    app = FastAPI(title="nemo_tiedlora adapter server")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(api.error_body(error.message, error.kind, error.status, error.param), error.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"invalid request body: {where}: {first.get('msg', 'malformed')}" if where else "malformed body"
        return JSONResponse(api.error_body(message, "BadRequestError", 400, where or None), 400)

    @app.on_event("startup")
    async def _start() -> None:
        server.batcher.start()

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        cards = [api.model_card(server.base_name, None, server.base_name)]
        cards += [api.model_card(name, server.base_name, server.base_name) for name in server.engine.bank.names]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest):
        prompt = body.prompt if isinstance(body.prompt, str) else _one_prompt(body.prompt)
        job = server.job(body, prompt)
        server.batcher.submit(job)
        rid = api.new_id("cmpl")
        if body.stream:
            chunk = lambda text, finish: api.completion_chunk(rid, body.model, text, finish)  # noqa: E731
            return StreamingResponse(server.stream(job, chunk), media_type="text/event-stream")
        text, finish = await server.answer(job)
        return api.completion(rid, body.model, text, finish, len(job.prompt_ids), len(job.request.tokens))

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest):
        try:
            prompt = server.engine.chat_prompt([m.model_dump() for m in body.messages])
        except TiedLoraConfigError as error:
            raise ApiError(400, str(error), "BadRequestError", "messages") from None
        job = server.job(body, prompt)
        server.batcher.submit(job)
        rid = api.new_id("chatcmpl")
        if body.stream:
            first = [True]

            def chunk(text, finish):
                delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
                first[0] = False
                return api.chat_chunk(rid, body.model, delta, finish)

            return StreamingResponse(server.stream(job, chunk), media_type="text/event-stream")
        text, finish = await server.answer(job)
        return api.chat_completion(rid, body.model, text, finish, len(job.prompt_ids), len(job.request.tokens))

    _lora_routes(app, server)
    return app


def _one_prompt(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise ApiError(400, "one prompt per request (send several requests: they are batched together)",
                       "BadRequestError", "prompt")
    return prompts[0]


def _lora_routes(app: Any, server: "AdapterServer") -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter ({"lora_name", "lora_path"}), vLLM's endpoints."""
    from nemo_tiedlora.apps import openai_api as api
    def enabled() -> None:
        if not server.allow_loading:
            raise ApiError(404, "adapter loading is off: start the server with --enable-lora-loading",
                           "NotFoundError")

    @app.post("/v1/load_lora_adapter")
    async def load(body: api.LoraBody):
        enabled()
        if body.lora_name == server.base_name or body.lora_name in server.engine.bank:
            raise ApiError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "BadRequestError",
                           "lora_name")
        try:
            await server.batcher.on_model(server.engine.load_adapter, body.lora_name, Path(body.lora_path))
        except (TiedLoraConfigError, TiedLoraCheckpointError) as error:
            raise ApiError(400, f"cannot load adapter '{body.lora_name}': {error}", "BadRequestError",
                           "lora_path") from None
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: api.LoraBody):
        enabled()
        if body.lora_name not in server.engine.bank:
            raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "NotFoundError",
                           "lora_name")
        await server.batcher.on_model(server.engine.unload_adapter, body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


DESCRIPTION = "serve many adapters of one base over an OpenAI-compatible HTTP API (FastAPI + uvicorn)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nemo_tiedlora serve", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve command's options (also those of ``python -m nemo_tiedlora serve``)."""
    p.add_argument("--base", type=Path, required=True, help="the base model .nemo")
    p.add_argument("--adapters", type=Path, nargs="*", default=[],
                   help="a folder of adapter .nemo files and/or adapter files (each served under its file stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the base's model name (default: the base file's stem)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most requests in one generation (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the first request of a batch waits for more (default 20 ms)")
    p.add_argument("--max-queue", type=int, default=256, help="most requests waiting; beyond it 429 (default 256)")
    p.add_argument("--max-loras", type=int, default=None, help="most adapters resident (default: no limit)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="highest adapter rank the bank holds (default: the highest at startup; loaded later: <= it)")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: the command relaunches itself under torchrun with this many ranks; "
                        "rank 0 serves, the others follow the batches it broadcasts (default 1)")


def main(argv: Optional[list[str]] = None) -> int:
    return run(parser().parse_args(argv))


def _engine(args: argparse.Namespace, files: dict) -> Any:
    """The base and the adapters, loaded under a progress bar (rank 0's alone at TP > 1)."""
    from tqdm import tqdm

    from nemo_tiedlora.nemo.bank_generate import BankEngine, restore_parallel

    quiet = os.environ.get("RANK", "0") != "0"  # a rank torchrun started, other than 0
    with tqdm(total=len(files), desc="loading adapters", unit="adapter", disable=quiet) as bar:
        options = dict(max_rank=args.max_lora_rank, max_loras=args.max_loras, progress=lambda name: bar.update(1))
        if args.tp > 1:
            return restore_parallel(args.base, files, tp=args.tp, **options)
        return BankEngine.restore(args.base, files, **options)


def run(args: argparse.Namespace) -> int:
    """Load the base and the adapters (a progress bar), then serve until stopped."""
    import uvicorn

    from nemo_tiedlora.formats.bank_entry import adapter_files

    try:
        files = adapter_files([str(path) for path in args.adapters]) if args.adapters else {}
        engine = _engine(args, files)
    except (TiedLoraConfigError, TiedLoraCheckpointError) as error:
        print(f"error: {error}", flush=True)
        return 2
    if args.tp > 1:
        import torch.distributed as dist

        from nemo_tiedlora.nemo.bank_generate import LeadingEngine, follow

        if dist.get_rank() != 0:
            follow(engine)
            return 0
        engine = LeadingEngine(engine)
    base_name = args.served_model_name or args.base.name.removesuffix(".nemo")
    logger.info("serving %s with %d adapters resident (%.1f MB of adapter weights) on http://%s:%d",
                base_name, len(engine.bank), engine.bank.adapter_bytes() / 1e6, args.host, args.port)
    batcher = Batcher(engine, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                      max_queue=args.max_queue)
    server = AdapterServer(engine, batcher, base_name=base_name, allow_loading=args.enable_lora_loading)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
