"""A tokenizer shared the way huggingface_hub shares models: a folder or Hub repository holding model.safetensors,
config.json and a README.md model card. flowmo re-exports these three (flowmo.from_pretrained, ...).

    save_pretrained(tok, "tok/", metrics="results/lo-1b/metrics.json")   # the card quotes that run's figures
    tok = from_pretrained("owner/name", revision="v1")                   # or "tok/", "lo", "hi", a .ckpt / .pt file
    push_to_hub(tok, "owner/name")                                       # huggingface_hub's create_repo + upload_folder

Reading a folder or a repository reads safetensors and JSON only: it runs no code. Hub files come through
flowmo.pretrained (HF_ENDPOINT, HF_HUB_OFFLINE, the timeout, the SHA-256 check and its one-sentence failures).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

from flowmo import checkpoint, flow, pretrained
from flowmo.checkpoint import CONFIG_NAME, RELEASES, WEIGHTS_NAME
from flowmo.config import FlowMoConfig
from flowmo.errors import UserError
from flowmo.nn.tokenizer import FlowMoTokenizer

CARD_NAME = "README.md"


# ------------------------------------------------------------------------------------------- writing
def save_pretrained(
    tokenizer: FlowMoTokenizer, folder: str | Path, metrics: Mapping | str | Path | None = None
) -> Path:
    """Write model.safetensors + config.json + README.md into `folder`; `metrics`: a run's metrics.json (or its
    dict) whose figures the card quotes."""
    from safetensors.torch import save_file

    folder, state = Path(folder), tokenizer.state_dict()
    checkpoint.require_finite(state, f"not saving to {folder}")
    report = read_metrics(metrics)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: value.detach().cpu().contiguous() for key, value in state.items()},
        folder / WEIGHTS_NAME,
        metadata={"format": "pt", **checkpoint.record_metadata(tokenizer)},
    )
    (folder / CONFIG_NAME).write_text(json.dumps(tokenizer.config.to_dict(), indent=2) + "\n")
    model_card(tokenizer.config, sum(v.numel() for v in state.values()), report).save(folder / CARD_NAME)
    return folder


def read_metrics(metrics: Mapping | str | Path | None) -> Mapping | None:
    if metrics is None or isinstance(metrics, Mapping):
        return metrics
    try:
        return json.loads(Path(metrics).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(
            f"cannot read the run's metrics {metrics} ({error}); give the metrics.json that "
            "`flowmo test` wrote under results/<run>/."
        ) from None


def model_card(config: FlowMoConfig, parameters: int, report: Mapping | None):
    """huggingface_hub's ModelCard: what the tokenizer is, how to load it, and the run's figures when known."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="flowmo", tags=["flowmo", "image-tokenizer"])
    paper = flow.SAMPLERS["paper"]
    vocab = f"2^{config.codebook_bits}" if config.codebook_bits else config.quantizer
    rows = [
        (
            "architecture",
            f"FlowMo: patch {config.patch_size}, encoder {_stack(config.encoder)}, decoder "
            f"{_stack(config.decoder)}, {parameters / 1e6:.1f}M parameters",
        ),
        (
            "code",
            f"{config.code_length} tokens x {config.code_dim} channels ({config.quantizer}), "
            f"{config.groups_per_token} sub-tokens of vocabulary {vocab} per token",
        ),
        ("bits per pixel", f"{config.bits_per_pixel:.4g} at {config.image_size}x{config.image_size}"),
        (
            "sampler",
            f"paper: {paper.steps} steps, rho {paper.rho:g}, CFG {paper.cfg:g} on "
            f"{tuple(paper.cfg_interval)}, {paper.nfe} network evaluations (detokenize's default)",
        ),
    ]
    lines = [
        "# FlowMo image tokenizer",
        "",
        'Load it with the flowmo package: `flowmo.from_pretrained("<this folder or repo id>")`.',
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in rows] + ["", *_figures(report)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n")


def _stack(stack) -> str:
    return f"{stack.width} wide x {stack.depth} deep ({stack.heads} heads)"


def _figures(report: Mapping | None) -> list[str]:
    """The run's metrics.json figures as a table, with the sampler and images they were measured on."""
    if not report:
        return ["No evaluation figures: these weights were not saved with a run's metrics.json."]
    figures = report.get("metrics", report)
    numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sampler = report.get("sampler")
    lines = [
        "## Evaluation (the run's metrics.json)",
        "",
        f"{report.get('num_images', 'an unrecorded number of')} images; sampler {sampler or 'not recorded'}; "
        f"checkpoint {report.get('checkpoint', 'not recorded')}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    return lines + [f"| {name} | {value:.6g} |" for name, value in sorted(numbers.items())]


def push_to_hub(
    tokenizer: FlowMoTokenizer,
    repo_id: str,
    metrics=None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload FlowMo tokenizer",
) -> str:
    """save_pretrained into a temporary folder, then huggingface_hub's create_repo + upload_folder (HF_ENDPOINT,
    HF_TOKEN as the library reads them). Returns the commit's address."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=pretrained.hf_endpoint(), token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(tokenizer, folder, metrics)
        return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message))


# ------------------------------------------------------------------------------------------- reading
def from_pretrained(
    name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None, weights: str = "ema"
) -> FlowMoTokenizer:
    """A released name ("lo" / "hi": the authors' files at a pinned commit of ksarge/FlowMo), a folder written
    by save_pretrained, or a Hub repository id ("owner/name") at `revision`. Downloads land in the Hugging Face
    cache (or `cache_dir`); HF_HUB_OFFLINE=1 uses the cache only, HF_ENDPOINT a mirror."""
    return checkpoint.tokenizer_from(resolve(name_or_path, revision, cache_dir), weights)


def resolve(name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> str | Path:
    """What a released name (lo, hi), a save_pretrained folder, a tokenizer file, or a Hub repository id ("owner/name")
    at `revision` comes to on this machine: the name itself (checkpoint.load_state fetches it, pinned), the local
    path, or the downloaded snapshot folder in `cache_dir` (default: the Hugging Face cache)."""
    name, path = str(name_or_path), Path(name_or_path).expanduser()
    if name in RELEASES and not path.exists():
        if revision is not None or cache_dir is not None:
            raise UserError(
                f"{name} is the authors' release, pinned in flowmo.pretrained and kept in the Hugging "
                "Face cache; revision and cache_dir apply to a Hub repository id (owner/name)."
            )
        return name
    if path.exists():
        return path
    return download_repo(name, revision, cache_dir)


def download_repo(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """The snapshot folder holding config.json and model.safetensors of a Hub repository (hf_hub_download's)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = "/" in repo_id
    except HFValidationError:
        valid = False
    if not valid:
        raise UserError(
            f"No tokenizer at {repo_id!r}: give a released name ({', '.join(RELEASES)}), a folder written "
            "by save_pretrained, a tokenizer file, or a Hub repository id (owner/name)."
        )
    files = [
        pretrained.PretrainedFile(
            repo_id,
            f"the tokenizer {repo_id}",
            name,
            repo_id=repo_id,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir else None,
        )
        for name in (CONFIG_NAME, WEIGHTS_NAME)
    ]
    return [pretrained.fetch_file(spec) for spec in files][-1].parent
