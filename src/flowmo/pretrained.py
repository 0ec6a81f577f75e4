"""Where every pretrained file flowmo uses comes from: its address, its cache, its hash.

    path = fetch("vgg16")                  # the cache, else a download (hash checked), else one sentence
    path = fetch("vgg16", "/data/weights") # an explicit file, or a folder holding it under its usual name

Two kinds of source, each with the cache its library already uses, so files fetched by torchvision, pytorch-fid or
timm elsewhere are found here and the other way round:
- torch hub files (torchvision's VGG16 / AlexNet, pytorch-fid's Inception): an address whose file name carries the
  first hex digits of the file's SHA-256; cached in ``torch.hub.get_dir()/checkpoints`` ($TORCH_HOME);
  ``FLOWMO_WEIGHTS_MIRROR`` (a URL or file:// folder holding them under their file names) replaces the address;
- Hugging Face files (timm's ResNet-50, the authors' released FlowMo checkpoints): a repository, a revision and a
  file name, downloaded by huggingface_hub into its cache ($HF_HUB_CACHE / $HF_HOME) from ``HF_ENDPOINT``
  (a mirror) when set; the file's SHA-256 is compared with the pinned one, else with the one the Hub announced
  (huggingface_hub checks only the size).
Every wait for a server is bounded by ``HF_HUB_DOWNLOAD_TIMEOUT`` (whole seconds, default 10, huggingface_hub's
own variable). Every failure is one sentence naming the file, the address used, the cache and what to do, and leaves
nothing half-written in the cache. Offline (``HF_HUB_OFFLINE=1``, the field's switch for compute nodes) nothing is
downloaded: a file that is not in its cache is refused with such a sentence.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flowmo.errors import UserError

MIRROR_VARIABLE = "FLOWMO_WEIGHTS_MIRROR"
TIMEOUT_VARIABLE = "HF_HUB_DOWNLOAD_TIMEOUT"
HUB = "https://huggingface.co"


class MissingWeightsError(UserError, FileNotFoundError):
    """A pretrained file is neither given, nor cached, nor downloadable now; the message says what to do."""


class WeightsHashError(MissingWeightsError):
    """A downloaded file is not the file its address promises; it was deleted (so it is missing too)."""


@dataclass(frozen=True)
class PretrainedFile:
    """One pretrained file. ``url`` for a torch hub file, ``repo_id`` (+ ``revision``) for a Hugging Face one."""

    key: str
    what: str  # the network it holds, for messages
    filename: str
    url: str | None = None
    repo_id: str | None = None
    aliases: tuple[str, ...] = ()  # other names the same weights go by in a user's folder
    revision: str | None = None  # a Hugging Face commit hash; None: the repository's main branch (not pinned)
    sha256: str | None = None  # the whole file's SHA-256; None: the name's digits (torch hub) or the Hub's word
    cache_dir: str | None = None  # a Hugging Face cache other than $HF_HUB_CACHE (from_pretrained(cache_dir=...))

    @property
    def label(self) -> str:
        """The file as a user would name it: its file name, or repository/file for a Hugging Face file."""
        return self.filename if self.url else f"{self.repo_id}/{self.filename}"

    @property
    def address(self) -> str:
        """Where a download asks now: the mirror (FLOWMO_WEIGHTS_MIRROR, HF_ENDPOINT) when one is set."""
        if self.url:
            mirror = os.environ.get(MIRROR_VARIABLE)
            return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.filename, revision=self.revision or "main", endpoint=hf_endpoint())

    @property
    def hash_prefix(self) -> str:
        """torchvision's convention: the file name ends in the first digits of its SHA-256 (``-397923af.pth``)."""
        return Path(self.filename).stem.rsplit("-", 1)[-1]

    @property
    def expected_sha256(self) -> str | None:
        """The SHA-256 (or its first digits) the file must have; None where only the Hub's word is known."""
        return self.sha256 or (self.hash_prefix if self.url else None)

    @property
    def group(self) -> str | None:
        """The `flowmo fetch-weights` group that fetches this file (None for a tokenizer's Hub repository)."""
        return next((group for group, keys in GROUPS.items() if self.key in keys), None)

    def cache_folder(self) -> Path:
        if self.url:
            return hub_checkpoint_dir()
        return Path(self.cache_dir).expanduser() if self.cache_dir else hf_cache_dir()


# The addresses are the libraries' own (torchvision's VGG16_Weights / AlexNet_Weights.IMAGENET1K_V1, pytorch-fid's
# FID_WEIGHTS_URL, timm's resnet50.tv_in1k); tests/test_pretrained.py checks they still agree.
# Pins, one table: a Hugging Face file is fetched at `revision` (a commit) and must have `sha256`; a mismatch is
# deleted and refused. The commits and SHA-256 of the Hugging Face files below were not recorded when this table was
# written (no network): UNPINNED ones are fetched from main and checked against the SHA-256 the Hub announces.
# Fill them from https://huggingface.co/<repo>/tree/main (the commit) and the file's page (its SHA-256).
UNPINNED = None
FILES = {
    f.key: f
    for f in (
        PretrainedFile(
            "vgg16",
            "VGG16 (the LPIPS-VGG backbone)",
            "vgg16-397923af.pth",
            url="https://download.pytorch.org/models/vgg16-397923af.pth",
        ),
        PretrainedFile(
            "alexnet",
            "AlexNet (the LPIPS-Alex backbone)",
            "alexnet-owt-7be5be79.pth",
            url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        ),
        PretrainedFile(
            "inception_fid",
            "pytorch-fid's InceptionV3 (rFID / gFID)",
            "pt_inception-2015-12-05-6726825d.pth",
            url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
        ),
        # timm's copy of torchvision's IMAGENET1K_V1 weights: the same tensors under the same names
        PretrainedFile(
            "resnet50",
            "ResNet-50 IMAGENET1K_V1 (the Stage-1B loss)",
            "model.safetensors",
            repo_id="timm/resnet50.tv_in1k",
            aliases=("resnet50.tv_in1k.safetensors", "resnet50-0676ba61.pth"),
            revision=UNPINNED,
            sha256=UNPINNED,
        ),
        PretrainedFile(
            "official-lo",
            "FlowMo-Lo as released by the authors",
            "flowmo_lo.pth",
            repo_id="ksarge/FlowMo",
            revision=UNPINNED,
            sha256=UNPINNED,
        ),
        PretrainedFile(
            "official-hi",
            "FlowMo-Hi as released by the authors",
            "flowmo_hi.pth",
            repo_id="ksarge/FlowMo",
            revision=UNPINNED,
            sha256=UNPINNED,
        ),
    )
}
GROUPS = {
    "lpips": ("vgg16", "alexnet"),
    "resnet": ("resnet50",),
    "inception": ("inception_fid",),
    "official-lo": ("official-lo",),
    "official-hi": ("official-hi",),
}
GROUPS["all"] = tuple(key for keys in GROUPS.values() for key in keys)
STAND_IN = "random"  # weights="random": the explicit random stand-in of tests and the tiny CPU demo


# ------------------------------------------------------------------------------------------- caches
def hub_checkpoint_dir() -> Path:
    """Where torch.hub (torchvision, pytorch-fid) keeps downloads; follows $TORCH_HOME at call time."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """huggingface_hub's cache, from the environment now (the library reads it once, when it is imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_endpoint() -> str:
    """The Hub or its mirror (HF_ENDPOINT), read now: huggingface_hub reads it once, at import."""
    return (os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")


def download_timeout() -> int:
    """Seconds to wait for any answer of a server, read now (huggingface_hub reads its variable at import)."""
    value = os.environ.get(TIMEOUT_VARIABLE, "10")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{TIMEOUT_VARIABLE}={value!r} is not a whole number of seconds; set it to e.g. 30.") from None


def cached(spec: PretrainedFile) -> Path | None:
    """The file in its cache, looked up without any network call; None if it is not there."""
    if spec.url:
        path = hub_checkpoint_dir() / spec.filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        spec.repo_id, spec.filename, cache_dir=spec.cache_folder(), revision=spec.revision or "main"
    )
    return Path(found) if isinstance(found, str) else None


def is_available(key: str) -> bool:
    """Whether FILES[key] is in its cache (never downloads): the demo uses pretrained nets only when they are."""
    return cached(FILES[key]) is not None


# ------------------------------------------------------------------------------------------- fetching
def cached_lpips_nets() -> tuple[str, ...]:
    """LPIPS variants whose trunk file is cached ("alex", "vgg"): where the demo and the tiny grid add LPIPS."""
    return tuple(net for net, key in (("alex", "alexnet"), ("vgg", "vgg16")) if is_available(key))


def fetch(key: str, weights: str | os.PathLike | None = None) -> Path:
    """The local path of FILES[key]: ``weights`` (a file, or a folder holding it), else the cache, else a download."""
    return fetch_file(FILES[key], weights)


def fetch_file(spec: PretrainedFile, weights: str | os.PathLike | None = None) -> Path:
    """fetch() for any file, FILES' or another (a file of a tokenizer's Hub repository)."""
    if weights is not None:
        return _explicit(spec, Path(weights).expanduser())
    found = cached(spec)
    if found is not None:
        return found
    if offline():
        raise MissingWeightsError(
            f"{spec.what}: {spec.label} is not in {spec.cache_folder()} and HF_HUB_OFFLINE=1 "
            f"forbids downloading it from {spec.address}; {_advice(spec)}."
        )
    try:
        return _download_url_file(spec) if spec.url else _download_hf_file(spec)
    except UserError:
        raise
    # urllib, httpx and huggingface_hub raise from unrelated hierarchies: any failure of a transfer is one sentence
    except Exception as error:
        raise _failed(spec, _reason(error)) from None


def _explicit(spec: PretrainedFile, path: Path) -> Path:
    if path.is_dir():
        for name in (spec.filename, *spec.aliases):
            if (path / name).is_file():
                return path / name
        path = path / spec.filename
    if not path.is_file():
        names = " or ".join((spec.filename, *spec.aliases))
        raise MissingWeightsError(f"{spec.what}: {path} is not a file (expected {names}, from {spec.address}).")
    return path


def _advice(spec: PretrainedFile) -> str:
    command = (
        f"flowmo fetch-weights {spec.group}"
        if spec.group
        else f"hf download {spec.repo_id}" + (f" --revision {spec.revision}" if spec.revision else "")
    )
    return f"on a machine with internet run `{command}` and copy that folder here, or pass the file's path"


def _failed(spec: PretrainedFile, reason: str, error=MissingWeightsError) -> MissingWeightsError:
    return error(
        f"{spec.what}: downloading {spec.label} from {spec.address} failed ({reason}) and left nothing in "
        f"{spec.cache_folder()}; retry, or {_advice(spec)}."
    )


def _reason(error: BaseException) -> str:
    """What went wrong, in a few words: a status code, a timeout, a refusal, else the error's first line."""
    if isinstance(error, http.client.IncompleteRead):
        return f"the transfer was cut short, {error.expected} more bytes were expected"
    status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "code", None)
    if isinstance(status, int):
        return f"the server answered HTTP {status}"
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{error.__class__.__name__}: {first}".rstrip(": ")
    if "timeout" in text.lower() or "timed out" in text.lower():
        return f"no answer within {download_timeout()} s, the limit {TIMEOUT_VARIABLE} sets"
    if "refused" in text.lower():
        return "the connection was refused"
    if "without response" in text.lower() or "without sending a response" in text.lower():
        return "the server closed the connection without answering"
    return text[:200].rstrip(".")


def _check_sha256(spec: PretrainedFile, digest: str, expected: str, *paths: Path) -> None:
    """A file whose SHA-256 is not the expected one (or does not start with the expected digits) is deleted."""
    if not digest.startswith(expected):
        for path in paths:
            path.unlink(missing_ok=True)
        wanted = expected if len(expected) == 64 else f"one starting {expected}"
        raise _failed(
            spec,
            f"it arrived with SHA-256 {digest}, not {wanted}: cut short or altered, so it was deleted",
            WeightsHashError,
        )


def _download_url_file(spec: PretrainedFile) -> Path:
    """A torch hub file, written to a temporary name beside the target and renamed only after the hash check."""
    from filelock import FileLock

    target = hub_checkpoint_dir() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):  # several ranks starting at once: one downloads, the others then find the file
        if not target.is_file():
            print(f"flowmo: downloading {spec.what} from {spec.address} to {target}", file=sys.stderr)
            partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
            try:
                _check_sha256(spec, _stream(spec.address, partial), spec.expected_sha256, partial)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
    return target


def _stream(url: str, path: Path, chunk: int = 1 << 20) -> str:
    """Copy `url` to `path` and return its SHA-256. Our own because torch.hub.download_url_to_file takes no timeout:
    a stalled server would hang it forever; urllib also reads the file:// folders a mirror may be."""
    digest, received = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=download_timeout()) as response, open(path, "wb") as out:
        size = response.headers.get("Content-Length")
        while block := response.read(chunk):
            digest.update(block)
            out.write(block)
            received += len(block)
    if size is not None and received != int(size):
        raise http.client.IncompleteRead(b"", int(size) - received)  # a short body urllib took for a whole one
    return digest.hexdigest()


def _download_hf_file(spec: PretrainedFile) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download

    print(f"flowmo: downloading {spec.what} from {spec.address}", file=sys.stderr)
    # hf_hub_download retries a failed first request for a minute: ask once, within our timeout, so a dead mirror
    # fails in seconds
    get_hf_file_metadata(spec.address, timeout=download_timeout())
    path = Path(
        hf_hub_download(
            spec.repo_id,
            spec.filename,
            revision=spec.revision or "main",
            cache_dir=spec.cache_folder(),
            endpoint=hf_endpoint(),
            etag_timeout=download_timeout(),
        )
    )
    _check_hf_blob(spec, path)
    return path


def _check_hf_blob(spec: PretrainedFile, path: Path) -> None:
    """The pinned SHA-256, else the Hub's: it names an LFS file's blob by its SHA-256 (a small file kept in git is
    named by its git hash, which says nothing of SHA-256, and is left alone)."""
    blob = path.resolve()
    expected = spec.expected_sha256 or (blob.name if len(blob.name) == 64 else None)
    if expected is not None:
        _check_sha256(spec, sha256_of(blob), expected, blob, path)


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def lpips_heads_folder() -> str:
    """Where the lpips package keeps its learned linear heads (they ship inside it; nothing to download)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None:
        return "lpips not installed"
    return str(Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1")
