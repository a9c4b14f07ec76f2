"""correction_flags: Triton kernel vs ref_correction_flags vs torch cosine_similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sglang_freekv.kernels.correct as correct_mod
from sglang_freekv.kernels import correction_flags, cpu_correction_flags, ref_correction_flags
from sglang_freekv.kernels.correct import cpu_drift_flags

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATOL, RTOL = 1e-5, 1e-5
TAU = 0.5


def _make_queries(bs: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """last_q = a * q + noise with a spread over [-1, 2], so similarities cover [-1, 1];
    request 0 has a zero q head and a zero last_q head (cosine 0 by definition)."""
    q = torch.randn(bs, num_qo_heads, head_dim, device=device)
    a = torch.linspace(-1.0, 2.0, bs * num_qo_heads, device=device).view(bs, num_qo_heads, 1)
    last_q = a * q + torch.randn_like(q)
    q[0, 0] = 0.0
    last_q[0, -1] = 0.0
    return q.to(dtype), last_q.to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group_size", [1, 3, 4, 8], ids=lambda g: f"G{g}")
def test_correction_flags_match_ref(group_size: int, head_dim: int, dtype: str,
                                    device: torch.device) -> None:
    bs, num_kv_heads = 5, 3
    q, last_q = _make_queries(bs, num_kv_heads * group_size, head_dim, DTYPES[dtype], device)
    flags, sim = correction_flags(q, last_q, num_kv_heads, TAU, impl="triton")
    ref_flags, ref_sim = ref_correction_flags(q, last_q, num_kv_heads, TAU)
    assert flags.shape == sim.shape == (bs, num_kv_heads)
    assert flags.dtype == torch.bool and sim.dtype == torch.float32
    torch.testing.assert_close(sim, ref_sim, atol=ATOL, rtol=RTOL)
    assert torch.equal(flags, sim < TAU)  # the kernel's flags follow its own sim exactly
    near = (ref_sim - TAU).abs() < 1e-4  # rounding may flip only these
    assert torch.equal(flags[~near], ref_flags[~near])
    assert bool(flags.any()) and bool((~flags).any())  # the data exercises both outcomes


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [7, 24, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group_size", [1, 3, 8], ids=lambda g: f"G{g}")
def test_cpu_path_matches_ref(group_size: int, head_dim: int, dtype: str) -> None:
    """The CPU serving path (fused cosine_similarity) vs the spec, zero vectors included."""
    q, last_q = _make_queries(5, 3 * group_size, head_dim, DTYPES[dtype], torch.device("cpu"))
    flags, sim = cpu_correction_flags(q, last_q, 3, TAU)
    ref_flags, ref_sim = ref_correction_flags(q, last_q, 3, TAU)
    assert flags.dtype == torch.bool and sim.dtype == torch.float32
    torch.testing.assert_close(sim, ref_sim, atol=ATOL, rtol=RTOL)
    assert torch.equal(flags, sim < TAU)
    near = (ref_sim - TAU).abs() < 1e-4
    assert torch.equal(flags[~near], ref_flags[~near])
    # the engine's unchecked per-layer variant gives exactly these flags
    assert cpu_drift_flags(q, last_q, 3, TAU) == flags.tolist()


@pytest.mark.parametrize("group_size", [1, 4], ids=lambda g: f"G{g}")
def test_ref_matches_cosine_similarity(group_size: int) -> None:
    q, last_q = _make_queries(3, 2 * group_size, 24, torch.float32, torch.device("cpu"))
    q[0, 0] = 1.0  # no zero vectors: F.cosine_similarity's eps clamp would then differ
    last_q[0, -1] = 1.0
    _, sim = ref_correction_flags(q, last_q, 2, TAU)
    cos = F.cosine_similarity(q, last_q, dim=-1)  # [bs, num_qo_heads]
    torch.testing.assert_close(sim, cos.view(3, 2, group_size).mean(-1))


def test_correction_edge_cases(device: torch.device) -> None:
    """Identical queries -> sim 1, no flag; zero queries -> sim 0; opposite -> -1; tau is
    strict (sim == tau is not flagged)."""
    q = torch.randn(3, 4, 24, device=device)
    last_q = torch.stack([q[0], torch.zeros_like(q[1]), -3.0 * q[2]])
    q[1] = 0.0
    for impl in ("triton", "cpu", "ref"):
        flags, sim = correction_flags(q, last_q, 2, 0.0, impl=impl)
        torch.testing.assert_close(sim, torch.tensor([[1.0] * 2, [0.0] * 2, [-1.0] * 2],
                                                     device=device))
        assert flags.tolist() == [[False, False], [False, False], [True, True]]


def test_correction_strided_inputs(device: torch.device) -> None:
    """q a slice of a fused qkv tensor, last_q a slice of a persistent [max_bs, ...] buffer."""
    qkv = torch.randn(4, 12, 24, device=device)
    q = qkv[:, :8]  # [4, 8, 24], stride (288, 24, 1)
    buf = torch.randn(4, 8, 32, device=device)
    last_q = buf[:, :, :24]  # [4, 8, 24], stride (256, 32, 1)
    ref = ref_correction_flags(q, last_q, 2, 0.1)
    for impl in ("triton", "cpu"):
        out = correction_flags(q, last_q, 2, 0.1, impl=impl)
        torch.testing.assert_close(out[1], ref[1], atol=ATOL, rtol=RTOL)


def test_correction_routes_cpu_to_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    q, last_q = _make_queries(2, 4, 24, torch.float32, torch.device("cpu"))

    class _Boom:
        def __getitem__(self, grid: object) -> None:
            raise AssertionError("Triton kernel launched for CPU tensors")

    monkeypatch.setattr(correct_mod, "_correction_kernel", _Boom())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out, fast = correction_flags(q, last_q, 2, TAU), cpu_correction_flags(q, last_q, 2, TAU)
    assert torch.equal(out[0], fast[0]) and torch.equal(out[1], fast[1])
    ref = correction_flags(q, last_q, 2, TAU, impl="ref")
    assert torch.equal(ref[1], ref_correction_flags(q, last_q, 2, TAU)[1])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(AssertionError, match="launched"):
        correction_flags(q, last_q, 2, TAU)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(q=torch.randn(2, 4)), "q"),
        (dict(last_q=torch.randn(2, 4, 16)), "last_q"),
        (dict(last_q=torch.zeros(2, 4, 24, dtype=torch.int64)), "last_q"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(tau=None), "tau"),
        (dict(impl="cuda"), "impl"),
    ],
    ids=["q_rank", "last_q_shape", "last_q_dtype", "heads_div", "heads_zero", "tau", "impl"],
)
def test_correction_validation(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(q=torch.randn(2, 4, 24), last_q=torch.randn(2, 4, 24),
                                   num_kv_heads=2, tau=TAU, impl=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        correction_flags(**args)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_correction_gpu_large(dtype: str) -> None:
    q, last_q = _make_queries(256, 32, 128, DTYPES[dtype], torch.device("cuda"))
    flags, sim = correction_flags(q, last_q, 8, TAU)
    ref_flags, ref_sim = ref_correction_flags(q, last_q, 8, TAU)
    torch.testing.assert_close(sim, ref_sim, atol=ATOL, rtol=RTOL)
    near = (ref_sim - TAU).abs() < 1e-4
    assert torch.equal(flags[~near], ref_flags[~near])
