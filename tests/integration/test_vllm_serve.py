"""A Tied-LoRA adapter served by vLLM answers as NeMo does: the README's "Serving with vLLM" commands, run as written.

SmolLM2-135M-Instruct (imported from its GGUF) is tuned briefly with tl6 through the entry script (the demo's task,
recipe and chat format, 10 steps), NeMo answers every test prompt of the demo greedily through
`megatron_gpt_generate.py`, and then the README's export and `vllm serve` commands run as written (paths substituted,
loopback host and a free port added) in the serving environment (vLLM for CPU, transformers 5; tests/vllm_env.py).
The `openai` client asks the server, under the adapter's name, for the same prompts as completions and as chat
messages rendered by the exported tokenizer's chat template. The reference is NeMo's own output; both run in fp32.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from tests.smollm2_assets import smollm2_gguf, smollm2_nemo  # noqa: F401 (pytest fixtures)
from tests.vllm_env import vllm_venv  # noqa: F401 (pytest fixture)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
STEPS = 10  # enough for the adapter to change most answers; the comparison is NeMo vs vLLM, not the task's score
STARTUP_SECONDS = 600


def readme_serving_commands() -> list[str]:
    """The commands of the README's first code block under "## Serving with vLLM" (continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Serving with vLLM\n", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve did not answer {url}/models within {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(smollm2_nemo, vllm_venv, tmp_path_factory):
    """NeMo's greedy answers on every demo test prompt, and the README's vLLM server with the exported adapter."""
    from nemo_tiedlora.apps.demo import extraction_data as extraction, real
    from nemo_tiedlora.apps.demo.run import evaluate, finetune

    work = tmp_path_factory.mktemp("vllm_serve")
    data = extraction.build(work / "data")
    settings = replace(real.SETTINGS, steps=STEPS)
    adapter = finetune(base=smollm2_nemo, data=data, work=work, settings=settings,
                       extra=real.template_overrides("train_ds", "validation_ds"))
    evaluate(base=smollm2_nemo, adapter=adapter, data=data, work=work, settings=settings, label="tl6",
             extra=real.template_overrides("test_ds"), scorer=extraction.record_match)
    by_label = {row["label"].strip(): row["pred"] for row in real.predictions(work, "tl6")}
    rows = [json.loads(line) for line in data.test.read_text().splitlines()]
    nemo = [by_label[row["output"].strip()] for row in rows]  # the predictions file holds the label, not the input

    paths = {"adapter.nemo": adapter, "base.nemo": smollm2_nemo, "hf_adapter": work / "hf_adapter",
             "hf_base": work / "hf_base"}
    export, serve = readme_serving_commands()
    argv = [str(paths.get(token, token)) for token in shlex.split(export)]
    assert argv[:2] == ["python", "-m"], export
    subprocess.run([sys.executable, *argv[1:]], check=True, cwd=work, timeout=900)
    port = _free_port()
    argv = [re.sub(r"^(\w+)=(hf_adapter)$", lambda m: f"{m[1]}={paths[m[2]]}", token) for token in shlex.split(serve)]
    argv = [str(paths.get(token, token)) for token in argv]
    assert argv[:2] == ["vllm", "serve"], serve
    argv = [str(vllm_venv / "bin" / "vllm"), *argv[1:], "--host", "127.0.0.1", "--port", str(port)]
    log = work / "vllm_serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", PATH=f"{vllm_venv / 'bin'}:{os.environ['PATH']}")
    with open(log, "w") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work,
                                  start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        _wait_until_serving(server, url, log)
        yield dict(url=url, rows=rows, nemo=nemo, work=work, python=vllm_venv / "bin" / "python",
                   adapter_name=argv[argv.index("--lora-modules") + 1].split("=")[0], hf_base=paths["hf_base"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _ask(served, model: str, *, prompts: int = 48, chats: bool = True) -> dict:
    """tests/vllm_client.py (the `openai` client, in the serving environment): greedy completions (and chats) for
    the first `prompts` demo test prompts, 16 requests at a time."""
    from nemo_tiedlora.apps.demo.real import PROMPT_TEMPLATE, SYSTEM

    rows = served["rows"][:prompts]
    requests = {"max_tokens": 28,  # the demo's tokens_to_generate
                "completions": [PROMPT_TEMPLATE.format(input=row["input"], output="") for row in rows],
                "chats": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["input"]}]
                          for row in rows] if chats else []}
    name = re.sub(r"\W", "_", model)[-40:]
    inputs, out = served["work"] / f"requests_{name}.json", served["work"] / f"answers_{name}.json"
    inputs.write_text(json.dumps(requests, ensure_ascii=False), encoding="utf-8")
    subprocess.run([str(served["python"]), str(REPO / "tests" / "vllm_client.py"), served["url"], model, str(inputs),
                    str(out)], check=True, timeout=900)
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def adapted(served) -> dict:
    return _ask(served, served["adapter_name"])


def _differences(answers: list[str], nemo: list[str]) -> list[tuple[int, str, str]]:
    return [(i, a, n) for i, (a, n) in enumerate(zip(answers, nemo, strict=True)) if a.strip() != n.strip()]


def test_vllm_lists_the_base_and_the_tied_adapter_by_its_name(served, adapted):
    assert served["adapter_name"] == "tl6"
    assert adapted["models"] == sorted([str(served["hf_base"]), "tl6"])


def test_vllm_completions_with_the_adapter_equal_nemo_greedy_answers_on_every_demo_test_prompt(served, adapted):
    assert len(served["rows"]) == 48
    assert _differences(adapted["completions"], served["nemo"]) == []


def test_vllm_chat_completions_with_the_adapter_equal_nemo_greedy_answers(served, adapted):
    """Chat messages (system + user) rendered by the exported tokenizer's chat template are the prompt NeMo was given,
    token for token, so the answers are NeMo's."""
    assert _differences(adapted["chats"], served["nemo"]) == []


def test_vllm_applies_the_adapter(served, adapted):
    """Without the adapter (the base's own name) vLLM answers differently on a good part of the first 16 prompts:
    the equalities above are the adapter's, not the base's."""
    base = _ask(served, str(served["hf_base"]), prompts=16, chats=False)
    changed = sum(a.strip() != b.strip() for a, b in zip(adapted["completions"], base["completions"]))
    assert changed >= 4, changed
