"""flowmo's dependencies for an interpreter that already has torch, with no package index (`make ... PYTHON=`).

    python scripts/deps.py wheels --out wheels            # where PyPI is reachable, inside the full .venv
    python scripts/deps.py install --target .deps [--wheels wheels] [--extra dev]   # on the offline machine

`wheels` writes every pure-Python distribution flowmo needs beyond torch (and what torch itself brings) as wheel
files, at the versions installed in this environment (the tested ones). `install` finds which of flowmo's
requirements, with their own requirements, the running interpreter lacks, and installs just those from the wheels
folder into --target with pip --no-index; the Makefile puts src/ and --target on PYTHONPATH, so flowmo needs no
build step. Nothing here imports flowmo or its dependencies: it runs before they exist.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The standard library has no requirement parser; pip, which both commands run anyway, carries `packaging`.
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH = ("torch", "torchvision")  # come with the interpreter (a cluster module, the vendor's build), never as wheels


class Missing(Exception):
    """One sentence for the user: what is missing and how to bring it."""


def project_requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def needed_by(requires: list[str] | None, extras: set[str]) -> list[Requirement]:
    """A distribution's Requires-Dist lines that apply here, with the extras asked of it."""
    wanted = []
    for line in requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                             for extra in extras | {""}):
            wanted.append(requirement)
    return wanted


# ------------------------------------------------------------------------------------------- install
def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheel_index(folder: Path | None) -> dict[str, list[Path]]:
    """Wheel files by distribution name, newest version last."""
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.whl")) if folder is not None else []:
        index.setdefault(canonicalize_name(path.name.split("-")[0]), []).append(path)
    return {name: sorted(paths, key=lambda path: Version(wheel_version(path))) for name, paths in index.items()}


def wheel_version(path: Path) -> str:
    return path.name.split("-")[1]


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def to_install(requirements: list[Requirement], wheels: dict[str, list[Path]]) -> list[Path]:
    """The wheels of every requirement (and their requirements) this interpreter lacks or has at a wrong version."""
    chosen: dict[str, Path] = {}
    lacking: list[str] = []
    queue = list(requirements)
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        version = installed_version(name)
        if name in chosen or (version is not None and requirement.specifier.contains(version, prereleases=True)):
            continue
        if name in TORCH:
            raise Missing(f"{sys.executable} has no {name} ({requirement}); install torch and torchvision for it "
                          "(your cluster's module or the vendor's build), or leave PYTHON= unset to let make "
                          "create .venv")
        fitting = [path for path in wheels.get(name, [])
                   if requirement.specifier.contains(wheel_version(path), prereleases=True)]
        if not fitting:
            lacking.append(f"{requirement} (has {version})" if version else str(requirement))
            continue
        chosen[name] = fitting[-1]
        queue += needed_by(wheel_requires(fitting[-1]), set(requirement.extras))
    if lacking:
        raise Missing(f"{sys.executable} lacks {', '.join(sorted(set(lacking)))}, and no wheels folder holds "
                      "them: on a machine with PyPI run `make wheels`, copy wheels/ here and pass WHEELS=wheels "
                      "(docs/install.md, air-gapped clusters)")
    return sorted(chosen.values())


def install(args) -> None:
    sys.path.insert(0, str(args.target.resolve()))  # what an earlier run installed there counts as installed
    chosen = to_install(project_requirements(args.extra), wheel_index(args.wheels))
    if not chosen:
        return
    print(f"installing into {args.target} from {args.wheels}: " + ", ".join(path.name for path in chosen))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(args.target), *map(str, chosen)], check=True)


# ------------------------------------------------------------------------------------------- wheels
def is_pure(distribution: metadata.Distribution) -> bool:
    wheel = distribution.read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel and all(line.endswith("-none-any") for line in wheel.splitlines()
                                                    if line.startswith("Tag:"))


def beyond_torch() -> dict[str, metadata.Distribution]:
    """The installed closure of flowmo's requirements (dev included) minus torch, torchvision and their closure."""
    def closure(requirements: list[Requirement]) -> dict[str, tuple[metadata.Distribution, set[str]]]:
        found: dict[str, tuple[metadata.Distribution, set[str]]] = {}
        queue = list(requirements)
        while queue:
            requirement = queue.pop()
            name = canonicalize_name(requirement.name)
            extras = set(requirement.extras) | (found[name][1] if name in found else set())
            if name in found and extras == found[name][1]:
                continue
            distribution = metadata.distribution(name)
            found[name] = (distribution, extras)
            queue += needed_by(distribution.requires, extras)
        return found

    with_torch = closure([Requirement(name) for name in TORCH])
    return {name: dist for name, (dist, _) in closure(project_requirements(["dev"])).items() if name not in with_torch}


def build_wheels(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    binary = []
    for name, distribution in sorted(beyond_torch().items()):
        if not is_pure(distribution):
            binary.append(f"{name} {distribution.version}")
            continue
        with tempfile.TemporaryDirectory() as scratch:  # sdist-only releases (antlr4) are built into a wheel here
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", scratch,
                            f"{name}=={distribution.version}"], check=True)
            for wheel in Path(scratch).glob("*.whl"):
                shutil.move(str(wheel), args.out / wheel.name)
    total = sum(path.stat().st_size for path in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}; compiled ones expected "
          f"on the target interpreter (as torch is): {', '.join(binary)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("wheels", help="write the pure-Python wheels flowmo needs beyond torch")
    wheels.add_argument("--out", type=Path, default=Path("wheels"))
    target = commands.add_parser("install", help="install what this interpreter lacks, from a wheels folder")
    target.add_argument("--target", type=Path, default=Path(".deps"))
    target.add_argument("--wheels", type=Path, default=None)
    target.add_argument("--extra", action="append", default=[], help="also the optional dependencies of this extra")
    args = parser.parse_args(argv)
    try:
        build_wheels(args) if args.command == "wheels" else install(args)
    except Missing as problem:
        print(f"error: {problem}.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
