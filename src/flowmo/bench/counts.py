"""`make bench COUNT_ONLY=1`: FLOPs per image and parameters of each preset, counted on fake tensors (no timing),
beside docs/method.md §9's estimates for FlowMo-Lo / Hi."""

from __future__ import annotations

from flowmo import presets
from flowmo.bench.workloads import flops_per_image, parameter_counts
from flowmo.flow import SAMPLERS

# docs/method.md §9's estimates, FLOPs per 256x256 image for FlowMo-Lo/Hi.
METHOD_9 = {
    "encoder forward": 1.2e12,
    "decoder forward (1 NFE)": 4.7e12,
    "stage1a step": 16.5e12,
    "stage1b step": 165e12,
    "decode (31 NFE)": 31 * 4.7e12,
}
METHOD_9_NOTE = "stage1a: method §9 gives 15-18 TFLOP (fwd+bwd), midpoint shown"


def count_report(preset: str, batch: int, feature_nets: str, image_size: int | None) -> dict:
    flops = flops_per_image(preset, batch, feature_nets, image_size)
    size = image_size or presets.get(preset).image_size
    return {
        "preset": preset,
        "image_size": size,
        "params": parameter_counts(preset),
        "decode_nfe": SAMPLERS["paper"].nfe,
        "flops_per_image": {
            "encoder forward": flops["encode"],
            "decoder forward (1 NFE)": flops["decoder_call"],
            "stage1a step": flops["1a"],
            "stage1b step": flops["1b"],
            "decode (31 NFE)": flops["decode"],
        },
        "decoder_forward_attention_flops_per_image": flops["decoder_call_attention"],
    }


COUNT_COLUMNS = {
    "encoder forward": "enc fwd",
    "decoder forward (1 NFE)": "dec fwd",
    "stage1a step": "1A step",
    "stage1b step": "1B step",
    "decode (31 NFE)": "decode",
}


def print_counts(reports: list[dict]) -> None:
    print("\nFLOPs per image in TFLOP (FlopCounterMode on fake tensors); parameters in millions")
    print(
        f"{'preset':<8}{'res':>5}{'enc M':>8}{'dec M':>8}{'total M':>9}"
        + "".join(f"{c:>11}" for c in COUNT_COLUMNS.values())
        + f"{'dec attn':>11}"
    )
    for r in reports:
        p, f = r["params"], r["flops_per_image"]
        print(
            f"{r['preset']:<8}{r['image_size']:>5}{p['encoder'] / 1e6:>8.1f}{p['decoder'] / 1e6:>8.1f}"
            f"{p['total'] / 1e6:>9.1f}"
            + "".join(f"{f[k] / 1e12:>11.4g}" for k in COUNT_COLUMNS)
            + f"{r['decoder_forward_attention_flops_per_image'] / 1e12:>11.4g}"
        )
    print(
        f"{'est. §9':<8}{256:>5}{'':>25}"
        + "".join(f"{METHOD_9[k] / 1e12:>11.4g}" for k in COUNT_COLUMNS)
        + f"{1.4:>11.4g}"
    )
    print(
        f"dec fwd = one decoder call (1 NFE), dec attn = its attention part; decode = {reports[0]['decode_nfe']} "
        f"NFE; training steps are forward + backward (1B: 8-step chain, checkpointed).\n({METHOD_9_NOTE}; "
        "method §9 is for lo/hi at 256x256)"
    )
