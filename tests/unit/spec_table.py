"""The design's tables, written out independently of the package, for the unit tests to assert against.

docs/design.md section 2 (the paper's Table 1) and section 3 (which factor starts at zero).
"""

from __future__ import annotations

# preset: (tied, train A, train B, train u, train v)
PAPER_FLAGS: dict[str, tuple[bool, bool, bool, bool, bool]] = {
    "lora": (False, True, True, False, False),
    "vera": (True, False, False, True, True),
    "tl1": (True, True, False, False, False),
    "tl2": (True, True, False, True, True),
    "tl3": (True, False, True, False, False),
    "tl4": (True, False, True, True, False),
    "tl5": (True, True, True, False, False),
    "tl6": (True, True, True, True, True),
}

PRESET_NAMES = tuple(PAPER_FLAGS)

# Section 3: B if B trained, else v if v trained, else A if A trained, else u; worked out per preset by hand.
ZERO_FACTOR: dict[str, str] = {
    "lora": "B",
    "vera": "v",
    "tl1": "A",
    "tl2": "v",
    "tl3": "B",
    "tl4": "B",
    "tl5": "B",
    "tl6": "B",
}


def trained(preset: str) -> dict[str, bool]:
    """Which of A, B, u, v the preset trains."""
    _, a, b, u, v = PAPER_FLAGS[preset]
    return {"A": a, "B": b, "u": u, "v": v}


def table_total_mha(preset: str, *, d: int, layers: int, r: int) -> int:
    """The 'trainable parameters' column of the spec table, exactly as printed (MHA, out = 3d)."""
    L = layers
    return {
        "lora": 4 * L * d * r,
        "vera": L * (r + 3 * d),
        "tl1": d * r,
        "tl2": d * r + L * (r + 3 * d),
        "tl3": 3 * d * r,
        "tl4": 3 * d * r + L * r,
        "tl5": 4 * d * r,
        "tl6": 4 * d * r + L * (r + 3 * d),
    }[preset]


def table_total(preset: str, *, d: int, layers: int, r: int, out: int) -> int:
    """The table with 3d replaced by the true QKV out width (spec: 'With GQA, replace 3d by the true out')."""
    L = layers
    return {
        "lora": L * (d * r + out * r),
        "vera": L * (r + out),
        "tl1": d * r,
        "tl2": d * r + L * (r + out),
        "tl3": out * r,
        "tl4": out * r + L * r,
        "tl5": d * r + out * r,
        "tl6": d * r + out * r + L * (r + out),
    }[preset]
