"""Test inputs shared by the NVFP4 test modules: every implementation runs the same cases."""

import torch


def _ties_tensor() -> torch.Tensor:
    """Exact ties at 0.25 .. 5 times the block scale, and an outlier fixing gs = 1."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0])
    c = 0.5  # block amax 6c gives block scale exactly c when gs == 1
    block = torch.cat([ties * c, -ties * c]).clone()
    block[7] = 6 * c
    rows = [block, block.flip(0), torch.zeros(16)]
    outlier = torch.zeros(16)
    outlier[3] = 2688.0  # the tensor amax: gs = 2688 / 2688 = 1
    rows.append(outlier)
    return torch.stack(rows).reshape(2, 32)


def _cases(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heavy = torch.distributions.StudentT(1.5).sample((64, 256))
    outlier = torch.randn(64, 256, generator=g) * 0.02
    outlier[17, 99] = 300.0
    subnormal = torch.randn(8, 64, generator=g) * 1e-3
    subnormal[0, 0] = 2688.0  # gs = 1: block scales of the small blocks fall into e4m3 subnormals
    subnormal[1, :16] = 1e-5  # ... and below them, to zero (stored as 0.125)
    zero_blocks = torch.randn(16, 64, generator=g)
    zero_blocks[:, 16:32] = 0
    zero_blocks[3] = 0
    return {
        "random": torch.randn(128, 256, generator=g),
        "heavy_tailed": heavy,
        "outlier": outlier,
        "ties": _ties_tensor(),
        "subnormal_scales": subnormal,
        "zero_blocks": zero_blocks,
        "all_zero": torch.zeros(4, 32),
        "tiny_amax": torch.randn(4, 32, generator=g) * 1e-6,
        "wide_range": torch.randn(32, 128, generator=g) * torch.logspace(-6, 3, 128),
    }


def global_scale_cases() -> dict[str, tuple[torch.Tensor, ...]]:
    """Tensor groups whose joint global scale ``2688 / amax`` every backend computes: the
    shared cases, peers of different shapes, and the amaxes where the formula's edges are
    (zero and float32-subnormal amax fall back to 1.0, Inf gives 0, NaN gives 1.0)."""
    g = torch.Generator().manual_seed(7)
    cases = {name: (x,) for name, x in _cases().items()}
    peers = (torch.randn(48, 32, generator=g), torch.randn(16, 32, generator=g) * 3, torch.randn(16, 32, generator=g))
    strided = torch.randn(6, 80, generator=g)[:, 16:64]
    special = {
        "peers": peers,
        "negative_extreme": (torch.full((2, 16), -0.5).index_put_((torch.tensor([1]), torch.tensor([3])),
                                                                  torch.tensor(-7.25)),),
        "row_stride": (strided,),
        "subnormal_amax": (torch.full((1, 16), 1e-40),),
        "inf": (torch.tensor([[float("inf")] + [1.0] * 15]),),
        "nan": (torch.tensor([[1.0] * 15 + [float("nan")]]), torch.ones(1, 16)),
        "empty_and_peer": (torch.zeros(0, 32), torch.randn(2, 32, generator=g)),
    }
    return {**cases, **special}


def expected_global_scale(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The global scale of ``tensors`` as ``format.global_scale_from_amax`` defines it."""
    from hf_qad.nvfp4.format import global_scale_from_amax

    return global_scale_from_amax(torch.cat([t.float().abs().reshape(-1) for t in tensors]))
