"""The adapter server (`python -m nemo_tiedlora serve`) over real HTTP on loopback, asked by the `openai` client.

Reference: each item's answer from the generate entry script run with its adapter alone (tests/bank_runs.py: three
adapters of three kinds on the tiny 4-layer base). Checked: concurrent completions that mix adapters, streaming,
the model list, OpenAI-style errors (unknown model 404, malformed body 400, prompt + max_tokens beyond the context
400 naming the limit, no chat template 400, queue full 429), loading and unloading adapters on a live server, the
server at TP2 (rank 0 serves, rank 1 follows), a server killed with SIGKILL that starts again and answers the same,
a bounded load test (32 clients for 60 s against 1,000 resident adapters, every request answered and the reference
adapters' answers unchanged), and on SmolLM2 the chat endpoint against transformers + peft.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
openai = pytest.importorskip("openai", reason="the serving extra (requirements/requirements-serve.txt)")
pytest.importorskip("fastapi", reason="the serving extra (requirements/requirements-serve.txt)")

from tests.smollm2_assets import smollm2_gguf, smollm2_nemo  # noqa: F401,E402 (pytest fixtures)

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "examples" / "nlp" / "language_modeling" / "tuning" / "megatron_gpt_tiedlora_serve.py"


class Server:
    """`python -m nemo_tiedlora serve` as a user starts it, on a free loopback port."""

    def __init__(self, base: Path, adapters: Path, log: Path, *flags: str, entry_script: bool = False) -> None:
        from tests.script_env import script_env

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = log
        command = [sys.executable, "-m", "nemo_tiedlora", "serve", "--base", str(base), "--adapters", str(adapters),
                   "--host", "127.0.0.1", "--port", str(self.port), *flags]
        if entry_script:  # the README's NeMo-style command: hydra overrides
            command = [sys.executable, str(ENTRY), f"base={base}", f"adapters={adapters}", f"port={self.port}", *flags]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=script_env(), cwd=REPO)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=300)
        self._wait()

    def _wait(self) -> None:
        from tests.http_health import wait_until_healthy

        wait_until_healthy(self.process, f"http://127.0.0.1:{self.port}/health", self.log, seconds=300)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def complete(self, model: str, prompt: str, **kwargs):
        return self.client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, **kwargs)


def _model(item: dict) -> str:
    return item.get("adapter") or "base"


def _key(item: dict) -> str:
    return " ".join(item["input"].split())


@pytest.fixture(scope="module")
def server(bank_reference, tmp_path_factory):
    base, folder, items, answers = bank_reference
    running = Server(base, folder, tmp_path_factory.mktemp("serve") / "server.log", "--enable-lora-loading")
    yield running, items, answers
    running.stop()


def test_concurrent_completions_mixing_adapters_equal_each_adapter_alone(server):
    running, items, answers = server
    with ThreadPoolExecutor(len(items)) as pool:
        replies = list(pool.map(lambda item: running.complete(_model(item), item["input"]), items))
    assert [reply.choices[0].text for reply in replies] == [answers[_key(item)] for item in items]
    assert all(reply.choices[0].finish_reason in ("length", "stop") for reply in replies)
    assert all(reply.usage.completion_tokens <= 6 for reply in replies)


def test_streamed_chunks_add_up_to_the_completion(server):
    running, items, answers = server
    for item in items[:4]:
        chunks = list(running.complete(_model(item), item["input"], stream=True))
        assert "".join(chunk.choices[0].text for chunk in chunks) == answers[_key(item)]
        assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2


def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(server):
    running, _, _ = server
    cards = {card.id: card for card in running.client.models.list().data}
    assert set(cards) == {"base", "tl6", "lora", "vera"}
    assert cards["base"].parent is None and all(cards[name].parent == "base" for name in ("tl6", "lora", "vera"))


def test_bad_requests_get_openai_error_bodies(server):
    import httpx

    running, items, _ = server
    with pytest.raises(openai.NotFoundError, match="The model `nobody` does not exist"):
        running.complete("nobody", items[0]["input"])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
        running.client.completions.create(model="tl6", prompt=items[0]["input"], max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        running.client.chat.completions.create(model="tl6", messages=[{"role": "user", "content": "hi"}])
    url = f"http://127.0.0.1:{running.port}/v1/completions"
    malformed = httpx.post(url, json={"model": "tl6"}, timeout=30)
    assert malformed.status_code == 400 and "prompt" in malformed.json()["error"]["message"]
    not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "BadRequestError"


def test_adapters_load_and_unload_on_a_live_server(server, bank_reference, tmp_path):
    import httpx

    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.nemo.base_archive import base_config
    from tests.bank_runs import random_archive

    running, items, answers = server
    base, folder, _, _ = bank_reference
    url = f"http://127.0.0.1:{running.port}/v1"
    loaded = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "copy", "lora_path": str(folder / "tl6.nemo")},
                        timeout=60)
    assert loaded.status_code == 200
    item = next(item for item in items if item.get("adapter") == "tl6")
    assert running.complete("copy", item["input"]).choices[0].text == answers[_key(item)]
    again = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "copy", "lora_path": str(folder / "tl6.nemo")},
                       timeout=60)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    shape = dict(model_shape(base_config(base)), num_layers=6)
    other = random_archive(tmp_path / "other.nemo", "tl6", 4, shape, seed=9)
    refused = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "other", "lora_path": str(other)}, timeout=60)
    assert refused.status_code == 400 and "trained for a base of shape" in refused.json()["error"]["message"]
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "copy"}, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError):
        running.complete("copy", item["input"])
    gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "copy"}, timeout=60)
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]


def test_at_tp2_rank_0_serves_and_the_other_rank_follows(bank_reference, tmp_path):
    """`--tp 2`: the command relaunches itself under torchrun; rank 0 answers as at TP1 (concurrent, mixed
    adapters), and an adapter loaded and unloaded on the live server reaches rank 1 too (the next batches still
    answer, which needs both ranks in step)."""
    import httpx

    base, folder, items, answers = bank_reference
    running = Server(base, folder, tmp_path / "server.log", "--tp", "2", "--enable-lora-loading")
    try:
        with ThreadPoolExecutor(len(items)) as pool:
            replies = list(pool.map(lambda item: running.complete(_model(item), item["input"]), items))
        assert [reply.choices[0].text for reply in replies] == [answers[_key(item)] for item in items]
        url = f"http://127.0.0.1:{running.port}/v1"
        body = {"lora_name": "copy", "lora_path": str(folder / "vera.nemo")}
        assert httpx.post(f"{url}/load_lora_adapter", json=body, timeout=120).status_code == 200
        item = next(item for item in items if item.get("adapter") == "vera")
        assert running.complete("copy", item["input"]).choices[0].text == answers[_key(item)]
        assert httpx.post(f"{url}/unload_lora_adapter", json=body, timeout=120).status_code == 200
        assert running.complete("tl6", items[0]["input"]).choices[0].text == answers[_key(items[0])]
    finally:
        running.stop()


def _digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_a_full_queue_answers_429_and_loading_is_off_by_default(bank_reference, tmp_path):
    import httpx

    base, folder, items, _ = bank_reference
    running = Server(base, folder, tmp_path / "server.log", "--max-queue", "1", "--max-batch-size", "1",
                     "--max-wait-ms", "0")
    try:
        def ask(_):
            try:
                running.client.completions.create(model="tl6", prompt=items[0]["input"], max_tokens=40,
                                                  temperature=0)
                return 200
            except openai.RateLimitError as error:
                assert "queue is full" in str(error)
                return 429

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(ask, range(12)))
        assert 429 in codes and 200 in codes
        off = httpx.post(f"http://127.0.0.1:{running.port}/v1/load_lora_adapter",
                         json={"lora_name": "x", "lora_path": str(folder / "tl6.nemo")}, timeout=60)
        assert off.status_code == 404 and "--enable-lora-loading" in off.json()["error"]["message"]
    finally:
        running.stop()


def test_a_server_killed_with_sigkill_starts_again_and_answers_the_same(bank_reference, tmp_path):
    """Started the first time through the NeMo-style entry script (hydra overrides), the second time as the CLI."""
    base, folder, items, answers = bank_reference
    before = _digest(folder)
    first = Server(base, folder, tmp_path / "first.log", "max_batch_size=4", entry_script=True)
    assert {card.id for card in first.client.models.list().data} == {"base", "tl6", "lora", "vera"}
    item = items[0]
    assert first.complete(_model(item), item["input"]).choices[0].text == answers[_key(item)]
    first.stop(signal.SIGKILL)
    assert _digest(folder) == before
    second = Server(base, folder, tmp_path / "second.log")
    try:
        assert second.complete(_model(item), item["input"]).choices[0].text == answers[_key(item)]
    finally:
        second.stop()


def test_32_clients_for_30_s_against_1000_resident_adapters(bank_reference, tmp_path):
    """Bounded load on loopback: 32 clients send requests for 60 s, each to an adapter drawn from 1,000 resident
    (the three reference adapters among them); every request is answered, and every answer of a reference adapter
    equals its generate-script answer."""
    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.nemo.base_archive import base_config
    from tests.bank_runs import random_archive

    base, folder, items, answers = bank_reference
    many = tmp_path / "adapters"
    many.mkdir()
    shape = model_shape(base_config(base))
    for path in folder.glob("*.nemo"):
        os.link(path, many / path.name)
    for k in range(997):
        random_archive(many / f"user{k:04d}.nemo", ("tl6", "tl5", "vera", "lora")[k % 4], (2, 4)[k % 2], shape,
                       seed=1000 + k)
    running = Server(base, many, tmp_path / "server.log")
    names = sorted(path.name[:-5] for path in many.glob("*.nemo"))
    ends = time.monotonic() + 60

    def client(seed: int) -> tuple[int, list[str]]:
        rng, count, wrong = random.Random(seed), 0, []
        while time.monotonic() < ends:
            item = rng.choice(items)
            model = _model(item) if rng.random() < 0.3 else rng.choice(names)
            text = running.complete(model, item["input"]).choices[0].text
            if model == _model(item) and text != answers[_key(item)]:
                wrong.append(f"{model}: {text!r}")
            count += 1
        return count, wrong

    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(client, range(32)))
    finally:
        running.stop()
    print(f"{sum(count for count, _ in results)} requests answered by 32 clients in 60 s")
    assert all(count > 0 for count, _ in results)
    assert [wrong for _, wrong in results if wrong] == []


CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}]]


def test_chat_on_smollm2_equals_transformers_and_peft_with_the_adapters_exported(smollm2_nemo, tmp_path):
    """SmolLM2-135M-Instruct (its chat template) with two tl6 adapters: the server's greedy chat answers, for each
    adapter and the base, equal transformers + peft's on the same adapters exported as PEFT LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.nemo.base_archive import base_config
    from nemo_tiedlora.tools.export import export_hf_peft
    from tests.bank_runs import random_archive

    shape = model_shape(base_config(smollm2_nemo))
    folder = tmp_path / "adapters"
    folder.mkdir()
    for seed in (1, 2):
        random_archive(folder / f"chat{seed}.nemo", "tl6", 8, shape, seed=seed, scale=0.15)
    running = Server(smollm2_nemo, folder, tmp_path / "server.log")
    try:
        served = {(model, k): running.client.chat.completions.create(
            model=model, messages=chat, max_tokens=12, temperature=0).choices[0].message.content
            for model in ("smollm2", "chat1", "chat2") for k, chat in enumerate(CHATS)}
    finally:
        running.stop()
    export_hf_peft(adapter=folder / "chat1.nemo", base=smollm2_nemo, out=tmp_path / "peft1", base_out=tmp_path / "hf")
    export_hf_peft(adapter=folder / "chat2.nemo", base=smollm2_nemo, out=tmp_path / "peft2")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype="float32").eval()
    reference = {}
    for k, chat in enumerate(CHATS):
        reference[("smollm2", k)] = _hf_answer(model, tokenizer, chat)
    peft = PeftModel.from_pretrained(model, tmp_path / "peft1", adapter_name="chat1")
    peft.load_adapter(tmp_path / "peft2", adapter_name="chat2")
    for name in ("chat1", "chat2"):
        peft.set_adapter(name)
        for k, chat in enumerate(CHATS):
            reference[(name, k)] = _hf_answer(peft, tokenizer, chat)
    assert served == reference
    assert len({served[(m, 0)] for m in ("smollm2", "chat1", "chat2")}) > 1, "the adapters change no answer"


def _hf_answer(model, tokenizer, chat) -> str:
    import torch

    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
