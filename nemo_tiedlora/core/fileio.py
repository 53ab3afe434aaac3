"""Output files (core layer: pure Python): nothing is ever half-written under its final name, nothing is replaced
unless asked.

The one overwrite check (:func:`check_output`, raising :class:`OutputExistsError`) and the one atomic writer
(:func:`atomic_output`: a temporary name beside the target, renamed onto it when the block succeeds) used by every
writer of the package: adapter archives, base ``.nemo`` files (ours and NeMo's ``save_to``), Hugging Face folders
(:func:`atomic_directory`) and small result files (:func:`atomic_write_bytes`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from nemo_tiedlora.core.errors import TiedLoraCheckpointError

PARTIAL_SUFFIX = ".partial"


class OutputExistsError(TiedLoraCheckpointError, FileExistsError):
    """The output path exists and replacing it was not asked for (``--overwrite`` / ``overwrite=True``).

    A :class:`TiedLoraCheckpointError` (the CLI's one-line error) and a :class:`FileExistsError` (what Python code
    expects from a refused write).
    """


def check_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; return it as a Path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists: choose another output path or replace it with --overwrite "
                                "(overwrite=True from Python)")
    return path


def partial_name(path: Path, suffix: str = PARTIAL_SUFFIX) -> Path:
    """A fresh hidden name beside ``path`` for its partial copy: ``.<name>.<random><suffix>``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


def remove_stale_partials(path: Path) -> None:
    """Remove what a killed write of ``path`` left (``.<name>.*.partial*``; other files' partials are kept)."""
    prefix = f".{path.name}."
    if path.parent.is_dir():
        for stale in path.parent.iterdir():
            if stale.name.startswith(prefix) and PARTIAL_SUFFIX in stale.name[len(prefix):] and stale.is_file():
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = PARTIAL_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (not yet existing; ``suffix`` ends its name, e.g. ``.partial.nemo``
    for writers that want the extension); rename it onto ``path`` when the block ends, remove it on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(path, suffix)
    try:
        yield partial
        if partial.is_file():
            os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then ``os.replace``."""
    with atomic_output(path, suffix=".tmp") as partial, open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir`` to write into; it replaces ``out_dir`` when the block ends.

    An interrupted write never leaves a half-written directory under the final name. An existing ``out_dir`` is
    refused unless ``overwrite`` (then it is replaced only after the new one is complete).
    """
    out_dir = check_output(out_dir, overwrite=overwrite)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a directory: remove it or choose another output path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=PARTIAL_SUFFIX, dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for written in tmp.rglob("*"):  # readable like any other output: some writers (safetensors) create 0600 files
            written.chmod(0o755 if written.is_dir() else 0o644)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.old"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
