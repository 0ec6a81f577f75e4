"""Generator speed on this machine: training tokens/s and sampling ms per image, the tokenizer's decode apart.

    OMP_NUM_THREADS=1 python -m flowmo.bench.generator --preset tiny --tokens 16 --groups 8 --codebook 512 \
        --tokenizer runs/demo-1b/checkpoints/last.ckpt

Training: forward + backward + AdamW step of MaskGITModule.loss on random ids (the step's cost does not depend on
the values), after warm-up steps; tokens/s counts whole tokens (L per image). Sampling: MaskGIT decoding only,
then (with --tokenizer) the tokenizer's detokenize of those ids with each named sampler, timed separately.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flowmo.generate import MaskGITModule
from flowmo.tools import load_tokenizer


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Mean seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--codebook", type=int, default=512)
    parser.add_argument("--classes", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="decoding steps")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    layout = dict(tokens=args.tokens, groups=args.groups, codebook_size=args.codebook, num_classes=args.classes)
    module = MaskGITModule(token_layout=layout, preset=args.preset)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    ids = torch.randint(0, args.codebook, (args.batch, args.tokens * args.groups))
    classes = torch.randint(0, args.classes, (args.batch,))

    def train_step():
        loss = module.loss(ids, classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s = timed(train_step, args.repeats)
    module.eval()
    labels = torch.arange(args.sample_batch) % args.classes
    row = {
        "preset": args.preset,
        "layout": layout,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "parameters_M": round(sum(p.numel() for p in module.parameters()) / 1e6, 3),
        "train_tokens_per_s": round(args.batch * args.tokens / step_s),
        "train_step_ms": round(1000 * step_s, 1),
        "decoding_steps": args.steps,
    }
    for cfg in (1.0, 2.0):
        seconds = timed(lambda cfg=cfg: module.generate(labels, steps=args.steps, cfg=cfg), max(3, args.repeats // 4))
        row[f"generator_ms_per_image_cfg{cfg:g}"] = round(1000 * seconds / args.sample_batch, 2)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, "cpu")
        sampled = module.generate(labels, steps=args.steps)
        for sampler in ("fast", "paper"):
            seconds = timed(lambda sampler=sampler: tokenizer.detokenize(sampled, sampler=sampler), 3, warmup=1)
            row[f"tokenizer_decode_ms_per_image_{sampler}"] = round(1000 * seconds / args.sample_batch, 2)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
