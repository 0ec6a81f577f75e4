"""Where every pretrained file flowmo uses comes from: its address, its cache, its hash.

    path = fetch("vgg16")                  # the cache, else a download (hash checked), else one sentence
    path = fetch("vgg16", "/data/weights") # an explicit file, or a folder holding it under its usual name
    fetch_group("all")                     # what `flowmo fetch-weights all` fills on a login node

Two kinds of source, each with the cache its library already uses, so files fetched by torchvision, pytorch-fid or
timm elsewhere are found here and the other way round:
- torch hub files (torchvision's VGG16 / AlexNet, pytorch-fid's Inception): an address whose file name carries the
  first hex digits of the file's SHA-256; cached in ``torch.hub.get_dir()/checkpoints`` ($TORCH_HOME);
- Hugging Face files (timm's ResNet-50, the authors' released FlowMo checkpoints): a repository and a file name;
  cached by huggingface_hub ($HF_HUB_CACHE / $HF_HOME); after a download the file's SHA-256 is compared with the
  one the Hub announced for it (huggingface_hub checks only the size).
Offline (``HF_HUB_OFFLINE=1``, the field's switch for compute nodes) nothing is downloaded: a file that is not in
its cache is refused with one sentence naming the file, its address and its cache.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flowmo.errors import UserError


class MissingWeightsError(UserError, FileNotFoundError):
    """A pretrained file is neither given, nor cached, nor downloadable now; the message says what to do."""


class WeightsHashError(UserError):
    """A downloaded file is not the file its address promises; it was deleted."""


@dataclass(frozen=True)
class PretrainedFile:
    """One pretrained file. ``url`` for a torch hub file, ``repo_id`` for a Hugging Face one."""

    key: str
    what: str  # the network it holds, for messages
    filename: str
    url: str | None = None
    repo_id: str | None = None
    aliases: tuple[str, ...] = ()  # other names the same weights go by in a user's folder

    @property
    def label(self) -> str:
        """The file as a user would name it: its file name, or repository/file for a Hugging Face file."""
        return self.filename if self.url else f"{self.repo_id}/{self.filename}"

    @property
    def address(self) -> str:
        return self.url or f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"

    @property
    def hash_prefix(self) -> str:
        """torchvision's convention: the file name ends in the first digits of its SHA-256 (``-397923af.pth``)."""
        return Path(self.filename).stem.rsplit("-", 1)[-1]

    def cache_folder(self) -> Path:
        return hub_checkpoint_dir() if self.url else hf_cache_dir()


# The addresses are the libraries' own (torchvision's VGG16_Weights / AlexNet_Weights.IMAGENET1K_V1, pytorch-fid's
# FID_WEIGHTS_URL, timm's resnet50.tv_in1k); tests/test_pretrained.py checks they still agree.
FILES = {f.key: f for f in (
    PretrainedFile("vgg16", "VGG16 (the LPIPS-VGG backbone)", "vgg16-397923af.pth",
                   url="https://download.pytorch.org/models/vgg16-397923af.pth"),
    PretrainedFile("alexnet", "AlexNet (the LPIPS-Alex backbone)", "alexnet-owt-7be5be79.pth",
                   url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    PretrainedFile("inception_fid", "pytorch-fid's InceptionV3 (rFID / gFID)", "pt_inception-2015-12-05-6726825d.pth",
                   url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                       "pt_inception-2015-12-05-6726825d.pth"),
    # timm's copy of torchvision's IMAGENET1K_V1 weights: the same tensors under the same names
    PretrainedFile("resnet50", "ResNet-50 IMAGENET1K_V1 (the Stage-1B loss)", "model.safetensors",
                   repo_id="timm/resnet50.tv_in1k", aliases=("resnet50.tv_in1k.safetensors", "resnet50-0676ba61.pth")),
    PretrainedFile("official-lo", "FlowMo-Lo as released by the authors", "flowmo_lo.pth", repo_id="ksarge/FlowMo"),
    PretrainedFile("official-hi", "FlowMo-Hi as released by the authors", "flowmo_hi.pth", repo_id="ksarge/FlowMo"),
)}
GROUPS = {"lpips": ("vgg16", "alexnet"), "resnet": ("resnet50",), "inception": ("inception_fid",),
          "official-lo": ("official-lo",), "official-hi": ("official-hi",)}
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


def cached(spec: PretrainedFile) -> Path | None:
    """The file in its cache, looked up without any network call; None if it is not there."""
    if spec.url:
        path = hub_checkpoint_dir() / spec.filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.repo_id, spec.filename, cache_dir=hf_cache_dir())
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
    spec = FILES[key]
    if weights is not None:
        return _explicit(spec, Path(weights).expanduser())
    found = cached(spec)
    if found is not None:
        return found
    if offline():
        raise _missing(spec, "HF_HUB_OFFLINE=1 forbids downloading it")
    try:
        return _download_hub_file(spec) if spec.url else _download_hf_file(spec)
    except (OSError, http.client.HTTPException) as error:  # no network, a proxy, a cut transfer: the user's to fix
        raise _missing(spec, f"the download failed ({error.__class__.__name__}: {error})") from None


def _explicit(spec: PretrainedFile, path: Path) -> Path:
    if path.is_dir():
        for name in (spec.filename, *spec.aliases):
            if (path / name).is_file():
                return path / name
        path = path / spec.filename
    if not path.is_file():
        raise MissingWeightsError(f"{spec.what}: {path} is not a file (expected {' or '.join((spec.filename, *spec.aliases))}"
                                  f", from {spec.address}).")
    return path


def _missing(spec: PretrainedFile, why: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{spec.what}: {spec.label} is not in {spec.cache_folder()} and {why}; fetch it from {spec.address} "
        f"(`flowmo fetch-weights` on a machine with internet fills the cache), or pass the file's path.")


def _download_hub_file(spec: PretrainedFile) -> Path:
    """torch.hub's download: written to a temporary name beside the target and renamed only after the hash check."""
    import torch.hub
    from filelock import FileLock

    target = hub_checkpoint_dir() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):  # several ranks starting at once: one downloads, the others then find the file
        if not target.is_file():
            print(f"flowmo: downloading {spec.what} from {spec.address} to {target}", file=sys.stderr)
            try:
                torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.hash_prefix, progress=True)
            except RuntimeError as error:  # torch.hub's hash mismatch; it has removed the partial file
                raise WeightsHashError(f"{spec.what}: the file downloaded from {spec.address} is not "
                                       f"{spec.filename}, it arrived cut short or altered ({error}); it was deleted. "
                                       "Retry, or check the address or a proxy in between.") from None
    return target


def _download_hf_file(spec: PretrainedFile) -> Path:
    from huggingface_hub import hf_hub_download

    print(f"flowmo: downloading {spec.what} from {spec.address}", file=sys.stderr)
    # HF_ENDPOINT (a mirror) read now, like the cache: the library reads both once, at import
    path = Path(hf_hub_download(spec.repo_id, spec.filename, cache_dir=hf_cache_dir(),
                                endpoint=os.environ.get("HF_ENDPOINT") or None))
    _check_hf_blob(spec, path)
    return path


def _check_hf_blob(spec: PretrainedFile, path: Path) -> None:
    """The Hub names an LFS file's blob by its SHA-256: a blob whose content differs is deleted and refused."""
    blob = path.resolve()
    if len(blob.name) != 64:  # a small file kept in git: named by its git hash, which says nothing of SHA-256
        return
    digest = sha256_of(blob)
    if digest != blob.name:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise WeightsHashError(f"{spec.what}: the file downloaded from {spec.address} has SHA-256 {digest}, not the "
                               f"{blob.name} the Hub announced; it was deleted. Retry the download.")


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_group(group: str) -> list[tuple[PretrainedFile, Path]]:
    """(file, local path) for every file of a `flowmo fetch-weights` group, fetching what is missing."""
    if group not in GROUPS:
        raise UserError(f"unknown weights group {group!r}; choose one of {', '.join(GROUPS)}.")
    return [(FILES[key], fetch(key)) for key in GROUPS[group]]



def lpips_heads_folder() -> str:
    """Where the lpips package keeps its learned linear heads (they ship inside it; nothing to download)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    return str(Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1") if spec else "lpips not installed"
