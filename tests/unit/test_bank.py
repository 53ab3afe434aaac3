"""The adapter bank's mixed-batch update against each adapter run alone through the per-layer module.

The reference is ``core.modules.LayerFactors`` (the module training uses: the hand-written autograd update), one
adapter and one sequence at a time; the bank computes the whole batch at once from stacked, zero-padded factors.
Every preset, GQA, a layer selection, ranks below the bank's maximum, K = 1 and K = 64 adapters, a batch where every
row has its own adapter, one where all share one, and rows on the plain base (no update).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nemo_tiedlora.core.bank import AdapterBank, BankShape
from nemo_tiedlora.core.config import PRESETS, TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.core.functional import qkv_out_width
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors
from nemo_tiedlora.formats.adapter_keys import layer_key
from nemo_tiedlora.formats.bank_entry import bank_adapter

D, HEADS, GROUPS, LAYERS = 32, 4, 2, 4
OUT = qkv_out_width(D, HEADS, GROUPS)  # GQA: 32 + 2 * 2 * 8 = 64
SHAPE = BankShape(D, LAYERS, OUT)


class Reference:
    """One adapter as the training modules hold it, with every factor random (so no factor hides another)."""

    def __init__(self, cfg: TiedLoraConfig, seed: int) -> None:
        self.cfg = cfg
        self.shared = SharedFactors(cfg, in_features=D, out_features=OUT) if cfg.flags.tied else None
        numbers = cfg.layer_selection or range(1, LAYERS + 1)
        self.layers = {n: LayerFactors(cfg, in_features=D, out_features=OUT, layer_number=n, shared=self.shared)
                       for n in numbers}
        generator = torch.Generator().manual_seed(seed)
        for module in [self.shared, *self.layers.values()]:
            for param in (module.parameters() if module is not None else ()):
                param.data = torch.randn(param.shape, generator=generator) * 0.3
        for module in self.layers.values():
            module.eval()

    def state(self) -> dict[str, torch.Tensor]:
        """The logical adapter state (the archive's keys) of these modules."""
        state = {}
        if self.shared is not None:
            state["A"], state["B"] = (t.detach().clone() for t in self.shared.factors)
        for n, module in self.layers.items():
            a, b, u, v = (t.detach().clone() for t in module.factors)
            state[layer_key(n, "u")], state[layer_key(n, "v")] = u, v
            if self.shared is None:
                state[layer_key(n, "A")], state[layer_key(n, "B")] = a, b
        return state

    @torch.no_grad()
    def update(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            return torch.zeros(*x.shape[:-1], OUT)
        return self.layers[layer](x)


def _config(preset: str, rank: int, seed: int, selection=None) -> TiedLoraConfig:
    return TiedLoraConfig(rank=rank, alpha=2.0 * rank if seed % 2 else None, preset=preset, seed=seed,
                          layer_selection=selection)


def _bank(refs: dict[str, Reference], *, max_rank: int = 8, capacity: int = 8) -> AdapterBank:
    bank = AdapterBank(SHAPE, max_rank=max_rank, capacity=capacity)
    for name, ref in refs.items():
        bank.add(name, bank_adapter(ref.state(), ref.cfg, num_layers=LAYERS))
    return bank


def _check(bank: AdapterBank, refs: dict[str, Reference], names: list, *, tokens: int = 5, seed: int = 0) -> None:
    x = torch.randn(len(names), tokens, D, generator=torch.Generator().manual_seed(seed))
    batch = bank.gather(names)
    for layer in range(1, LAYERS + 1):
        got = batch.update(x, layer)
        for row, name in enumerate(names):
            want = torch.zeros(tokens, OUT) if name is None else refs[name].update(x[row], layer)
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"row {row} ({name}), layer {layer}: {m}")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_alone_and_beside_the_base_equals_its_module(preset):
    """K = 1: rows on the adapter equal LayerFactors' update at every layer; rows on the base get zero."""
    refs = {preset: Reference(_config(preset, 8, seed=3), seed=11)}
    _check(_bank(refs), refs, [preset, None, preset])


def test_64_adapters_every_row_its_own_mixed_presets_ranks_and_layer_selections():
    """K = 64, every preset, ranks 2/4/8 in one bank of max rank 8 (zero-padded), some with a layer selection,
    one batch in which each of the 64 rows uses a different adapter."""
    presets = sorted(PRESETS)
    selections = [None, (1, 3), (2,), None]
    refs = {}
    for k, (preset, rank) in enumerate(itertools.islice(itertools.cycle(itertools.product(presets, (2, 4, 8))), 64)):
        refs[f"a{k}"] = Reference(_config(preset, rank, seed=k, selection=selections[k % 4]), seed=100 + k)
    bank = _bank(refs, capacity=4)  # grows from 4 slots while loading
    assert len(bank) == 64
    _check(bank, refs, list(refs), tokens=3)


def test_a_batch_that_shares_one_adapter_and_one_that_mixes_with_the_base():
    refs = {name: Reference(_config(preset, 4, seed=i), seed=i) for i, (name, preset)
            in enumerate([("t6", "tl6"), ("lo", "lora"), ("ve", "vera")])}
    bank = _bank(refs)
    _check(bank, refs, ["t6"] * 6)
    _check(bank, refs, ["lo", None, "t6", "lo", None, "ve"], seed=1)


def test_megatron_layout_sequence_first():
    """``batch_dim=1``: x [s, b, d] as Megatron passes it; sequence b uses its own adapter."""
    refs = {name: Reference(_config(preset, 8, seed=i), seed=i) for i, (name, preset) in enumerate([("x", "tl5"),
                                                                                                    ("y", "lora")])}
    bank = _bank(refs)
    x = torch.randn(7, 3, D, generator=torch.Generator().manual_seed(5))  # [s, b, d]
    got = bank.gather(["y", None, "x"]).update(x, 2, batch_dim=1)
    assert got.shape == (7, 3, OUT)
    torch.testing.assert_close(got[:, 0], refs["y"].update(x[:, 0], 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 1], torch.zeros(7, OUT))
    torch.testing.assert_close(got[:, 2], refs["x"].update(x[:, 2], 2), rtol=1e-5, atol=1e-5)


def test_a_tensor_parallel_rank_gets_its_rows_of_the_output():
    """``out_rows``: each of two ranks' partitions equals its rows of the whole update (tied and untied rows)."""
    refs = {name: Reference(_config(preset, 8, seed=i), seed=i) for i, (name, preset) in enumerate([("x", "tl6"),
                                                                                                    ("y", "lora")])}
    bank = _bank(refs)
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(6))
    names = ["x", "y", None]
    whole = bank.gather(names).update(x, 3)
    halves = [bank.gather(names, out_rows=slice(k * OUT // 2, (k + 1) * OUT // 2)).update(x, 3) for k in range(2)]
    torch.testing.assert_close(torch.cat(halves, dim=-1), whole)
    torch.testing.assert_close(whole[0], refs["x"].update(x[0], 3), rtol=1e-5, atol=1e-5)


def test_adding_and_removing_adapters_in_a_live_bank_leaves_the_others_unchanged():
    refs = {f"n{i}": Reference(_config("tl6" if i % 2 else "lora", 8, seed=i), seed=i) for i in range(5)}
    bank = AdapterBank(SHAPE, max_rank=8, capacity=2)
    for name in ("n0", "n1", "n2"):
        bank.add(name, bank_adapter(refs[name].state(), refs[name].cfg, num_layers=LAYERS))
    _check(bank, refs, ["n0", "n1", "n2"])
    bank.remove("n1")
    assert "n1" not in bank and bank.names == ["n0", "n2"]
    with pytest.raises(KeyError):
        bank.gather(["n1"])
    for name in ("n3", "n4"):  # reuse the freed slot, then grow
        bank.add(name, bank_adapter(refs[name].state(), refs[name].cfg, num_layers=LAYERS))
    _check(bank, refs, ["n4", "n0", "n3", "n2", None], seed=2)


def test_bytes_resident_are_each_adapters_own_factors():
    """tl6 r8 holds d*r + out*r + L*(r + out) numbers, lora r8 L*(d*r + out*r) (fp32: 4 bytes each)."""
    refs = {"t": Reference(_config("tl6", 8, seed=1), seed=1), "l": Reference(_config("lora", 8, seed=2), seed=2)}
    bank = _bank(refs)
    assert bank.adapter_bytes("t") == 4 * (D * 8 + OUT * 8 + LAYERS * (8 + OUT))
    assert bank.adapter_bytes("l") == 4 * LAYERS * (D * 8 + OUT * 8)
    assert bank.adapter_bytes() == bank.adapter_bytes("t") + bank.adapter_bytes("l")


@pytest.mark.parametrize("case, message", [
    ("shape", "trained for another base (hidden_size=32, num_layers=4, qkv out=96)"),
    ("rank", "rank 16, above the bank's max rank 8: raise --max-lora-rank to at least 16"),
    ("duplicate", "adapter 'a' is already loaded"),
])
def test_an_adapter_that_cannot_join_is_refused_with_the_reason(case, message):
    bank = _bank({"a": Reference(_config("tl6", 8, seed=1), seed=1)})
    if case == "shape":  # multi-head attention on the same hidden size: qkv out 96, not 64
        cfg = _config("tl6", 8, seed=2)
        state = {"A": torch.randn(8, D), "B": torch.randn(96, 8),
                 **{layer_key(n, f): torch.randn(8 if f == "u" else 96) for n in range(1, 5) for f in "uv"}}
        entry = bank_adapter(state, cfg, num_layers=LAYERS)
    elif case == "rank":
        ref = Reference(_config("tl6", 16, seed=2), seed=2)
        entry = bank_adapter(ref.state(), ref.cfg, num_layers=LAYERS)
    else:
        ref = Reference(_config("tl6", 8, seed=3), seed=3)
        entry = bank_adapter(ref.state(), ref.cfg, num_layers=LAYERS)
    with pytest.raises(TiedLoraConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bank.add("a" if case == "duplicate" else "b", entry)
    assert bank.names == ["a"]


def test_an_adapter_for_more_layers_than_the_base_is_refused():
    ref = Reference(_config("tl6", 8, seed=1), seed=1)
    with pytest.raises(TiedLoraConfigError, match="adapts layers \\[4\\] but the base has 3 layers"):
        bank_adapter(ref.state(), ref.cfg, num_layers=3)


def _save(path, ref: Reference, shape=None):
    from nemo_tiedlora.formats.adapter_archive import save_archive

    shape = shape or {"hidden_size": D, "num_layers": LAYERS, "num_attention_heads": HEADS,
                      "num_query_groups": GROUPS, "kv_channels": D // HEADS, "out_features": OUT}
    return save_archive(path, config=ref.cfg, shape=shape, tensors=ref.state())


BASE_SHAPE = {"hidden_size": D, "num_layers": LAYERS, "num_attention_heads": HEADS, "num_query_groups": GROUPS,
              "kv_channels": D // HEADS, "out_features": OUT}


def test_a_folder_of_archives_loads_into_a_bank_named_by_file(tmp_path):
    """adapter_files + load_bank: every .nemo of a folder, named by its stem, max rank the highest among them;
    the bank's update for each name equals that archive's adapter run alone."""
    from nemo_tiedlora.formats.bank_entry import adapter_files, load_bank

    refs = {"alpha": Reference(_config("tl6", 4, seed=1), seed=1), "beta": Reference(_config("lora", 8, seed=2),
                                                                                    seed=2)}
    for name, ref in refs.items():
        _save(tmp_path / f"{name}.nemo", ref)
    (tmp_path / "notes.txt").write_text("not an adapter")
    loaded = []
    bank = load_bank(adapter_files(tmp_path), BASE_SHAPE, progress=loaded.append)
    assert sorted(bank.names) == ["alpha", "beta"] and sorted(loaded) == ["alpha", "beta"] and bank.max_rank == 8
    _check(bank, refs, ["beta", "alpha", None])
    listed = adapter_files([tmp_path / "beta.nemo", str(tmp_path / "alpha.nemo")])
    assert list(listed) == ["beta", "alpha"]


def test_adapter_sets_that_cannot_load_are_refused_naming_the_file(tmp_path):
    from nemo_tiedlora.core.errors import TiedLoraCheckpointError
    from nemo_tiedlora.formats.bank_entry import adapter_files, load_bank

    with pytest.raises(TiedLoraConfigError, match="no adapter .nemo files in"):
        adapter_files(tmp_path)
    with pytest.raises(TiedLoraConfigError, match="does not exist"):
        adapter_files([tmp_path / "missing.nemo"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = Reference(_config("tl6", 4, seed=1), seed=1)
    _save(tmp_path / "a" / "same.nemo", ref)
    _save(tmp_path / "b" / "same.nemo", ref)
    with pytest.raises(TiedLoraConfigError, match="two adapters are named 'same'"):
        adapter_files([tmp_path / "a", tmp_path / "b"])
    other = dict(BASE_SHAPE, num_layers=6)
    with pytest.raises(TiedLoraCheckpointError, match="adapter 'same' .*trained for a base of shape"):
        load_bank(adapter_files(tmp_path / "a"), other)
