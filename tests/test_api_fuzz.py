"""Property-based fuzz of the public tokenizer API: for any input, a valid result or one ValueError.

Valid = finite images of the requested shape in [-1, 1], or int64 ids of the right shape within the codebook.
Anything else (a RuntimeError from a matmul, an AttributeError, silent wrapping of ids, NaN out) is a bug.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowmo import FlowMoTokenizer

FAST = dict(steps=2, cfg=1.0)  # the sampler's arithmetic is the same at 2 steps; keeps hundreds of cases fast
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer() -> FlowMoTokenizer:
    torch.manual_seed(0)
    return FlowMoTokenizer.from_preset("tiny").eval()


# weighted toward valid inputs, so a good share of cases reaches the model (hypothesis --hypothesis-show-statistics)
DTYPES = st.sampled_from(
    [torch.float32] * 4 + [torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64, torch.bool]
)
SIDES = st.sampled_from([4, 8, 16, 32, 32, 12, 0, 1, 30])
SPECIAL = st.sampled_from([None] * 6 + ["nan", "inf", "big", "unit"])


@st.composite
def image_inputs(draw):
    rank = draw(st.sampled_from([4] * 7 + [3, 5, 2]))
    channels = draw(st.sampled_from([3] * 6 + [1, 4]))
    batch = draw(st.sampled_from([1, 1, 2, 3, 0]))
    height, width = draw(SIDES), draw(SIDES)
    shape = {
        4: (batch, channels, height, width),
        3: (channels, height, width),
        5: (1, batch, channels, height, width),
        2: (height, width),
    }[rank]
    dtype = draw(DTYPES)
    values = torch.rand(shape, dtype=torch.float64) * 2 - 1
    special = draw(SPECIAL)
    if special and values.numel():
        if special == "nan":
            values.view(-1)[0] = math.nan
        elif special == "inf":
            values.view(-1)[-1] = math.inf
        elif special == "big":
            values = values * 3
        else:
            values = (values + 1) / 2
    container = draw(st.sampled_from(["tensor"] * 8 + ["numpy", "list"]))
    tensor = values.to(dtype) if dtype.is_floating_point else (values * 100).to(dtype)
    if container == "numpy" and dtype != torch.bfloat16:
        return tensor.numpy()
    if container == "list":
        return tensor.tolist()
    return tensor


def check_images_out(out: torch.Tensor, batch: int, height: int, width: int) -> None:
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (batch, 3, height, width)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


@SETTINGS
@given(images=image_inputs())
def test_reconstruct_encode_tokenize_give_a_result_or_a_value_error(tokenizer, images):
    try:
        out = tokenizer.reconstruct(images, generator=torch.Generator().manual_seed(0), **FAST)
    except ValueError as error:
        assert str(error) and "\n" not in str(error)
        event(f"refused: {str(error)[:40]}")
        return
    event("reconstructed")
    check_images_out(out, images.shape[0], images.shape[-2], images.shape[-1])
    ids = tokenizer.tokenize(images)
    assert ids.dtype == torch.int64 and ids.shape == (images.shape[0], tokenizer.ids_per_image)
    assert ids.min() >= 0 and ids.max() < tokenizer.quantizer.codebook_size


@st.composite
def id_inputs(draw):
    per_image = 32  # tiny: 16 tokens x 2 sub-tokens
    batch = draw(st.integers(0, 3))
    count = draw(st.sampled_from([per_image, per_image, per_image, per_image // 2, per_image * 2, 0, 1]))
    low, high = draw(st.sampled_from([(0, 512), (0, 512), (-3, 512), (0, 700), (0, 2**40)]))
    values = torch.randint(low, high, (batch, count))
    kind = draw(st.sampled_from(["int64", "int64", "int32", "uint8", "float", "float_whole", "bool", "1d"]))
    if kind == "int32":
        values = values.clamp(max=2**31 - 1).int()
    elif kind == "uint8":
        values = values.clamp(0, 255).to(torch.uint8)
    elif kind == "float":
        values = values.double() + 0.5
    elif kind == "float_whole":
        values = values.double()
    elif kind == "bool":
        values = values > 100
    elif kind == "1d":
        values = values.reshape(-1)
    container = draw(st.sampled_from(["tensor", "numpy", "list"]))
    if container == "numpy":
        return values.numpy()
    if container == "list":
        return values.tolist()
    return values


@SETTINGS
@given(ids=id_inputs(), size=st.sampled_from([None, (32, 32), (16, 48), (0, 32), (30, 32)]))
def test_detokenize_gives_a_result_or_a_value_error(tokenizer, ids, size):
    try:
        out = tokenizer.detokenize(ids, image_size=size, generator=torch.Generator().manual_seed(0), **FAST)
    except ValueError as error:
        assert str(error) and "\n" not in str(error)
        event(f"refused: {str(error)[:40]}")
        return
    event("decoded")
    array = np.asarray(ids)
    assert array.ndim == 2 and array.shape[1] == tokenizer.ids_per_image  # only the right count decodes
    assert np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() < 512  # never wrapped
    height, width = size or (32, 32)
    check_images_out(out, array.shape[0], height, width)


def test_half_precision_images_are_accepted(tokenizer):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = tokenizer.tokenize(images)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert tokenizer.tokenize(images.to(dtype)).shape == reference.shape
    assert torch.equal(tokenizer.tokenize(images.double()), reference)
