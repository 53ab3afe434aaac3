"""`python tests/vllm_client.py <base url> <model> <requests.json> <out.json>`: greedy answers from an
OpenAI-compatible server (vLLM) through the `openai` client; runs in the serving environment (no project import).

requests.json: {"max_tokens": int, "completions": [prompt text], "chats": [[{"role", "content"}]]}. Written:
{"completions": [text], "chats": [text], "models": [ids the server lists]}, in the order asked. The requests go out
16 at a time, as concurrent users would send them, so the server batches them (one at a time, vLLM on two CPU cores
spends minutes on a hundred short answers).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def main(base_url: str, model: str, requests_file: str, out_file: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused")
    requests = json.load(open(requests_file, encoding="utf-8"))
    greedy = dict(model=model, max_tokens=requests["max_tokens"], temperature=0.0, seed=0)
    with ThreadPoolExecutor(max_workers=16) as pool:
        completions = list(pool.map(lambda prompt: client.completions.create(prompt=prompt, **greedy).choices[0].text,
                                    requests["completions"]))
        chats = list(pool.map(
            lambda messages: client.chat.completions.create(messages=messages, **greedy).choices[0].message.content,
            requests["chats"]))
    result = {"models": sorted(m.id for m in client.models.list().data), "completions": completions, "chats": chats}
    with open(out_file, "w", encoding="utf-8") as out:
        json.dump(result, out, ensure_ascii=False)


if __name__ == "__main__":
    main(*sys.argv[1:5])
