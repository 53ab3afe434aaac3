"""The README is a contract: every command and hydra override it shows is checked against the real
parsers and YAML, and the cheap commands run as written.

Read generically from README.md, so a command added there is checked without touching this file:

- ``python -m nemo_tiedlora <command> ...``: parsed by the real argparse parser (``cli.build_parser``);
- ``python -m <module> ...`` and ``python <script>.py ...`` with argparse: parsed by the script's own parser (run up to
  ``parse_args`` in a subprocess, which then stops it);
- ``python <entry script>.py key=value ...`` (and ``torchrun ... <entry script>.py ...``): every override composed by
  hydra against the script's YAML (``conf/*.yaml``), as the script would: an override of a key that does not exist
  fails, exactly as it does for the user;
- ``bash scripts/run.sh <cmd> ...``: ``<cmd>`` is one of run.sh's commands, and its arguments are checked as the
  command run.sh runs;
- hydra overrides in the prose (``model.x.y=...``) and config keys (``model.x.y``) exist in the tuning YAMLs;
- the ``model.peft.tiedlora_tuning`` reference table lists exactly the YAML's keys, with the YAML's defaults;
- run as written: every ``params`` command, ``inspect adapter.nemo`` (on a real adapter archive), ``sweep ...
  --dry-run``, and ``--help`` of every subcommand (each option has a help text).

Placeholders a reader substitutes are substituted here too: ``...`` (more arguments), ``<name>``, an upper-case word
(``N``, ``DIR``, ``PATH``) as the value of an option that takes a number, ``[optional parts]`` (checked without and
with them) and ``a|b`` alternatives (each checked).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nemo_tiedlora.apps.cli import build_parser
from tests.script_env import script_env

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TUNING = REPO / "examples" / "nlp" / "language_modeling" / "tuning"
COMMAND_START = re.compile(r"^(python3?|torchrun|bash|pip)\b|^\S+\.py\b")
OVERRIDE = re.compile(r"^\+{0,2}[A-Za-z_]\w*(?:\.\w+)*=")
CONFIG_KEY = re.compile(r"^(model|trainer|exp_manager|inference)(\.\w+)+$")
FILE_NAME = re.compile(r"\.(json|ya?ml|nemo|py|md|csv|png|safetensors|model|txt|ckpt)$")  # model.safetensors.index.json
# Python API named in the prose (methods of NeMo's model), not config keys.
PYTHON_API = {"model.save_to", "model.load_adapters", "model.add_adapter"}
NUMBER_PLACEHOLDER = "2"


# ------------------------------------------------------------------------------------------------ reading README


@dataclass(frozen=True)
class Command:
    text: str  # as shown (continuations joined, comment removed)
    where: str  # "block 3" or "prose"

    @property
    def id(self) -> str:
        return f"{self.where}: {self.text[:90]}"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def _prose_spans(text: str) -> list[str]:
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def readme_commands() -> list[Command]:
    """Every command line in a code block, and every inline code span that is a command."""
    text = _readme()
    commands = []
    tags = re.findall(r"^```([^\n]*)\n.*?^```", text, flags=re.S | re.M)
    for number, (tag, block) in enumerate(zip(tags, _blocks(text)), 1):
        if tag.strip() == "text":  # a listing (the layout map), not commands
            continue
        for line in block.replace("\\\n", " ").splitlines():  # the shell joins backslash continuations
            line = line.strip()
            if COMMAND_START.match(line):
                commands.append(Command(line, f"block {number}"))
    # a span of one word (`torchrun`, `megatron_gpt_generate.py`) names a tool; longer ones are commands
    commands += [Command(span.strip(), "prose") for span in _prose_spans(text)
                 if COMMAND_START.match(span.strip()) and len(span.split()) > 1]
    return commands


def _tokens(command: Command) -> list[str]:
    return shlex.split(command.text, comments=True)


def prose_overrides() -> list[str]:
    """Inline spans made only of hydra overrides (``model.x=1 trainer.y=z``), one override each."""
    found = []
    for span in _prose_spans(_readme()):
        parts = span.split()
        if parts and all(OVERRIDE.match(part) and "." in part.split("=")[0] for part in parts):
            found += parts
    return found


def prose_config_keys() -> list[str]:
    return [span for span in _prose_spans(_readme())
            if CONFIG_KEY.match(span) and not FILE_NAME.search(span) and span not in PYTHON_API]


# ------------------------------------------------------------------------------------------------ placeholders


def _variants(tokens: list[str]) -> Iterator[list[str]]:
    """The command without its [optional parts], with all of them, and once per alternative of every a|b."""
    plain, full, depth = [], [], 0
    for token in tokens:
        opened = token.startswith("[")
        closed = token.endswith("]")
        token = token.strip("[]") if (opened or closed) else token
        if opened:
            depth += 1
        if token and depth == 0:
            plain.append(token)
        if token:
            full.append(token)
        if closed:
            depth -= 1
    alternatives = [i for i, token in enumerate(full) if "|" in token and not token.startswith("-")]
    first = [token.split("|")[0] if i in alternatives else token for i, token in enumerate(full)]
    variants = [[token.split("|")[0] if "|" in token and not token.startswith("-") else token for token in plain],
                first]
    for i in alternatives:
        for option in full[i].split("|")[1:]:
            variants.append(first[:i] + [option] + first[i + 1:])
    seen = set()
    for variant in variants:
        if tuple(variant) not in seen:
            seen.add(tuple(variant))
            yield variant


def _unplaceholder(tokens: list[str]) -> list[str]:
    """Drop `...` (more arguments), turn `<name>` into `name`."""
    return [re.sub(r"<(\w+)>", r"\1", token) for token in tokens if token != "..."]


def _numbers_for_placeholders(parser, tokens: list[str]) -> list[str]:
    """An upper-case placeholder given to an option that takes a number becomes a number."""
    numeric = {opt for action in _all_actions(parser) for opt in action.option_strings
               if action.type in (int, float)}
    out = []
    for i, token in enumerate(tokens):
        option = tokens[i - 1].split("=")[0] if i else ""
        if re.fullmatch(r"[A-Z]+", token) and option in numeric:
            token = NUMBER_PLACEHOLDER
        if "=" in token and token.startswith("--") and token.split("=", 1)[0] in numeric:
            key, value = token.split("=", 1)
            token = f"{key}={NUMBER_PLACEHOLDER}" if re.fullmatch(r"[A-Z]+", value) else token
        out.append(token)
    return out


def _all_actions(parser):
    for action in parser._actions:
        yield action
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            yield from _all_actions(sub)


# ------------------------------------------------------------------------------------------------ checkers


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if hasattr(a, "_name_parser_map")]
    return dict(sub.choices)


def _check_cli(args: list[str], where: str) -> None:
    """``python -m nemo_tiedlora <args>`` parses (argparse's own message on failure)."""
    parser = build_parser()
    for variant in _variants(_unplaceholder(args)):
        variant = _numbers_for_placeholders(parser, variant)
        try:
            parser.parse_args(variant)
        except SystemExit as exit_:
            pytest.fail(f"{where}: `python -m nemo_tiedlora {' '.join(variant)}` does not parse (exit {exit_.code}); "
                        "see the argparse message above")


_INTERCEPT = r"""
import argparse, runpy, sys
class Parsed(BaseException):
    pass
original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    original(self, args, namespace)  # exits 2 with argparse's message on bad arguments
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_args
kind, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
try:
    if kind == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
except Parsed:
    sys.exit(0)
sys.exit("the command never parsed its arguments with argparse")
"""


def _check_argparse_program(kind: str, target: str, args: list[str], where: str) -> None:
    """A program with its own argparse parser parses ``args`` (run up to parse_args in a subprocess)."""
    for variant in _variants(_unplaceholder(args)):
        done = subprocess.run([sys.executable, "-c", _INTERCEPT, kind, target, *variant], cwd=REPO,
                              env=script_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (f"{where}: `python {kind} {target} {' '.join(variant)}` does not parse:\n"
                                      f"{done.stderr[-2000:]}")


def _resolve_script(token: str) -> Path | None:
    """A script path as shown; ``examples/.../x.py`` stands for the one x.py below examples/."""
    if "..." in token:
        matches = sorted(REPO.glob(token.replace("...", "**")))
        assert len(matches) == 1, f"{token} names {len(matches)} files"
        return matches[0]
    path = REPO / token
    return path if path.is_file() else None


def _hydra_config_name(script: Path) -> tuple[Path, str] | None:
    """(config dir, config name) of a ``@hydra_runner(config_path=..., config_name=...)`` script, else None; a script
    that runs a packaged one (``runpy.run_module("nemo_tiedlora.apps.entry_scripts.x")``) is followed to that module."""
    import importlib.util

    for node in ast.walk(ast.parse(script.read_text())):
        name = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
        if name == "hydra_runner":
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            return script.parent / kwargs["config_path"], kwargs["config_name"]
        if name == "run_module":
            return _hydra_config_name(Path(importlib.util.find_spec(ast.literal_eval(node.args[0])).origin))
    return None


def _check_hydra(script: Path, overrides: list[str], where: str) -> None:
    """Compose the script's YAML with the overrides as hydra does when the script starts."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    conf_dir, name = _hydra_config_name(script)
    overrides = _unplaceholder(overrides)
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    assert not bad, f"{where}: {script.name} takes hydra overrides key=value, not {bad}"
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        try:
            compose(config_name=name, overrides=overrides)
        except HydraException as error:
            pytest.fail(f"{where}: {script.relative_to(REPO)} {' '.join(overrides)}\n  -> {error}")


def _check_python(tokens: list[str], where: str) -> None:
    if tokens[0] in ("-c",):
        compile(tokens[1], "<README python -c>", "exec")
        return
    if tokens[0] == "-m":
        module, args = tokens[1], tokens[2:]
        if module == "nemo_tiedlora":
            _check_cli(args, where)
            return
        import importlib.util

        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if args and module != "pytest":  # no arguments: the prose names the module; pytest's options are its own
            _check_argparse_program("-m", module, args, where)
        return
    script = _resolve_script(tokens[0])
    assert script is not None, f"{where}: {tokens[0]} does not exist"
    if _hydra_config_name(script) is not None:
        _check_hydra(script, tokens[1:], where)
    else:
        _check_argparse_program("path", str(script), tokens[1:], where)


def _run_sh_commands() -> dict[str, list[str]]:
    """run.sh's commands: name -> the command it execs with the user's arguments."""
    text = (REPO / "scripts" / "run.sh").read_text()
    commands = {name: shlex.split(body) for name, body in re.findall(r'^\s*(\w+)\) exec (.*?) "\$@"', text, re.M)}
    commands.update({name: [] for name in re.findall(r"^\s*(\w+)\) ;;", text, re.M)})
    return commands


def check_command(command: Command) -> None:
    tokens = _tokens(command)
    if tokens[0] == "pip":
        return
    if tokens[0] == "bash" and tokens[1] != "scripts/run.sh":  # another script: it exists and has the options
        script = REPO / tokens[1]
        assert script.is_file(), f"{command.where}: unknown script {tokens[1]}"
        missing = [token for token in tokens[2:] if token.startswith("--") and token not in script.read_text()]
        assert not missing, f"{command.where}: {tokens[1]} has no option {missing}"
        return
    if tokens[0] == "bash":
        known = _run_sh_commands()
        assert tokens[2] in known, f"{command.where}: run.sh has no command {tokens[2]!r} (it has {sorted(known)})"
        if known[tokens[2]]:
            check_command(Command(shlex.join(known[tokens[2]] + tokens[3:]), command.where))
        return
    if tokens[0] == "torchrun":
        scripts = [i for i, token in enumerate(tokens) if token.endswith(".py")]
        assert scripts, f"{command.where}: torchrun without a script"
        tokens = tokens[scripts[0]:]
    elif tokens[0] in ("python", "python3"):
        tokens = tokens[1:]
    _check_python(tokens, command.where)


# ------------------------------------------------------------------------------------------------ tests

COMMANDS = readme_commands()


def test_readme_shows_commands():
    texts = " ".join(c.text for c in COMMANDS)
    for expected in ("megatron_gpt_finetuning.py", "megatron_gpt_generate.py", "python -m nemo_tiedlora params",
                     "python -m nemo_tiedlora inspect", "scripts/run.sh demo"):
        assert expected in texts


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_parses(command):
    check_command(command)


def _tuning_yamls() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((TUNING / "conf").glob("*.yaml"))}


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("override", prose_overrides())
def test_prose_override_is_a_yaml_key(override):
    key = override.lstrip("+").split("=", 1)[0]
    yamls = _tuning_yamls()
    assert any(_has_key(tree, key) for tree in yamls.values()), (
        f"README shows `{override}` but no tuning YAML ({', '.join(yamls)}) has `{key}`: hydra refuses it "
        "('Could not override'); add the key to the YAML or fix the README")


@pytest.mark.parametrize("key", prose_config_keys())
def test_prose_config_key_is_a_yaml_key(key):
    assert any(_has_key(tree, key) for tree in _tuning_yamls().values()), f"README names `{key}`: not in any YAML"


def _reference_table() -> dict[str, str]:
    """key -> documented default, from the ``model.peft.tiedlora_tuning`` reference table."""
    section = _readme().split("## `model.peft.tiedlora_tuning` reference", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in re.findall(r"^\| (`.*?) \| (.*?) \|", section, re.M):
        for key in re.findall(r"`(\w+)`", row[0]):
            table[key] = row[1]
    return table


def test_reference_table_is_the_yaml():
    tuning = _tuning_yamls()["megatron_gpt_finetuning_config.yaml"]["model"]["peft"]["tiedlora_tuning"]
    table = _reference_table()
    assert sorted(table) == sorted(tuning), "README's reference table and the YAML's tiedlora_tuning differ"
    for key, documented in table.items():
        shown = re.sub(r"\s*\(.*\)$", "", documented.replace("`", "")).strip()
        assert yaml.safe_load(shown) == tuning[key], f"{key}: README default {documented!r}, YAML {tuning[key]!r}"


# -------------------------------------------------------------------- the cheap commands, run as written


def _run_as_written(command: Command, cwd: Path, *, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The command's own tokens (a trailing ``# comment`` dropped), then ``extra``, run with the test's python."""
    tokens = [*_tokens(command), *extra]
    assert tokens[0] == "python"
    return subprocess.run([sys.executable, *tokens[1:]], cwd=cwd, env=script_env(), capture_output=True, text=True,
                          timeout=600)


def _cli_commands(name: str) -> list[Command]:
    return [c for c in COMMANDS if _tokens(c)[:4] == ["python", "-m", "nemo_tiedlora", name]]


@pytest.mark.parametrize("command", _cli_commands("params"), ids=lambda c: c.id)
def test_params_runs_as_written(command, tmp_path):
    done = _run_as_written(command, tmp_path)
    assert done.returncode == 0, done.stderr
    if "--json" in command.text:
        assert json.loads(done.stdout)["presets"]
    else:
        assert "tl6" in done.stdout


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory) -> Path:
    """A folder holding a real Tied-LoRA adapter archive named as in the README (adapter.nemo)."""
    import torch

    from nemo_tiedlora.formats.adapter_archive import save_archive
    from nemo_tiedlora.core.config import TiedLoraConfig

    folder = tmp_path_factory.mktemp("readme")
    d, out, r, layers = 16, 48, 4, 2
    tensors = {"A": torch.randn(r, d), "B": torch.randn(out, r)}
    for layer in range(1, layers + 1):
        tensors[f"layers.{layer}.u"] = torch.randn(r)
        tensors[f"layers.{layer}.v"] = torch.randn(out)
    shape = {"hidden_size": d, "num_layers": layers, "num_attention_heads": 2, "num_query_groups": 2,
             "kv_channels": 8, "out_features": out}
    save_archive(folder / "adapter.nemo", config=TiedLoraConfig(preset="tl6", rank=r), shape=shape, tensors=tensors,
                 model_config_yaml="")
    return folder


@pytest.mark.parametrize("command", _cli_commands("inspect"), ids=lambda c: c.id)
def test_inspect_runs_as_written(command, adapter_folder):
    done = _run_as_written(command, adapter_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tl6" in done.stdout


@pytest.mark.parametrize("command", _cli_commands("sweep"), ids=lambda c: c.id)
def test_sweep_config_as_written_is_valid(command):
    done = _run_as_written(command, REPO, extra=("--dry-run",))  # after any comment's tokens are gone
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run(s) of" in done.stdout


_HELP_ALL = """
import contextlib, io, json, sys
from nemo_tiedlora.apps.cli import main
results = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([name, "--help"])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    results[name] = [code, out.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, list]:
    """``python -m nemo_tiedlora <command> --help`` of every command (one interpreter for all of them)."""
    done = subprocess.run([sys.executable, "-c", _HELP_ALL, *sorted(_subcommands())], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_has_help_and_every_option_a_help_text(name, helps):
    parser = _subcommands()[name]
    missing = [action.dest for action in parser._actions
               if action.option_strings and action.help in (None, "") and action.dest != "help"]
    assert not missing, f"`python -m nemo_tiedlora {name}`: options without help text: {missing}"
    code, text = helps[name]
    assert code == 0 and text.startswith(f"usage: python -m nemo_tiedlora {name}"), text


def _layout_block() -> str:
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```text\n", 1)[1].split("```", 1)[0]


def _layout_entries() -> tuple[set[str], set[str]]:
    """(files, folders) the README's layout map names, as paths relative to the package: a line starting in column
    0 opens a folder (``core/``, ``formats/hf/``; ``nemo_tiedlora/`` is the package root), the ``*.py`` names and
    ``name/`` folders on the indented lines under it are in that folder."""
    files: set[str] = set()
    folders: set[str] = set()
    current = ""
    for line in _layout_block().splitlines():
        if line and not line[0].isspace():
            head = line.split()[0]
            current = "" if head == "nemo_tiedlora/" else head
            if current:
                folders.add(current.rstrip("/"))
            continue
        names = []
        for token in line.split():  # the leading file and folder names; the description follows
            if not re.fullmatch(r"\w[\w.]*\.py|\w+/", token):
                break
            names.append(token)
        for name in names:
            if name.endswith(".py"):
                files.add(current + name)
            elif name.endswith("/"):
                folders.add(current + name.rstrip("/"))
    return files, folders


def test_layout_map_names_every_module_in_its_folder_and_only_existing_ones():
    """The README's layout map matches the tree both ways: every module of the package is named in its own folder's
    section (or lies in a folder the map names whole, such as nemo/compat/ or apps/study/), and every file and folder
    the map names exists at that path."""
    files, folders = _layout_entries()
    package = REPO / "nemo_tiedlora"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    whole = {folder for folder in folders if not any(name.startswith(folder + "/") for name in files)}
    missing = sorted(m for m in modules
                     if m not in files and not m.endswith("/__init__.py") and m != "__init__.py"
                     and not any(m.startswith(folder + "/") for folder in whole))
    assert not missing, f"modules missing from the README's layout map (or under another folder there): {missing}"
    assert not files - modules, f"the layout map names files that do not exist there: {sorted(files - modules)}"
    existing = {str(p.relative_to(package)) for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert not folders - existing, f"the layout map names folders that do not exist: {sorted(folders - existing)}"


def test_readme_sbatch_script_is_the_one_the_tests_submit():
    """The sbatch script the README shows is, byte for byte, the repository's file that the two-node SLURM test
    (tests/multinode/test_two_node_training.py) submits."""
    script = TUNING / "slurm" / "tiedlora_finetuning.sbatch"
    blocks = [block for tag, block in zip(re.findall(r"^```([^\n]*)\n.*?^```", _readme(), flags=re.S | re.M),
                                          _blocks(_readme())) if block.startswith("#!/bin/bash\n#SBATCH")]
    assert blocks == [script.read_text()]
