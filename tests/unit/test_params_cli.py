"""``python -m nemo_tiedlora params``: numbers against the closed forms, exit codes, no NeMo import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from spec_table import PRESET_NAMES, table_total, table_total_mha

from nemo_tiedlora.apps.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "nemo_tiedlora", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def call_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """In-process run of the CLI (the subprocess tests above cover ``python -m``; torch takes seconds to import)."""
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_params_json_matches_the_paper_table_mha() -> None:
    d, layers, r = 4096, 32, 8
    result = run_cli("params", "--hidden-size", str(d), "--num-layers", str(layers), "--rank", str(r), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["out_features"] == 3 * d
    assert report["lora_parameters"] == 4 * layers * d * r
    assert list(report["presets"]) == list(PRESET_NAMES)
    for preset in PRESET_NAMES:
        row = report["presets"][preset]
        expected = table_total_mha(preset, d=d, layers=layers, r=r)
        assert row["total"] == expected
        assert row["A"] + row["B"] + row["u"] + row["v"] == expected
        assert row["percent_of_lora"] == pytest.approx(100.0 * expected / (4 * layers * d * r))


def test_params_json_gqa_uses_the_true_out_width(capsys: pytest.CaptureFixture[str]) -> None:
    d, heads, groups, layers, r = 8192, 64, 8, 80, 16
    out = 8192 + 2 * 8 * 128
    rc, stdout, stderr = call_main(
        capsys,
        "params", "--hidden-size", str(d), "--num-layers", str(layers), "--rank", str(r),
        "--num-attention-heads", str(heads), "--num-query-groups", str(groups), "--json",
    )
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["out_features"] == out
    lora = layers * r * (d + out)
    assert report["lora_parameters"] == lora
    for preset in PRESET_NAMES:
        expected = table_total(preset, d=d, layers=layers, r=r, out=out)
        assert report["presets"][preset]["total"] == expected
        assert report["presets"][preset]["percent_of_lora"] == pytest.approx(100.0 * expected / lora)


def test_params_table_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    d, layers, r = 4096, 32, 8
    shape = ("--hidden-size", str(d), "--num-layers", str(layers), "--rank", str(r))
    rc, stdout, stderr = call_main(capsys, "params", *shape)
    assert rc == 0, stderr
    lines = stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == list(PRESET_NAMES)
    for preset in PRESET_NAMES:
        assert rows[preset][5] == f"{table_total_mha(preset, d=d, layers=layers, r=r):,}"
    assert rows["lora"][6] == "100.00"
    widths = {len(line) for line in lines[1:]}
    assert len(widths) == 1, "columns are aligned"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--rank", "0"], ["rank", "adapter_dim"]),
        (["--rank", "-3"], ["rank", "positive"]),
        (["--rank", "8", "--num-attention-heads", "6"], ["divisible", "num_attention_heads"]),
        (["--rank", "8", "--num-attention-heads", "32", "--num-query-groups", "5"], ["num_query_groups"]),
        (["--rank", "8", "--num-query-groups", "8"], ["--num-attention-heads"]),
        (["--rank", "8192"], ["exceeds hidden size", "adapter_dim <= 4096"]),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], words: list[str]
) -> None:
    rc, stdout, stderr = call_main(capsys, "params", "--hidden-size", "4096", "--num-layers", "32", *args)
    assert rc == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_bad_rank_exits_2_from_the_command_line() -> None:
    result = run_cli("params", "--hidden-size", "4096", "--num-layers", "32", "--rank", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: rank (adapter_dim) must be a positive int, got 0: set adapter_dim to e.g. 8"


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "params" in capsys.readouterr().err


def test_params_never_imports_nemo_or_megatron() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import nemo_tiedlora.apps.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = c.main(['params', '--hidden-size', '64', '--num-layers', '2', '--rank', '4', '--json'])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nemo', 'megatron'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
