"""The OpenAI-compatible request and response bodies the adapter server speaks (applications layer).

Requests are validated with pydantic (a malformed body is a 400 with an OpenAI-style error body, as vLLM answers);
responses and stream chunks are plain dicts in OpenAI's shapes (``text_completion``, ``chat.completion``,
``chat.completion.chunk``) so that the ``openai`` client reads them unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, Field


class _Sampling(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class LoraBody(BaseModel):
    """vLLM's body of /v1/load_lora_adapter and /v1/unload_lora_adapter."""

    lora_name: str
    lora_path: str = ""


def error_body(message: str, kind: str, code: int, param: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str, finish: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, text: str, finish: Optional[str]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_completion(request_id: str, model: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish: Optional[str]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def model_card(name: str, parent: Optional[str], root: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "nemo_tiedlora", "root": root,
            "parent": parent}
