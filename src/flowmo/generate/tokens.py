"""Token shards: what `flowmo pretokenize` writes and the generator reads.

A token shard is a WebDataset tar whose samples are `{key}.tokens.npy` (one image's ids [L*F] in the smallest
unsigned dtype that holds them), `{key}.cls` (class index as text) and `{key}.src` (the source image's
`__key__`). The manifest `{split}.json` beside them records the tokenizer (config + a SHA-256 of its weights),
the crop policy and the token layout, so a generator never trains on, or decodes with, another tokenizer's ids.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from flowmo.errors import UserError

TOKEN_MANIFEST_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's config and weights (names, dtypes, shapes, bytes): equal iff the same tokenizer."""
    digest = hashlib.sha256(json.dumps(tokenizer.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_record(tokenizer, source: str) -> dict:
    """What a token manifest says about the tokenizer that wrote it."""
    return {
        "source": source,
        "sha256": tokenizer_fingerprint(tokenizer),
        "config": tokenizer.config.to_dict(),
        "tokens": tokenizer.config.code_length,
        "groups": tokenizer.quantizer.ids_per_token,
        "codebook_size": int(tokenizer.quantizer.codebook_size),
        "ids_per_image": tokenizer.ids_per_image,
    }


def smallest_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ids in [0, codebook_size)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def encode_ids(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, ids, allow_pickle=False)
    return buffer.getvalue()


def decode_ids(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_token_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no token manifest at {path}; write token shards first with "
            "`flowmo pretokenize --tokenizer CKPT --shards MANIFEST --out DIR`."
        )
    manifest = json.loads(path.read_text())
    if "tokenizer" not in manifest or "tokens_dtype" not in manifest:
        raise UserError(
            f"{path} is not a token manifest (it has no tokenizer record); give the .json that "
            "`flowmo pretokenize` wrote."
        )
    return manifest


def token_layout(manifest: dict) -> dict:
    """The generator's TokenLayout fields (plus the tokenizer hash) from a token manifest."""
    record = manifest["tokenizer"]
    return {
        "tokens": record["tokens"],
        "groups": record["groups"],
        "codebook_size": record["codebook_size"],
        "num_classes": manifest["num_classes"],
        "tokenizer_sha256": record["sha256"],
    }


def check_same_tokenizer(expected_sha256: str | None, tokenizer, what: str) -> None:
    """Refuse ids written by (or a generator trained on) another tokenizer than `tokenizer`."""
    if expected_sha256 is None:
        return
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected_sha256:
        raise UserError(
            f"{what} were written by another tokenizer (weights hash {expected_sha256[:12]}...) than "
            f"the one given ({actual[:12]}...); decode with the tokenizer that wrote them, or "
            "pretokenize again with this one."
        )
