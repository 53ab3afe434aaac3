"""Read a Hugging Face checkpoint for import: a folder (config.json + safetensors, sharded or not) or a .gguf file.

No NeMo import. Safetensors are opened memory-mapped and read one tensor at a time (only tensors that are fused
or cast are copied); a GGUF file is dequantized by ``transformers`` (float32), exactly as
``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` loads it, so the import and ``transformers`` see the
same weights.

The tokenizer is saved as the files of a *fast* Hugging Face tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), never the slow ``tokenizer.model`` (from a GGUF that is a
98 MB copy of the GGUF itself). Its BOS/EOS/PAD/UNK and whether BOS/EOS are added are exactly what the source
declares: a folder's tokenizer files are taken as they are; for a GGUF the ``tokenizer.ggml.*_token_id`` and
``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` fields override what ``transformers`` 4.51 guesses (it adds
a BOS the GGUF says not to add and takes ``<|im_start|>`` as EOS for SmolLM2). A GGUF's byte-level BPE is rebuilt
with llama.cpp's pre-tokenizer for its ``tokenizer.ggml.pre`` and saved as ``PreTrainedTokenizerFast``, and any
byte-level BPE is declared as that class (``nemo_tiedlora.formats.hf.tokenizer``), so ``transformers`` 4.x and 5.x (vLLM
included) produce the same ids.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.formats.hf.llama_to_nemo import nemo_model_config
from nemo_tiedlora.formats.hf.tokenizer import gguf_byte_level_json, portable_files

logger = logging.getLogger("nemo_tiedlora")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class HFSource:
    """A checkpoint opened for import."""

    config: dict[str, Any]  # config.json contents (model_type, sizes, ...)
    names: list[str]  # every tensor name in the checkpoint
    get: Callable[[str], Tensor]  # load one tensor by name
    tokenizer: Any  # a transformers PreTrainedTokenizerFast, special tokens as the source declares them
    description: str


def open_source(path: str | Path) -> HFSource:
    """Open a HF checkpoint folder or a ``.gguf`` file (clear errors for anything else)."""
    path = Path(path)
    if not path.exists():
        raise TiedLoraCheckpointError(f"{path} does not exist: pass a Hugging Face checkpoint folder (config.json + "
                                      "*.safetensors) or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path)
    if path.is_dir():
        return _open_folder(path)
    raise TiedLoraCheckpointError(f"{path} is neither a folder nor a .gguf file: pass a Hugging Face checkpoint "
                                  "folder (config.json + *.safetensors) or a .gguf file")


def _open_folder(folder: Path) -> HFSource:
    from safetensors import safe_open

    config_file = folder / "config.json"
    if not config_file.exists():
        raise TiedLoraCheckpointError(f"{folder} has no config.json: pass the folder of a Hugging Face checkpoint")
    config = json.loads(config_file.read_text())
    nemo_model_config(config)  # an unsupported family or setting is refused before any weight is opened
    index = folder / _SAFETENSORS_INDEX
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (folder / name).exists()]
        if absent:
            raise TiedLoraCheckpointError(f"{folder}: {_SAFETENSORS_INDEX} lists shards that are not there: {absent}; "
                                          "download the complete checkpoint")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            raise TiedLoraCheckpointError(
                f"{folder} has no *.safetensors weights" + (f" (only {bins}: convert them to safetensors first, "
                                                            "e.g. with transformers' save_pretrained)" if bins else ""))
        weight_map = {}
    handles = {name: safe_open(str(folder / name), framework="pt") for name in files}  # memory-mapped
    if not weight_map:
        for name, handle in handles.items():
            for key in handle.keys():
                if key in weight_map:
                    raise TiedLoraCheckpointError(f"{key} is stored in both {weight_map[key]} and {name}: remove the "
                                                  "stale shard from the folder")
                weight_map[key] = name
    for name, handle in handles.items():  # the index and the files agree
        stray = [key for key in handle.keys() if weight_map.get(key) != name]
        if stray:
            raise TiedLoraCheckpointError(f"{name} holds {stray[:4]} that {_SAFETENSORS_INDEX} does not map to it: "
                                          "the index and the shards are from different checkpoints")

    def get(key: str) -> Tensor:
        return handles[weight_map[key]].get_tensor(key)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as error:  # noqa: BLE001 - any failure means the folder's tokenizer files are unusable
        raise TiedLoraCheckpointError(f"cannot load the tokenizer in {folder} ({error}): the folder needs its "
                                      "tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json)") \
            from error
    return HFSource(config, sorted(weight_map), get, tokenizer, f"{folder} ({len(files)} safetensors file(s))")


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _open_gguf(file: Path) -> HFSource:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        import gguf
    except ImportError as error:
        raise TiedLoraCheckpointError("reading a .gguf file needs the `gguf` package: pip install gguf") from error
    folder, name = str(file.parent), file.name
    hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config = hf_config.to_dict()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    tensors: dict[str, Tensor] = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton)["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reader = gguf.GGUFReader(str(file))
    special = {}
    for role, field in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = _gguf_field(reader, f"tokenizer.ggml.{field}_token_id")
        if token_id is not None:
            special[f"{role}_token"] = tokenizer.convert_ids_to_tokens(int(token_id))
    tokenizer.add_special_tokens(special)  # existing tokens: the vocabulary does not grow
    for flag in ("add_bos_token", "add_eos_token"):
        declared = _gguf_field(reader, f"tokenizer.ggml.{flag}")
        if hasattr(tokenizer, flag):
            setattr(tokenizer, flag, bool(declared) if declared is not None else False)  # updates the post-processor
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = str(template)
    if _gguf_field(reader, "tokenizer.ggml.model") == "gpt2":  # byte-level BPE
        tokenizer = _gguf_byte_level_tokenizer(tokenizer, _gguf_field(reader, "tokenizer.ggml.pre"), file)
    return HFSource(config, sorted(tensors), tensors.__getitem__, tokenizer, f"{file} (GGUF, dequantized to float32)")


def _gguf_byte_level_tokenizer(loaded: Any, pre: Any, file: Path) -> Any:
    """The GGUF's byte-level BPE as a ``PreTrainedTokenizerFast`` with llama.cpp's pre-tokenizer for ``pre``
    (``nemo_tiedlora.formats.hf.tokenizer``): the special tokens, BOS/EOS flags (in the post-processor) and chat
    template of ``loaded``, no clean-up of spaces when decoding (llama.cpp does none)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer_json, known = gguf_byte_level_json(json.loads(loaded.backend_tokenizer.to_str()), pre)
    if not known:
        logger.warning("%s: GGUF pre-tokenizer %r has no known rule here; keeping GPT-2's. Check the imported "
                       "tokenizer against llama.cpp, or import the model's Hugging Face folder instead", file, pre)
    special = {name: getattr(loaded, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(loaded, name, None) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tokenizer_json)), **special,
                                   chat_template=loaded.chat_template, clean_up_tokenization_spaces=False)


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The fast tokenizer's files (``TOKENIZER_FILES``), as ``save_pretrained(legacy_format=False)`` writes them."""
    if not getattr(tokenizer, "is_fast", False):
        raise TiedLoraCheckpointError(f"the tokenizer ({type(tokenizer).__name__}) has no fast version: import-hf "
                                      "stores a tokenizer.json; install `tokenizers`/`sentencepiece` or add one")
    with tempfile.TemporaryDirectory(prefix="tiedlora-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp, legacy_format=False)  # no slow tokenizer.model copy
        files = {name: (Path(tmp) / name).read_bytes() for name in TOKENIZER_FILES if (Path(tmp) / name).exists()}
    if "tokenizer.json" not in files:
        raise TiedLoraCheckpointError("the tokenizer wrote no tokenizer.json: import-hf needs a fast tokenizer")
    return portable_files(files)  # read the same way by transformers 4.x and 5.x
