from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.wire import (
    decode_mask,
    decode_scalars,
    encode_mask,
    encode_scalars,
    mask_nbytes,
    scalars_nbytes,
    sparse_weights_nbytes,
)
from fedzo_flwr.sparse.mask import apply_mask_, dense_mask, global_topk_mask, prunable_parameters
from fedzo_flwr.sparse.space import KeptSpace

LENET_LAYER_SIZES = {
    "conv1.weight": 450,
    "conv2.weight": 2400,
    "fc1.weight": 48000,
    "fc2.weight": 10080,
    "fc3.weight": 840,
}


def random_mask(template: dict[str, torch.Tensor], p: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g) < p for n, t in template.items()}


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return build_model("lenet5", seed=0)


# ------------------------------------------------------------------------------ mask bitmap


def test_lenet_mask_size_exact(lenet: torch.nn.Module) -> None:
    sizes = {n: p.numel() for n, p in prunable_parameters(lenet)}
    assert sizes == LENET_LAYER_SIZES
    from_shapes = sum(math.ceil(n / 8) for n in sizes.values())
    assert from_shapes == 57 + 300 + 6000 + 1260 + 105 == 7722
    assert mask_nbytes(lenet) == 7722
    assert mask_nbytes(dense_mask(lenet)) == 7722
    assert len(encode_mask(dense_mask(lenet))) == 7722


@pytest.mark.parametrize("p", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_lenet_mask_round_trip(lenet: torch.nn.Module, p: float) -> None:
    mask = random_mask(dense_mask(lenet), p, seed=int(p * 100))
    data = encode_mask(mask)
    assert isinstance(data, bytes)
    assert len(data) == mask_nbytes(mask) == 7722
    for template in (lenet, mask):
        out = decode_mask(data, template)
        assert list(out) == list(mask)
        for name in mask:
            assert out[name].dtype == torch.bool
            assert out[name].shape == mask[name].shape
            assert torch.equal(out[name], mask[name])


@pytest.mark.parametrize("n", [*range(1, 18), 63, 64, 65, 1001])
def test_single_tensor_size_and_round_trip(n: int) -> None:
    for seed in range(3):
        mask = random_mask({"w": torch.empty(n)}, 0.5, seed)
        data = encode_mask(mask)
        assert len(data) == mask_nbytes(mask) == math.ceil(n / 8)
        assert torch.equal(decode_mask(data, mask)["w"], mask["w"])


def test_odd_shapes_round_trip_and_concatenation() -> None:
    template = {
        "a": torch.empty(7),
        "b": torch.empty(3, 5),
        "c": torch.empty(1),
        "d": torch.empty(2, 3, 3, 3),
    }
    mask = random_mask(template, 0.5, seed=4)
    data = encode_mask(mask)
    assert len(data) == 1 + 2 + 1 + 7
    # Per-tensor packing: each tensor starts on a byte boundary.
    offset = 0
    for m in mask.values():
        nbytes = math.ceil(m.numel() / 8)
        assert data[offset : offset + nbytes] == np.packbits(m.numpy().reshape(-1)).tobytes()
        offset += nbytes
    out = decode_mask(data, template)
    assert all(torch.equal(out[n], mask[n]) for n in mask)


def test_bit_order_is_big_endian_and_padding_zero() -> None:
    first = torch.zeros(8, dtype=torch.bool)
    first[0] = True
    assert encode_mask({"w": first}) == b"\x80"
    assert encode_mask({"w": torch.ones(7, dtype=torch.bool)}) == b"\xfe"
    assert encode_mask({"w": torch.ones(9, dtype=torch.bool)}) == b"\xff\x80"
    assert encode_mask({"w": torch.ones(2, 3, dtype=torch.bool)}) == b"\xfc"


def test_decode_accepts_bytes_like() -> None:
    mask = random_mask({"w": torch.empty(3, 7)}, 0.5, seed=1)
    data = encode_mask(mask)
    for buf in (bytearray(data), memoryview(data)):
        assert torch.equal(decode_mask(buf, mask)["w"], mask["w"])


def test_decode_mask_wrong_length(lenet: torch.nn.Module) -> None:
    data = encode_mask(dense_mask(lenet))
    with pytest.raises(ValueError, match=r"data has 7721 bytes, expected 7722"):
        decode_mask(data[:-1], lenet)
    with pytest.raises(ValueError, match=r"data has 7723 bytes, expected 7722"):
        decode_mask(data + b"\x00", lenet)
    with pytest.raises(ValueError, match=r"data has 0 bytes, expected 7722"):
        decode_mask(b"", lenet)


def test_decode_mask_nonzero_padding() -> None:
    template = {"a": torch.empty(7), "b": torch.empty(8)}
    data = bytearray(
        encode_mask({n: torch.ones(t.shape, dtype=torch.bool) for n, t in template.items()})
    )
    assert bytes(data) == b"\xfe\xff"
    data[0] |= 0x01  # the 8th bit of tensor "a" is padding
    with pytest.raises(ValueError, match=r"data has non-zero padding bits after tensor 'a'"):
        decode_mask(bytes(data), template)


def test_mask_type_errors(lenet: torch.nn.Module) -> None:
    with pytest.raises(TypeError, match="mask must be a dict"):
        encode_mask([torch.ones(3, dtype=torch.bool)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mask\['w'\] must be a torch.bool tensor"):
        encode_mask({"w": torch.ones(3)})
    with pytest.raises(TypeError, match=r"mask\['w'\] must be a torch.bool tensor"):
        encode_mask({"w": np.ones(3, dtype=bool)})  # type: ignore[dict-item]
    data = encode_mask(dense_mask(lenet))
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        decode_mask(data.decode("latin-1"), lenet)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="template must be a Mask"):
        decode_mask(data, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"template\['w'\] must be a tensor"):
        decode_mask(b"\x00", {"w": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="mask_or_model must be"):
        mask_nbytes("lenet5")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ sparse weights


def _masked_lenet(seed: int, density: float) -> tuple[torch.nn.Module, KeptSpace]:
    model = build_model("lenet5", seed=seed)
    g = torch.Generator().manual_seed(123)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in prunable_parameters(model)}
    mask = global_topk_mask(scores, density)
    apply_mask_(model, mask)
    return model, KeptSpace(model, mask)


def test_sparse_weights_dense_space_size(lenet: torch.nn.Module) -> None:
    space = KeptSpace(lenet)
    assert space.dim == 62006
    assert sparse_weights_nbytes(space) == 248024
    masked = _masked_lenet(seed=0, density=0.1)[1]
    assert sparse_weights_nbytes(masked) == 4 * masked.dim < 248024


def test_sparse_weights_nbytes_rejects_a_non_space() -> None:
    with pytest.raises(TypeError, match="space must be a KeptSpace"):
        sparse_weights_nbytes(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ scalars


@pytest.mark.parametrize("k", [0, 1, 5, 64, 1000])
def test_scalars_round_trip_exact(k: int) -> None:
    rng = np.random.default_rng(k)
    values = (rng.standard_normal(k) * 10.0 ** rng.integers(-30, 30, size=k)).astype(np.float32)
    data = encode_scalars(values)
    assert len(data) == scalars_nbytes(k) == 4 * k
    out = decode_scalars(data, expected_count=k)
    assert out.dtype == np.float32 and out.shape == (k,)
    assert np.array_equal(out.view(np.uint32), values.view(np.uint32))
    assert out.flags.writeable
    assert np.array_equal(decode_scalars(data), out)


def test_scalars_wire_layout_and_inputs() -> None:
    assert encode_scalars([1.0]) == b"\x00\x00\x80\x3f"
    assert encode_scalars([1.0, -2.0]) == np.array([1.0, -2.0], dtype="<f4").tobytes()
    # Python floats (float64) are rounded to float32 once.
    values = [0.1, 1e-3, 3.14159, -2.5e10]
    assert np.array_equal(decode_scalars(encode_scalars(values)), np.asarray(values, np.float32))
    assert encode_scalars((1, 2, 3)) == encode_scalars(np.array([1.0, 2.0, 3.0]))
    assert encode_scalars(np.array([1.5], dtype=">f8")) == encode_scalars([1.5])
    special = [float("nan"), float("inf"), -float("inf"), -0.0]
    out = decode_scalars(encode_scalars(special))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf
    assert np.signbit(out[3])
    assert encode_scalars([]) == b""
    assert decode_scalars(b"", expected_count=0).shape == (0,)
    assert decode_scalars(bytearray(b"\x00\x00\x80\x3f"))[0] == 1.0


def test_scalars_errors() -> None:
    with pytest.raises(ValueError, match=r"data has 5 bytes, not a multiple of 4"):
        decode_scalars(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"data holds 3 scalars .*expected_count is 4"):
        decode_scalars(encode_scalars([1.0, 2.0, 3.0]), expected_count=4)
    with pytest.raises(ValueError, match="expected_count must be a non-negative int"):
        decode_scalars(b"", expected_count=-1)
    with pytest.raises(TypeError, match="expected_count must be a non-negative int"):
        decode_scalars(b"", expected_count="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        decode_scalars("abcd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="values must be"):
        encode_scalars("1.0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="values must be"):
        encode_scalars(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="values must hold real numbers"):
        encode_scalars(["a", "b"])
    with pytest.raises(TypeError, match="values must hold real numbers"):
        encode_scalars([True, False])
    with pytest.raises(ValueError, match="values must be one-dimensional"):
        encode_scalars(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"values\[1\] = 1e\+39 overflows float32"):
        encode_scalars([1.0, 1e39])
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        scalars_nbytes(-1)
    with pytest.raises(TypeError, match="k must be a non-negative int"):
        scalars_nbytes(2.0)  # type: ignore[arg-type]
    assert scalars_nbytes(7) == 28
