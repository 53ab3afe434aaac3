"""The adapter archive: one logical state, loadable at any TP/PP (docs/design.md section 6).

A Tied-LoRA adapter `.nemo` is a tar archive holding
- `tiedlora.json`: format version, scheme, the resolved config (flags, rank, alpha, inits, seeds), the base model's
  shape fingerprint and the tensor index (name, shape, dtype) of the payload;
- `adapter.safetensors`: A and B once (tied) and u_l, v_l (and untied A_l, B_l) by 1-based *global* layer, keyed as
  `nemo_tiedlora.formats.adapter_keys` defines (the one owner of the key format); frozen random factors are stored too;
- `model_config.yaml`: the NeMo model config of the run (with its `peft` section), for NeMo tools.

No tokenizer, no optimizer state: the file is the raw tensor bytes plus a few KB. Writes go to a temporary file in the
target folder and are renamed at the end (`fileio.atomic_output`), so a failed or killed save never leaves a
half-written archive. Formats layer: pure Python + torch (+ safetensors); the NeMo glue is in
`nemo_tiedlora.nemo.adapter_io`.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.core.fileio import atomic_output, check_output, remove_stale_partials
from nemo_tiedlora.formats.adapter_keys import expected_keys, factor_of
from nemo_tiedlora.core.model_shape import SHAPE_KEYS

FORMAT = "nemo_tiedlora.adapter"
VERSION = 1
META_NAME = "tiedlora.json"
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "model_config.yaml"


@dataclass(frozen=True)
class AdapterArchive:
    """A loaded adapter archive: config, base shape, tensors by logical key, NeMo model config (YAML text)."""

    config: TiedLoraConfig
    shape: dict[str, int]
    tensors: dict[str, torch.Tensor]
    model_config_yaml: Optional[str]
    meta: dict[str, Any]


def expected_shapes(config: TiedLoraConfig, shape: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    r, d, out = config.rank, shape["hidden_size"], shape["out_features"]
    by_factor = {"A": (r, d), "B": (out, r), "u": (r,), "v": (out,)}
    return {key: by_factor[factor_of(key)] for key in expected_keys(config, shape["num_layers"])}


def validate_state(tensors: Mapping[str, torch.Tensor], config: TiedLoraConfig, shape: Mapping[str, int]) -> None:
    """One error listing every missing, unexpected and mis-shaped key (never the first KeyError only)."""
    expected = expected_shapes(config, shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{key}: {tuple(tensors[key].shape)} != {expected[key]}"
        for key in set(expected) & set(tensors)
        if tuple(tensors[key].shape) != expected[key]
    )
    if missing or unexpected or misshaped:
        raise TiedLoraCheckpointError(
            "adapter state does not match its config: "
            + "; ".join(
                part
                for part in (
                    f"missing keys {missing}" if missing else "",
                    f"unexpected keys {unexpected}" if unexpected else "",
                    f"wrong shapes {misshaped}" if misshaped else "",
                )
                if part
            )
            + ". The archive is corrupt or was edited; re-export it from the training run."
        )


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/Inf factors, naming every tensor that holds one (a diverged run's adapter is never used)."""
    bad = sorted(key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all()))
    if bad:
        raise TiedLoraCheckpointError(
            f"{where}: non-finite values (NaN/Inf) in {bad}: the training run diverged; use an adapter saved before "
            "the divergence, or train again with a lower learning rate or gradient clipping (trainer.gradient_clip_val)"
        )


def check_base_shape(adapter_shape: Mapping[str, int], base_shape: Mapping[str, int]) -> None:
    """Refuse an adapter made for a base of another shape, naming both shapes."""
    differs = {k: (adapter_shape.get(k), base_shape.get(k)) for k in SHAPE_KEYS
               if adapter_shape.get(k) != base_shape.get(k)}
    if differs:
        raise TiedLoraCheckpointError(
            f"the adapter was trained for a base of shape {_shape_text(adapter_shape)} but this base has shape "
            f"{_shape_text(base_shape)} (differs in {sorted(differs)}): load it onto the base it was trained with"
        )


def _shape_text(shape: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{k}={shape.get(k)}" for k in SHAPE_KEYS) + ")"


def save_archive(
    path: Path,
    *,
    config: TiedLoraConfig,
    shape: Mapping[str, int],
    tensors: Mapping[str, torch.Tensor],
    model_config_yaml: Optional[str] = None,
    overwrite: bool = True,
    extra_meta: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the archive atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save as safetensors_save

    path = check_output(path, overwrite=overwrite)
    validate_state(tensors, config, shape)
    check_finite(tensors, f"refusing to write {path}")
    payload = safetensors_save({k: v.detach().cpu().contiguous().clone() for k, v in sorted(tensors.items())})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "scheme": "tiedlora",
        "config": config.to_dict(),
        "base_shape": {k: int(shape[k]) for k in SHAPE_KEYS},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in sorted(tensors.items())},
        **(dict(extra_meta) if extra_meta else {}),
    }
    members = [(META_NAME, json.dumps(meta, indent=2).encode()), (WEIGHTS_NAME, payload)]
    if model_config_yaml is not None:
        members.append((CONFIG_NAME, model_config_yaml.encode()))
    remove_stale_partials(path)  # left by a killed save of this file
    with atomic_output(path) as partial, tarfile.open(partial, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_error_text(error: BaseException) -> str:
    """tarfile's error on one line: its "could not be opened" lists one attempt per compression on five lines."""
    text = " ".join(str(error).split())
    return "not a tar archive" if "could not be opened" in text or not text else text


def is_tiedlora_archive(path: Path) -> bool:
    """True if `path` is a tar archive with a tiedlora.json member (cheap: reads the index only)."""
    try:
        with tarfile.open(path) as tar:
            return any(member.name.lstrip("./") == META_NAME for member in tar.getmembers())
    except (tarfile.TarError, OSError):
        return False


def load_archive(path: Path, *, finite: bool = True) -> AdapterArchive:
    """Read and validate an archive; every failure is a TiedLoraCheckpointError naming the file and the fix.
    `finite`: also refuse NaN/Inf tensors (False only to inspect such an archive)."""
    from safetensors.torch import load as safetensors_load

    path = Path(path)
    if not path.is_file():
        raise TiedLoraCheckpointError(f"{path}: no such adapter file")
    try:
        with tarfile.open(path) as tar:
            files = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as error:
        cause = tar_error_text(error)
        raise TiedLoraCheckpointError(
            f"{path} is not a readable adapter archive ({cause}): the file is truncated or corrupt, or not an adapter "
            "file; copy it again or re-export it from the training run"
        ) from error
    if META_NAME not in files or WEIGHTS_NAME not in files:
        raise TiedLoraCheckpointError(
            f"{path} lacks {META_NAME} or {WEIGHTS_NAME}: it is not a Tied-LoRA adapter archive (a NeMo PEFT "
            "archive of another scheme, or a base model?)"
        )
    try:
        meta = json.loads(files[META_NAME])
        tensors = dict(safetensors_load(files[WEIGHTS_NAME]))
    except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
        raise TiedLoraCheckpointError(f"{path}: damaged adapter payload ({error}); re-export the adapter") from error
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TiedLoraCheckpointError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} {VERSION}: "
            "upgrade nemo_tiedlora"
        )
    config = TiedLoraConfig.from_dict(meta["config"])
    shape = {k: int(v) for k, v in meta["base_shape"].items()}
    validate_state(tensors, config, shape)
    if finite:
        check_finite(tensors, str(path))
    config_yaml = files.get(CONFIG_NAME)
    return AdapterArchive(config, shape, tensors, config_yaml.decode() if config_yaml else None, meta)
