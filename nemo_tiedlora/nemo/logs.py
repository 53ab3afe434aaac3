"""Logs a user reads (nemo glue layer): our own lines at INFO, NeMo's known-harmless config warnings summarized once.

NeMo 2.4.1 builds megatron-core's ``ModelParallelConfig`` and ``TransformerConfig`` field by field from the model
config and warns, one line per field, about every field the config does not set ("The model: ... does not have
field.name: X in its cfg. Add this key to cfg or config_mapping ..."): about 200 lines per model build, all
harmless (megatron-core's default applies). :func:`install`:

- adds a filter to NeMo's logger (``nemo_logger``) that holds those warnings back; once a model's configs are built
  (after ``MegatronBaseModel.build_transformer_config``, hooked by :func:`install_flush_hook`) one INFO line says
  "N config keys not used by this model" and the full list goes to DEBUG; keys already reported in this process
  are not reported again;
- sends the ``nemo_tiedlora`` logger's records (parameter summary, replica checks, adapter written, resume) at INFO
  through NeMo's handlers, so they appear on rank 0's console and in exp_manager's log files like NeMo's own lines,
  in every command (entry scripts and ``python -m nemo_tiedlora ...``).

Nothing else of NeMo's logging changes; ``NEMO_TIEDLORA_LOG_LEVEL=DEBUG`` shows the held-back keys.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from typing import Any

logger = logging.getLogger("nemo_tiedlora")

NEMO_LOGGER = "nemo_logger"
UNUSED_KEY = re.compile(r"The model: (?P<model>.*?) does not have field\.name: (?P<key>\w+) in its cfg\. Add this key")


class UnusedConfigKeys(logging.Filter):
    """Holds back NeMo's per-field "does not have field.name ... Add this key to cfg" warnings; :meth:`flush`
    reports the keys not reported before: one INFO line with the count, the list at DEBUG."""

    def __init__(self) -> None:
        super().__init__("tiedlora-unused-config-keys")
        self.pending: dict[str, None] = {}  # insertion-ordered set
        self.model = "the model"
        self.reported: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        match = UNUSED_KEY.search(record.getMessage())
        if match is None:
            return True
        self.model = match.group("model").rstrip("()") or self.model
        if match.group("key") not in self.reported:
            self.pending[match.group("key")] = None
        return False

    def flush(self) -> int:
        """Log the pending keys (if any); return how many were reported."""
        keys = list(self.pending)
        self.pending.clear()
        if not keys:
            return 0
        self.reported.update(keys)
        logger.info("%d config keys not used by this model (%s): megatron-core's defaults apply; the list is logged "
                    "at DEBUG (NEMO_TIEDLORA_LOG_LEVEL=DEBUG)", len(keys), self.model)
        logger.debug("config keys not used by %s: %s", self.model, ", ".join(keys))
        return len(keys)


class _ToNeMoHandlers(logging.Handler):
    """Hands our records to NeMo's logger: its console handlers (rank 0) and exp_manager's log files."""

    def emit(self, record: logging.LogRecord) -> None:
        nemo_logger = logging.getLogger(NEMO_LOGGER)
        if nemo_logger.handlers and record.levelno >= logging.INFO:
            nemo_logger.handle(record)
        else:  # NeMo's logging is not set up, or DEBUG (NeMo's handlers stop at INFO): plain stderr
            _stderr().handle(record)


_STDERR: list[logging.Handler] = []


def _stderr() -> logging.Handler:
    if not _STDERR:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        _STDERR.append(handler)
    return _STDERR[0]


_FILTER = UnusedConfigKeys()


def unused_keys_filter() -> UnusedConfigKeys:
    """The process's filter (installed on NeMo's logger by :func:`install`)."""
    return _FILTER


def _level() -> int:
    name = os.environ.get("NEMO_TIEDLORA_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def _flush_after(original: Any) -> Any:
    def build_transformer_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            _FILTER.flush()

    return build_transformer_config


def install() -> None:
    """Filter NeMo's config-key warnings and route our logger through NeMo's handlers (idempotent). The flush after
    each model's configs are built is a hook in `nemo_tiedlora.nemo.compat` (`log-unused-config-keys`)."""
    nemo_logger = logging.getLogger(NEMO_LOGGER)
    if _FILTER not in nemo_logger.filters:
        nemo_logger.addFilter(_FILTER)
    if not any(isinstance(handler, _ToNeMoHandlers) for handler in logger.handlers):
        logger.addHandler(_ToNeMoHandlers())
        logger.propagate = False  # one copy of each line (hydra's root handler would print it again)
        atexit.register(_FILTER.flush)
    logger.setLevel(_level())


def install_flush_hook() -> None:
    """Report the held-back keys once a model's configs are built (idempotent).

    The per-field warnings come from building the parallel and transformer configs; the transformer config (which
    builds the parallel one again) is the last of them in a model's construction."""
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    from nemo_tiedlora.nemo.compat.patch import replace

    replace(MegatronBaseModel, "build_transformer_config", _flush_after)
