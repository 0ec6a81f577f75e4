"""Properties the network must have whatever its weights: patch layout, RoPE, quantizer round trips,
shape handling and input errors."""

import pytest
import torch

from flowmo import FlowMoTokenizer, presets
from flowmo.nn.quantizers import FSQ, LFQ
from flowmo.nn.rope import apply_rope, rope_angles, token_positions
from flowmo.nn.transformer import patchify, unpatchify


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FlowMoTokenizer.from_preset("tiny").eval()


def test_patchify_round_trip_and_channel_fastest_layout():
    images = torch.randn(2, 3, 8, 12)
    tokens = patchify(images, 4)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(unpatchify(tokens, 4, 8, 12), images)
    # token 1 is grid cell (0, 1); its vector is (ph, pw, c) with c fastest
    assert torch.equal(tokens[0, 1, :3], images[0, :, 0, 4])
    assert torch.equal(tokens[0, 1, 3:6], images[0, :, 0, 5])
    assert torch.equal(tokens[0, 1, 12:15], images[0, :, 1, 4])


def test_token_positions_latents_diagonal_image_grid():
    ids = token_positions(3, 2, 2)
    assert ids[:3].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert ids[3:].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    axes = (4, 6, 6)
    q, k = torch.randn(1, 1, 1, 16).double(), torch.randn(1, 1, 1, 16).double()

    def score(pos_q, pos_k):
        cos, sin = rope_angles(torch.tensor([pos_q, pos_k], dtype=torch.float64), axes, 10000.0)
        rq = apply_rope(q.expand(1, 1, 2, 16), cos.double(), sin.double())[..., 0, :]
        rk = apply_rope(k.expand(1, 1, 2, 16), cos.double(), sin.double())[..., 1, :]
        return (rq * rk).sum().item()

    base = score([1.0, 2.0, 3.0], [4.0, 0.0, 5.0])
    assert score([11.0, 9.0, 3.5], [14.0, 7.0, 5.5]) == pytest.approx(base, abs=1e-4)
    assert score([1.0, 2.0, 3.0], [4.0, 0.0, 6.0]) != pytest.approx(base, abs=1e-3)


def test_rope_rotates_interleaved_pairs():
    cos, sin = rope_angles(torch.tensor([[0.0, 0.0, 1.0]]), (2, 2, 2), 10000.0)
    x = torch.tensor([[[[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]]])
    out = apply_rope(x, cos, sin)[0, 0, 0]
    # axis 2 owns channels (4, 5); angle 1 rad rotates (1, 0) to (cos 1, sin 1); the others are untouched
    assert torch.allclose(out, torch.tensor([0, 0, 0, 0, torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))]))


def test_lfq_indices_bits_round_trip_and_grouping():
    lfq = LFQ(code_dim=18, group_bits=9)
    codes = torch.randint(0, 2, (3, 5, 18)).float() * 2 - 1
    indices = lfq.codes_to_indices(codes)
    assert indices.shape == (3, 10) and indices.max() < 512
    assert torch.equal(lfq.indices_to_codes(indices), codes)
    # sub-token 2*l takes the even channels of token l, little-endian
    code = -torch.ones(1, 1, 18)
    code[0, 0, 0] = 1  # channel 0 -> sub-token 0, bit 0
    code[0, 0, 3] = 1  # channel 3 -> sub-token 1, bit 1
    assert lfq.codes_to_indices(code).tolist() == [[1, 2]]
    all_indices = torch.arange(512)[None]
    assert torch.equal(
        lfq.codes_to_indices(lfq.indices_to_codes(all_indices.repeat_interleave(2, 1)[:, :512])),
        all_indices.repeat_interleave(2, 1)[:, :512],
    )


def test_lfq_sign_of_zero_and_straight_through_gradient():
    lfq = LFQ(code_dim=4, group_bits=2)
    code = torch.tensor([[[0.0, -0.2, 0.3, 2.0]]], requires_grad=True)
    out = lfq(code)
    assert out.codes.tolist() == [[[-1.0, -1.0, 1.0, 1.0]]]
    out.codes.sum().backward()
    assert torch.equal(code.grad, torch.ones_like(code))


def test_fsq_round_trip_and_range():
    fsq = FSQ((8, 5, 4))
    code = torch.randn(2, 7, 3) * 3
    out = fsq(code)
    assert out.codes.abs().max() <= 1
    assert out.indices.shape == (2, 7) and out.indices.max() < 160
    assert torch.allclose(fsq.indices_to_codes(out.indices), out.codes)
    every = torch.arange(160)[None]
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(every)), every)
    assert len({tuple(c) for c in fsq.indices_to_codes(every)[0].tolist()}) == 160


@pytest.mark.parametrize("quantizer, extra", [("fsq", dict(code_dim=6, fsq_levels=(8,) * 6)), ("none", {})])
def test_other_quantizers_run_end_to_end(quantizer, extra):
    torch.manual_seed(0)
    tok = FlowMoTokenizer.from_config(presets.get("tiny").replace(quantizer=quantizer, **extra))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    q = tok.quantize(tok.encode(images))
    out = tok.sample(q.codes, torch.randn_like(images), steps=2)
    assert out.shape == images.shape
    if quantizer == "fsq":
        assert torch.allclose(
            tok.detokenize(tok.tokenize(images), noise=torch.zeros_like(images), steps=2),
            tok.sample(q.codes, torch.zeros_like(images), steps=2),
            atol=1e-5,
        )
    else:
        with pytest.raises(ValueError, match="continuous code"):
            tok.tokenize(images)


def test_non_square_images(tiny):
    images = torch.rand(2, 3, 16, 40) * 2 - 1
    code = tiny.encode(images)
    assert code.shape == (2, 16, 18)
    out = tiny.detokenize(tiny.tokenize(images), image_size=(16, 40), steps=3)
    assert out.shape == (2, 3, 16, 40) and out.abs().max() <= 1


def test_code_reaches_the_decoder_once_gates_open(tiny):
    """Zero-initialised gates make a fresh decoder ignore the code; any trained gate must not."""
    torch.manual_seed(1)
    model = FlowMoTokenizer.from_preset("tiny")
    with torch.no_grad():
        for block in model.decoder.double_blocks:
            block.img.mod.lin.bias.add_(0.5)
            block.txt.mod.lin.bias.add_(0.5)
    noisy, t = torch.randn(1, 3, 32, 32), torch.tensor([0.5])
    codes = torch.ones(1, 16, 18)
    assert not torch.allclose(model.velocity(noisy, codes, t), model.velocity(noisy, None, t))
    assert not torch.allclose(model.velocity(noisy, codes, t), model.velocity(noisy, -codes, t))


def test_tokenize_detokenize_api(tiny):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    indices = tiny.tokenize(images)
    assert indices.dtype == torch.int64 and indices.shape == (3, 32)
    out = tiny.detokenize(indices, generator=torch.Generator().manual_seed(0), steps=4)
    assert out.shape == images.shape and out.abs().max() <= 1
    again = tiny.detokenize(indices, generator=torch.Generator().manual_seed(0), steps=4)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(3, 32, 32), "shape \\[B, 3, H, W\\]"),
        (torch.zeros(1, 1, 32, 32), "shape \\[B, 3, H, W\\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating point"),
        (torch.zeros(1, 3, 30, 32), "not divisible by the patch size 4"),
        (torch.full((1, 3, 32, 32), 255.0), "must lie in \\[-1, 1\\]"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_images_get_one_clear_error(tiny, images, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode(images)
