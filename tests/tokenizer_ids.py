"""`python tests/tokenizer_ids.py <tokenizer folder> <texts.json> <out.json>`: ids and decodings under whatever
`transformers` runs it (the project's pinned 4.x, or the vLLM environment's 5.x): no project import.

texts.json: {"texts": [str], "chats": [[{"role", "content"}]]}. Written: transformers' version, the tokenizer's
class, and per text its ids (``add_special_tokens=False`` and the default), its decoding with and without special
tokens; per chat the rendered prompt (``apply_chat_template``) and its ids.
"""

import json
import sys

import transformers
from transformers import AutoTokenizer


def main(folder: str, texts_file: str, out_file: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = json.load(open(texts_file, encoding="utf-8"))
    texts = []
    for text in inputs["texts"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        texts.append({"ids": ids, "ids_default": tokenizer(text).input_ids, "decoded": tokenizer.decode(ids),
                      "decoded_skip": tokenizer.decode(ids, skip_special_tokens=True)})
    chats = []
    for messages in inputs["chats"]:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append({"prompt": prompt, "ids": tokenizer(prompt, add_special_tokens=False).input_ids})
    result = {"transformers": transformers.__version__, "class": type(tokenizer).__name__, "texts": texts,
              "chats": chats}
    with open(out_file, "w", encoding="utf-8") as out:
        json.dump(result, out, ensure_ascii=False)


if __name__ == "__main__":
    main(*sys.argv[1:4])
