"""Run by tests/test_compile.py in an interpreter of its own (as a user's training process is: nothing an earlier
test imported, e.g. the standard library's distutils, can break inductor's C++ tool chain set-up). The tiny
tokenizer compiled with inductor against eager: Stage-1A (flow + quantizer losses) and Stage-1B (encoder frozen,
the chain back-propagated) losses and gradients; fp32, every gradient tensor within 1e-3 of its own norm. Exits
non-zero naming the first difference."""

from __future__ import annotations

import sys

import torch

from flowmo.bench.workloads import recipes, set_stage
from flowmo.losses import flowmo_loss
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.perceptual import build_perceptual
from flowmo.presets import resolve_config


def loss_and_grads(tokenizer: FlowMoTokenizer, images: torch.Tensor, recipe) -> tuple[torch.Tensor, list]:
    """One micro-batch's loss and gradients, with the same draws of t, noise and chain grid every call."""
    tokenizer.zero_grad(set_to_none=True)
    out = flowmo_loss(tokenizer, images, recipe, None, build_perceptual("pixel_mse"), torch.Generator().manual_seed(7))
    out.total.backward()
    return out.total.detach(), [p.grad.clone() for p in tokenizer.parameters() if p.grad is not None]


def main() -> int | str:
    torch.manual_seed(0)
    eager = FlowMoTokenizer(resolve_config("tiny"))
    compiled = FlowMoTokenizer(resolve_config("tiny"))
    compiled.load_state_dict(eager.state_dict())
    compiled.encoder.compile()  # inductor, torch.compile's default backend
    compiled.decoder.compile()
    # Stage 1A at micro-batch 1 (a static graph: dynamo specialises a size of 1) and 2 (the dynamic-batch graph);
    # Stage 1B at 2 (the frozen encoder and the back-propagated chain through the dynamic graphs). 1B at micro-batch
    # 1 adds no graph kind and ~1 minute of cold compilation to CI.
    for stage, batches in (("1a", (1, 2)), ("1b", (2,))):
        recipe = recipes("off")[stage]
        for tokenizer in (eager, compiled):
            set_stage(tokenizer, stage)  # Stage 1B: the encoder frozen, as the module freezes it
        for batch in batches:
            images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)) * 2 - 1
            loss, grads = loss_and_grads(eager, images, recipe)
            compiled_loss, compiled_grads = loss_and_grads(compiled, images, recipe)
            if not torch.allclose(compiled_loss, loss, rtol=1e-4) or len(compiled_grads) != len(grads):
                return f"stage {stage}, micro-batch {batch}: loss {compiled_loss} compiled, {loss} eager"
            errors = [
                float((got - want).norm() / want.norm().clamp_min(1e-12)) for got, want in zip(compiled_grads, grads)
            ]
            if max(errors) > 1e-3:
                return f"stage {stage}, micro-batch {batch}: a gradient differs by {max(errors):.2e} of its norm"
            print(f"stage {stage}, micro-batch {batch}: loss {float(loss):.6f}, worst gradient {max(errors):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
