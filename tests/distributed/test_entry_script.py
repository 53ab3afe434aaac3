"""The NeMo entry script end to end with more than one process: `trainer.devices=N` on CPU (relaunched under
torchrun) with the parallel layouts the README calls supported (TP2 + SP, TP2 x PP2, PP2 with the distributed
optimizer; TP2 x DP2 and PP2 x DP2 across two nodes in tests/multinode), against the same command at TP=1.
Compared: the adapter .nemo each run writes (one logical, TP/PP-independent state). As in test_equivalence.py, Adam
runs with eps far above every |grad| (momentum SGD, linear in the gradients), so that rounding-level gradient
differences of a split run stay rounding-level."""

from __future__ import annotations

import pytest

from tests.entry_runs import assert_same_adapter, run_finetune

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# TP2 and DP2 alone are not repeated here: the two-node tests (tests/multinode) run the same entry script at
# TP2 x DP2 and PP2 x DP2 against the same TP1 run (script_tp1 is shared by the session).
LAYOUTS = {
    "tp2_sequence_parallel": (2, ["model.tensor_model_parallel_size=2", "model.sequence_parallel=True"]),
    "tp2_pp2": (4, ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]),
    "pp2_distributed_optimizer": (2, ["model.pipeline_model_parallel_size=2",
                                      "model.optim.name=mcore_distributed_optim"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_entry_script_layout_equals_tp1(layout, dist_base, script_tp1):
    from nemo_tiedlora.formats.adapter_archive import load_archive

    base, data, work = dist_base
    devices, overrides = LAYOUTS[layout]
    run = load_archive(run_finetune(base, data, work, f"script_{layout}", devices, *overrides))
    assert_same_adapter(run, script_tp1, what=layout)
