"""The benchmark's target checks and table, on hand-made rows (the measurements themselves are never asserted)."""

from nemo_tiedlora.apps.bench import _markdown, _targets


def _row(config, step, memory, file_bytes=0, raw=0):
    return {"config": config, "median_step_s": step, "round_medians_s": [step], "peak_rss_mb": 900.0,
            "adapter_memory_bytes": memory, "trainable_parameters": 1, "optimizer_state_bytes": 8,
            "adapter_file_bytes": file_bytes, "adapter_raw_bytes": raw, "merge_s": 0.001}


def test_targets_met_and_missed():
    rows = {"lora": _row("lora", 1.00, 200, 100, 100), "tl6": _row("tl6", 1.04, 50, 1000, 1000)}
    met = _targets(rows)
    assert "1.040 -> met" in met[0] and "-> met" in met[1] and "-> met" in met[2]
    rows["tl6"] = _row("tl6", 1.06, 300, 1.05 * 1000 + 64 * 1024 + 1, 1000)
    missed = _targets(rows)
    assert all("MISSED" in line for line in missed)


def test_markdown_has_ratios_against_lora_and_base():
    rows = [_row("base", 0.5, 0), _row("lora", 1.0, 200, 10, 10), _row("tl6", 0.9, 50, 10, 10)]
    report = {"machine": {"device": "cpu"}, "model": "m", "rank": 8, "steps": 3, "batch": 2, "rounds": 1,
              "rows": rows, "targets": ["t"]}
    text = _markdown(report)
    assert "| tl6 | 0.9000 | 0.9000 | 0.900 | 1.800 |" in text
