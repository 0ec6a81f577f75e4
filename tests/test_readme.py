"""Every command in the ```bash blocks of the README and of every docs/*.md page is exercised, as a new user would
type it, in a fresh copy of the checkout (tracked and untracked-not-ignored files; the existing .venv linked in).
A command written on several pages runs once.

How each command is exercised is decided by RULES below; a documented command that no rule covers fails the fast
test `test_every_documented_command_has_a_rule`, so a new command cannot go untested. The kinds:
  run      run verbatim (or in the short form the rule states, e.g. fewer steps), exit status 0
  dry      needs GPUs, ImageNet or hours: `make -n` must expand it, and every `flowmo fit|validate|test` line it
           would run must parse with its configs (`--print_config`: configs, options and choices checked)
  parse    a `flowmo fit|validate|test` command for GPUs / ImageNet: parses with `--print_config`
  covered  run by another test (named in the rule) or by CI itself
  refused  needs files a fresh checkout lacks (ImageNet shards, the authors' weights) or downloads (offline here:
           HF_HUB_OFFLINE=1): run verbatim, it must end with exit status 2 and one sentence naming what is missing
           (no traceback, no usage text)
The runs themselves are one slow test (several minutes: each `flowmo` start imports torch and Lightning).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from working_copy import fresh_copy

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


# ------------------------------------------------------------------------------------------ the commands
def documented_commands() -> list[str]:
    """The commands of every page, in page order, each once."""
    return list(dict.fromkeys(command for page in PAGES for command in page_commands(page.read_text())))


def page_commands(text: str) -> list[str]:
    """The commands of a page's ```bash blocks: continuation lines joined, comments and #! / #SBATCH dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = strip_comment(line).strip()
            if command:
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def strip_comment(line: str) -> str:
    """The line without its shell comment (a # at the start or after whitespace, outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if char in "\"'" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


@dataclass(frozen=True)
class Rule:
    pattern: str  # re.fullmatch against the command
    kind: str  # run | dry | parse | covered
    why: str = ""  # for covered: which test or job runs it; for a short form: what is shortened
    rewrite: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied before running (short forms)


FAKE_IMAGENET = "fake-imagenet"  # a two-class ImageFolder tree the harness writes: `make shards` in short form
RULES = (
    Rule(r"make test", "covered", ".ci/run runs `make test` first, on a clean clone"),
    Rule(
        r"make demo",
        "covered",
        "test_demo.py::test_demo_recipe_reconstructs_held_out_photos runs the recipe `make demo` runs "
        "(flowmo demo --seed 0) with its stages shortened; here `make -n demo` must expand to it",
    ),
    Rule(
        r"flowmo (reconstruct|tokenize|detokenize) .*",
        "run",
        "tok.pt: exported from the tiny CPU run below; photos/: three generated images",
    ),
    Rule(
        r"make shards IMAGENET=\S+",
        "run",
        "IMAGENET = a generated two-class ImageFolder tree (6 images)",
        ((r"IMAGENET=\S+", f"IMAGENET={FAKE_IMAGENET} SHARDS_OUT=data/fake-imagenet"),),
    ),
    Rule(r"make sample-data", "run"),
    Rule(r"make bench-data", "run"),
    Rule(r"make (train|posttrain)-\S+( \S+)*", "dry"),
    Rule(r"make tensorboard", "dry"),
    Rule(
        r"\.venv/bin/flowmo fit .* --trainer\.max_steps \d+ .*",
        "run",
        "2 optimizer steps instead of 200",
        ((r"--trainer\.max_steps \d+", "--trainer.max_steps 2"),),
    ),
    Rule(
        r"(srun )?flowmo (gen )?(fit|validate|test) (?!.*tiny-cpu).*configs/(data/imagenet|generator/paper).*", "parse"
    ),
    Rule(r"flowmo (pretokenize|generate|gen-eval) .*--tokenizer lo( .*)?", "refused"),
    Rule(r"flowmo fetch-weights( \S+)*", "refused"),
    Rule(
        r"flowmo export --ckpt runs/(tiny-cpu|my-photos)/checkpoints/last\.ckpt --out \S+",
        "run",
        "after the tiny CPU run (on the sample set, or on my-photos/)",
    ),
    Rule(
        r"flowmo shards --source my-photos --out \S+ --val-fraction [0-9.]+",
        "run",
        "my-photos/: ten generated photos in two class folders and a corrupt one",
    ),
    Rule(r"flowmo validate .*configs/data/folder\.yaml.* --ckpt_path runs/my-photos/checkpoints/last\.ckpt", "run"),
    Rule(
        r"make install TORCH_INDEX=.*",
        "run",
        "prints the install commands (make -n -B): PyTorch's index is not reachable here",
        ((r"^make install", "make -n -B install"),),
    ),
    Rule(r"flowmo sample-data --out \S+", "run"),
    Rule(
        r"flowmo (pretokenize|generate) .*runs/demo-1b/.*",
        "run",
        "the tiny CPU run's checkpoint as the tokenizer",
        ((r"runs/demo-1b/checkpoints/last\.ckpt", "runs/tiny-cpu/checkpoints/last.ckpt"),) * 2,
    ),
    Rule(
        r"flowmo gen fit .*configs/generator/tiny\.yaml.*",
        "run",
        "the tiny CPU run's tokenizer, 2 steps",
        (
            (r"runs/demo-1b/checkpoints/last\.ckpt", "runs/tiny-cpu/checkpoints/last.ckpt"),
            (r"--trainer\.max_steps \d+", "--trainer.max_steps 2"),
        ),
    ),
    Rule(r"make eval-\S+ .*", "dry"),
    Rule(r"flowmo ablate (grids|list \S+)", "run"),
    Rule(r"make ablate GRID=\S+ DRY_RUN=1", "run"),
    Rule(
        r"make ablate GRID=\S+( GPUS=\d+| JOBS=\d+)*",
        "run",
        "with DRY_RUN=1: every fit/test command printed, none "
        "run (the tiny grid's real run with JOBS=2 is measured in docs/ablations.md)",
        ((r"$", " DRY_RUN=1"),),
    ),
    Rule(
        r"flowmo ablate run .* --launcher slurm .*",
        "run",
        "with --dry-run: sbatch files written, not submitted",
        ((r"$", " --dry-run"),),
    ),
    Rule(r"flowmo ablate table \S+", "run"),
    Rule(r"make bench", "run"),
    Rule(r"make bench COUNT_ONLY=1", "run"),
    Rule(r"make bench .*(PRESET=(lo|hi|small)|COMPILE=1|PRECISION=bf16|PROFILE=1|SCALING=1).*", "dry"),
    Rule(r"make bench-compare BASE=\S+( PRESET=\S+)?", "dry"),
    Rule(r"make plan", "dry", "lo, hi and small on fake tensors: ~30 CPU-minutes here"),
    Rule(
        r"make gpu-check( \S+=\S+)*",
        "covered",
        "needs a GPU: tests/test_offline_install.py runs this target "
        "offline from a fresh copy (PYTHON=, OUT=, every check but compile on the CPU; and a missing package)",
    ),
    Rule(r"make wheels", "dry", "needs PyPI: make -n expands it and scripts/deps.py's arguments parse"),
    Rule(r"flowmo plan --preset tiny .*", "run"),
    Rule(
        r"\.venv/bin/python -m flowmo\.bench\.sampler_steps .*",
        "run",
        "--checkpoint = the tiny CPU run's, --data = the sample set; 2 step counts, 1 repeat",
        (
            (r"--checkpoint \S+", "--checkpoint runs/tiny-cpu/checkpoints/last.ckpt"),
            (r"--data \S+", "--data data/sample"),
            (r"$", " --steps 2 4 --repeats 1"),
        ),
    ),
)


def rule_for(command: str) -> Rule | None:
    return next((rule for rule in RULES if re.fullmatch(rule.pattern, command)), None)


def test_every_documented_command_has_a_rule():
    commands = documented_commands()
    assert len(commands) >= 30  # the parser found the blocks
    uncovered = [command for command in commands if rule_for(command) is None]
    assert not uncovered, f"documented commands no rule in tests/test_readme.py exercises: {uncovered}"


def test_every_page_has_commands_or_is_prose_only():
    """The harness really reads docs/: the pages that hold commands are found, and the README's are among them."""
    with_commands = {page.name for page in PAGES if page_commands(page.read_text())}
    assert {"README.md", "training.md", "install.md", "performance.md", "ablations.md"} <= with_commands


def test_the_parser_joins_continuations_and_drops_comments():
    text = "x\n```bash\nmake a   # note\nflowmo fit -c x.yaml \\\n    --y 1  # more\n#!/bin/bash\n```\n"
    assert page_commands(text) == ["make a", "flowmo fit -c x.yaml --y 1"]


# ------------------------------------------------------------------------------------------ running them
@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the working tree as a fresh clone has it (mtimes kept, so make sees .venv as installed)."""
    copy = fresh_copy(tmp_path_factory.mktemp("readme") / "flowmo")
    (copy / ".venv").symlink_to(ROOT / ".venv")
    reinstall = subprocess.run(["make", "-n", "install"], cwd=copy, capture_output=True, text=True).stdout
    if "pip install" in reinstall:  # would re-point the shared editable install at this temporary copy
        pytest.skip("`make install` is not up to date in this checkout: run `make install` first")
    write_fake_inputs(copy)
    return copy


def write_fake_inputs(copy: Path) -> None:
    """photos/ for the file tools, a two-class ImageFolder tree standing in for ImageNet, and my-photos/ (docs/data.md's
    own images, with a corrupt file)."""
    rng = np.random.default_rng(0)
    for folder, count in (
        ("photos", 3),
        (f"{FAKE_IMAGENET}/train/n01", 2),
        (f"{FAKE_IMAGENET}/train/n02", 2),
        (f"{FAKE_IMAGENET}/val/n01", 1),
        (f"{FAKE_IMAGENET}/val/n02", 1),
        ("my-photos/beach", 5),
        ("my-photos/garden", 5),
    ):
        (copy / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(copy / folder / f"image{index}.JPEG", format="JPEG")
    (copy / "my-photos" / "garden" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a whole JPEG")


def shell(copy: Path, command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{copy / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess, command: str) -> None:
    assert result.returncode == 0, (
        f"`{command}` exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def parse_arguments(command: str) -> list[str]:
    """The arguments after `flowmo` of a documented fit/validate/test command (srun and .venv/bin/ dropped)."""
    words = shlex.split(command)
    if words[0] == "srun":
        words = words[1:]
    words = ["flowmo" if words[0].endswith("flowmo") else words[0], *words[1:]]
    assert re.match(r"flowmo (gen )?(fit|validate|test)", shlex.join(words)), command
    return words[1:]


def parse_all(copy: Path, commands: list[str]) -> None:
    """Every collected fit/validate/test command checked without running (configs load, options and choices
    parse), all in one interpreter: tests/scripts/parse_commands.py."""
    script = Path(__file__).parent / "scripts" / "parse_commands.py"
    arguments = json.dumps([parse_arguments(command) for command in commands])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    python = str(copy / ".venv" / "bin" / "python")
    result = subprocess.run([python, str(script)], cwd=copy, env=env, input=arguments, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def dry_run(copy: Path, command: str, to_parse: list[str]) -> None:
    expanded = shell(copy, command.replace("make ", "make -n ", 1))
    check(expanded, command)
    # PYTHON=<interpreter> runs `<interpreter> -m flowmo ...` where .venv would run `.venv/bin/flowmo ...`
    lines = [re.sub(r"^\S*python\S* -m flowmo ", "flowmo ", line.strip()) for line in expanded.stdout.splitlines()]
    flowmo_lines = [line for line in lines if re.match(r"\S*flowmo (fit|validate|test) ", line)]
    to_parse += flowmo_lines
    # other flowmo commands and modules (flowmo plan, python -m flowmo.bench.gpu_check): their arguments must parse
    others = [
        line
        for line in lines
        if line not in flowmo_lines
        and re.match(r"\S*(flowmo [a-z-]+|python -m flowmo\.[a-z_.]+|python\S* scripts/deps\.py)( |$)", line)
    ]
    for line in others:
        check(shell(copy, line + " --help"), command)
    assert flowmo_lines or others or re.search(r"tensorboard|bench|demo", command), (
        f"`{command}` expands to no flowmo run"
    )


def short_form(command: str, rule: Rule) -> str:
    for pattern, replacement in rule.rewrite:
        command = re.sub(pattern, replacement, command, count=1)
    return command


def refused(copy: Path, command: str) -> None:
    result = shell(copy, command)
    said = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"`{command}` exited {result.returncode}:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-2000:]
    assert said and re.search(
        r"flowmo_lo\.pth|data/imagenet|runs/gen-paper|download\.pytorch\.org|pt_inception", said[-1]
    ), said


def setup_order(commands: list[str]) -> list[str]:
    """The README's order, except what other commands need comes first: the sample set and the own-images shards,
    then the CPU runs (the tiny-cpu checkpoint becomes tok.pt and the sampler sweep's checkpoint)."""
    first = [c for c in commands if c == "make sample-data" or c.startswith("flowmo shards --source")]
    first += [c for c in commands if c.startswith(".venv/bin/flowmo fit")]
    return first + [c for c in commands if c not in first]


@pytest.mark.slow
def test_documented_commands_work_verbatim_in_a_fresh_checkout(checkout):
    ran, to_parse = [], []
    for command in setup_order(documented_commands()):
        rule = rule_for(command)
        if rule.kind == "covered":
            if command == "make demo":
                check(shell(checkout, "make -n demo"), command)
            continue
        if rule.kind == "parse":
            to_parse.append(command)
        elif rule.kind == "dry":
            dry_run(checkout, command, to_parse)
        elif rule.kind == "refused":
            refused(checkout, command)
        else:
            check(shell(checkout, short_form(command, rule)), command)
        if command.startswith(".venv/bin/flowmo fit"):
            check(shell(checkout, "flowmo export --ckpt runs/tiny-cpu/checkpoints/last.ckpt --out tok.pt"), "export")
        ran.append(command)
    parse_all(checkout, to_parse)
    assert len(to_parse) >= 20
    assert (checkout / "recon").is_dir() and any((checkout / "decoded").glob("*.png"))
    assert (checkout / "data" / "fake-imagenet" / "train.json").is_file()
    assert (checkout / "data" / "my-photos" / "val.json").is_file() and any((checkout / "my-recon").glob("*.png"))
    assert (checkout / "results" / "bench" / "bench.json").is_file()
    assert len(ran) >= 25
