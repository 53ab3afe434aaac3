"""NeMo's per-field "does not have field.name ... Add this key to cfg" warnings are held back and summarized in one
INFO line; the list goes to DEBUG; keys already reported are not reported again. No NeMo here:
the filter sits on a stand-in logger."""

from __future__ import annotations

import logging

import pytest

from nemo_tiedlora.nemo.logs import UnusedConfigKeys

NEMO_LINE = ("The model: MegatronGPTSFTModel() does not have field.name: {} in its cfg. Add this key to cfg or "
             "config_mapping to make to make it configurable.")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def loggers():
    nemo, ours = logging.getLogger("test_stand_in_nemo_logger"), logging.getLogger("nemo_tiedlora")
    nemo_seen, ours_seen = _Records(), _Records()
    level = ours.level
    nemo.addHandler(nemo_seen)
    nemo.setLevel(logging.INFO)
    nemo.propagate = False
    ours.addHandler(ours_seen)
    ours.setLevel(logging.DEBUG)
    keys = UnusedConfigKeys()
    nemo.addFilter(keys)
    yield nemo, keys, nemo_seen, ours_seen
    nemo.removeFilter(keys)
    nemo.removeHandler(nemo_seen)
    ours.removeHandler(ours_seen)
    ours.setLevel(level)


def test_per_field_warnings_become_one_line(loggers):
    nemo, keys, nemo_seen, ours_seen = loggers
    fields = ["fp8_margin", "moe_layer_freq", "qk_layernorm", "fp8_margin"]  # NeMo repeats fields across configs
    nemo.info("Rank 0 has data parallel group : [0]")
    for name in fields:
        nemo.warning(NEMO_LINE.format(name))
    nemo.warning("a warning of another kind")
    assert [r.getMessage() for r in nemo_seen.records] == ["Rank 0 has data parallel group : [0]",
                                                           "a warning of another kind"]
    assert keys.flush() == 3
    info = [r.getMessage() for r in ours_seen.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in ours_seen.records if r.levelno == logging.DEBUG]
    assert len(info) == 1 and info[0].startswith("3 config keys not used by this model (MegatronGPTSFTModel)")
    assert debug == ["config keys not used by MegatronGPTSFTModel: fp8_margin, moe_layer_freq, qk_layernorm"]


def test_a_second_model_with_the_same_keys_adds_no_line(loggers):
    nemo, keys, _, ours_seen = loggers
    for _ in range(2):  # e.g. merge restores the base, then builds the output model
        for name in ("fp8_margin", "qk_layernorm"):
            nemo.warning(NEMO_LINE.format(name))
        keys.flush()
    nemo.warning(NEMO_LINE.format("use_kitchen"))
    keys.flush()
    info = [r.getMessage() for r in ours_seen.records if r.levelno == logging.INFO]
    assert [line.split(" (")[0] for line in info] == ["2 config keys not used by this model",
                                                      "1 config keys not used by this model"]
    assert keys.flush() == 0  # nothing pending: no line
