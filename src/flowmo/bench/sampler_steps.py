"""Reconstruction quality and decode time of a trained tokenizer against the number of sampler steps.

    python -m flowmo.bench.sampler_steps --checkpoint runs/demo-1b/checkpoints/last.ckpt --data data/demo

Every step count decodes the same codes from the same noise (rho 4, CFG 1.5 inside the EDM interval
(0.17, 1.02), as the paper's 25-step sampler), on the held-out images of a sample set (`flowmo demo` builds one
in data/demo). Prints PSNR / SSIM per step count, the network evaluations (NFE: SamplerSettings.nfe, which
tests/test_speed.py checks against a counted run) and decode ms per image; writes the table to
results/bench/sampler_steps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flowmo.checkpoint import from_checkpoint
from flowmo.demo import validation_images
from flowmo.flow import SAMPLERS
from flowmo.metrics.image import psnr_per_image, ssim_gaussian_per_image, to_unit_range
from flowmo.nn.tokenizer import FlowMoTokenizer


@torch.no_grad()
def sweep(
    tokenizer: FlowMoTokenizer, images: torch.Tensor, steps_list: list[int], seed: int, repeats: int
) -> list[dict]:
    codes = tokenizer.quantize(tokenizer.encode(images), with_losses=False).codes
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for steps in steps_list:
        sampler = SAMPLERS["paper"].replace(steps=steps)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            decoded = tokenizer.sample_with(sampler, codes, noise)
            seconds.append(time.perf_counter() - start)
        a, b = to_unit_range(images), to_unit_range(decoded)
        rows.append(
            {
                "steps": steps,
                "nfe": sampler.nfe,
                "psnr": float(psnr_per_image(a, b).mean()),
                "ssim": float(ssim_gaussian_per_image(a, b).mean()),
                "decode_ms_per_image": 1e3 * statistics.median(seconds) / len(images),
            }
        )
        print(
            f"{steps:>6}{rows[-1]['nfe']:>6}{rows[-1]['psnr']:>9.2f}{rows[-1]['ssim']:>8.3f}"
            f"{rows[-1]['decode_ms_per_image']:>10.2f}",
            flush=True,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt or exported .pt of this package (EMA weights)")
    parser.add_argument("--data", default="data/demo", help="a sample set folder holding val.json")
    parser.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's training size")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 12, 16, 25])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per step count (median)")
    parser.add_argument("--json", type=Path, default=Path("results/bench/sampler_steps.json"))
    args = parser.parse_args()
    tokenizer = from_checkpoint(args.checkpoint).eval()
    images = validation_images(Path(args.data), args.image_size or tokenizer.config.image_size)
    print(f"{args.checkpoint}: {len(images)} held-out images, {torch.get_num_threads()} threads")
    print(f"{'steps':>6}{'NFE':>6}{'PSNR':>9}{'SSIM':>8}{'ms/img':>10}")
    rows = sweep(tokenizer, images, args.steps, args.seed, args.repeats)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "images": len(images),
                "seed": args.seed,
                "sampler": {k: v for k, v in SAMPLERS["paper"].to_dict().items() if k != "steps"},
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
