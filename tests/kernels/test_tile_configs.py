"""Every candidate tile of every autotuned kernel (``fastdp/kernels/_tuning.py``) against the reference.

The autotuner picks a tile by speed alone, so each candidate must compute the same result: here each is forced in
turn on shapes that are not multiples of any tile, with several tiles along every tiled dim at the 32-wide default
and a partial second tile at 128 (through the interpreter in CI; compiled on a GPU by benchmarks/device_check.sh).
"""
import pytest
import torch

pytest.importorskip("triton")

from fastdp.kernels import _tuning  # noqa: E402
from fastdp.kernels.clip_accumulate import clip_accumulate, clip_accumulate_ref  # noqa: E402
from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate, conv_clip_accumulate_ref  # noqa: E402
from fastdp.kernels.conv_norm import conv_norm, conv_norm_ref  # noqa: E402
from fastdp.kernels.direct_norm import direct_norm, direct_norm_ref  # noqa: E402
from fastdp.kernels.embedding_norm import (  # noqa: E402
    embedding_dot,
    embedding_dot_ref,
    embedding_linear_dot,
    embedding_linear_dot_ref,
)
from fastdp.kernels.ghost_norm import ghost_dot, ghost_dot_ref  # noqa: E402
from fastdp.kernels.masked_direct_norm import masked_direct_norm, masked_direct_norm_ref  # noqa: E402
from fastdp.kernels.row_abs_sum import row_abs_sum, row_abs_sum_ref  # noqa: E402

pytestmark = pytest.mark.interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, T, D, P = 2, 133, 37, 130  # T and P span two 128-tiles; D and P five 32-tiles


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def conv_args(dtype):
    x, dy = rand(B, 5, 13, 11, dtype=dtype), rand(B, 130, 13, 11, dtype=dtype)  # L = 143, K = 45, 130 filters
    return x, dy, (130, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1


def case_ghost_dot(dtype):
    x, dy, x2, dy2 = rand(B, T, D, dtype=dtype), rand(B, T, P, dtype=dtype), rand(B, 40, D, dtype=dtype), \
        rand(B, 40, P, dtype=dtype)
    return [(ghost_dot(x, dy, x, dy), ghost_dot_ref(x, dy, x, dy)),  # symmetric: the upper triangle of tiles
            (ghost_dot(x, dy, x2, dy2), ghost_dot_ref(x, dy, x2, dy2))]


def case_direct_norm(dtype):
    x, dy = rand(B, 40, D, dtype=dtype), rand(B, 40, P, dtype=dtype)
    return [(direct_norm(x, dy), direct_norm_ref(x, dy))]


def case_masked_direct_norm(dtype):
    x, dy = rand(B, 40, D, dtype=dtype), rand(B, 40, P, dtype=dtype)
    mask = torch.rand(P, D, device=DEV) < 0.5
    center, scale = rand(P, D), torch.rand(P, D, device=DEV) + 0.5
    return [(masked_direct_norm(x, dy, mask), masked_direct_norm_ref(x, dy, mask)),
            (masked_direct_norm(x, dy, mask, center, scale), masked_direct_norm_ref(x, dy, mask, center, scale))]


def case_row_abs_sum(dtype):
    x, dy, c = rand(B, 40, D, dtype=dtype), rand(B, 40, P, dtype=dtype), torch.rand(B, device=DEV)
    return [(row_abs_sum(x, dy, c), row_abs_sum_ref(x, dy, c))]


def case_clip_accumulate(dtype):
    x, dy, c = rand(3, 20, D, dtype=dtype), rand(3, 20, P, dtype=dtype), torch.rand(3, device=DEV)
    out = rand(P, D)  # accumulated into: a tile must add to what is there, once
    return [(clip_accumulate(x, dy, c, out.clone()), clip_accumulate_ref(x.cpu(), dy.cpu(), c.cpu(), out.cpu().clone()))]


def case_conv_direct_norm(dtype):
    args = conv_args(dtype)
    # (the "unfold" reference: fp32 products; the grouped convolution rounds 16-bit per-sample gradients)
    return [(conv_norm(*args, ghost=False), conv_norm_ref(*args, ghost=False, direct_impl="unfold"))]


def case_conv_ghost_norm(dtype):
    args = conv_args(dtype)
    return [(conv_norm(*args, ghost=True), conv_norm_ref(*args, ghost=True))]


def case_conv_clip_accumulate(dtype):
    x, dy, *geometry = conv_args(dtype)
    c, out = torch.rand(B, device=DEV), rand(*geometry[0])
    ref = conv_clip_accumulate_ref(x.cpu(), dy.cpu(), c.cpu(), *geometry, out.cpu().clone())
    return [(conv_clip_accumulate(x, dy, c, *geometry, out.clone()), ref)]


def case_embedding_dot(dtype):
    idx, idx2 = torch.randint(0, 50, (B, T), device=DEV), torch.randint(0, 50, (B, 40), device=DEV)
    dy, dy2 = rand(B, T, D, dtype=dtype), rand(B, 40, D, dtype=dtype)
    return [(embedding_dot(idx, dy, idx, dy), embedding_dot_ref(idx, dy, idx, dy)),
            (embedding_dot(idx, dy, idx2, dy2), embedding_dot_ref(idx, dy, idx2, dy2))]


def case_embedding_linear_dot(dtype):
    idx, dy_emb = torch.randint(0, 50, (B, T), device=DEV), rand(B, T, D, dtype=dtype)
    x_lin, dy_lin = rand(B, 40, D, dtype=dtype), rand(B, 40, 50, dtype=dtype)
    return [(embedding_linear_dot(idx, dy_emb, x_lin, dy_lin), embedding_linear_dot_ref(idx, dy_emb, x_lin, dy_lin))]


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}
TILES = [(name, tile) for name, tiles in sorted(_tuning.REGISTRY.items()) for tile in tiles.candidates]


def test_every_autotuned_kernel_has_a_case():
    assert set(CASES) == set(_tuning.REGISTRY), "add a case for each Tiles registered in the kernels"


@pytest.mark.parametrize("name,tile", TILES, ids=[f"{n}-{t}" for n, t in TILES])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)], ids=["fp32", "bf16"])
def test_every_candidate_tile_matches_the_reference(name, tile, dtype, tol, monkeypatch):
    """Same 16-bit operands on both sides: products are exact in fp32, so bf16 gets the fp32 tolerance."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    if dtype == torch.bfloat16 and DEV == "cuda" and name == "clip_accumulate":
        pytest.skip("the CUDA reference rounds the scaled bf16 operand (see clip_accumulate_ref)")
    with _tuning.force(_tuning.REGISTRY[name], tile):
        pairs = CASES[name](dtype)
    for got, ref in pairs:
        got, ref = got.double().cpu(), ref.double().cpu()
        assert ((got - ref).abs().max() / ref.abs().max()).item() < tol, (name, str(tile))


def test_force_restores_the_previous_tile():
    tiles = _tuning.REGISTRY["direct_norm"]
    with _tuning.force(tiles, tiles.candidates[-1]):
        assert tiles.forced == tiles.candidates[-1]
    assert tiles.forced is None


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv("FASTDP_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="FASTDP_AUTOTUNE"):
        _tuning.autotune_enabled()
    monkeypatch.setenv("FASTDP_AUTOTUNE", "0")
    assert not _tuning.autotune_enabled()


def test_a_default_tile_must_be_a_candidate():
    tiles = _tuning.REGISTRY["direct_norm"]
    with pytest.raises(ValueError, match="default tile"):
        _tuning.Tiles("bad", tiles.fn, ("T",), _tuning.Tile.of(BM=16, BN=16, BT=16), tiles.candidates)
    assert "bad" not in _tuning.REGISTRY


@pytest.mark.parametrize("name", sorted(_tuning.REGISTRY))
def test_autotuner_names_are_kernel_arguments(name):
    """Triton drops unknown key names silently at run time (the kernel would never re-tune); its constructor checks
    them, so build every kernel's autotuner."""
    tiles = _tuning.REGISTRY[name]
    saved, tiles._tuned = tiles._tuned, None
    try:
        tuner = tiles.tuned()
        assert len(tuner.configs) == len(tiles.candidates)
        for tile in tiles.candidates:
            assert set(tile.meta) <= set(tuner.arg_names), (name, str(tile))
    finally:
        tiles._tuned = saved


@pytest.fixture
def fake_timer(monkeypatch):
    """clip_accumulate's Tiles autotuned (through the interpreter on the CPU) with a timer that runs each launch
    twice and makes ``fastest`` the fastest; ``timed`` counts the candidates timed. Restores the Tiles after."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    monkeypatch.setattr(_tuning, "autotune_enabled", lambda: True)
    tiles = _tuning.REGISTRY["clip_accumulate"]
    state = {"tiles": tiles, "fastest": tiles.candidates[2], "timed": 0}

    def fake_bench(call, quantiles):
        call()
        call()  # timed runs repeat the launch on the same arguments
        tile = tiles.candidates[state["timed"] % len(tiles.candidates)]  # timed in the candidates' order
        state["timed"] += 1
        return [1.0 if tile == state["fastest"] else 2.0] * len(quantiles)

    saved = tiles._tuned, tiles.do_bench, tiles._picked
    tiles._tuned, tiles.do_bench, tiles._picked = None, fake_bench, {}
    yield state
    tiles._tuned, tiles.do_bench, tiles._picked = saved


def test_autotuned_launch_leaves_accumulated_buffers_as_one_launch_would(fake_timer):
    """The autotuner runs each candidate several times on the real arguments: a kernel that adds into ``out`` must
    still add exactly once (``restore``), and the launches use the fastest tile."""
    tiles, fastest = fake_timer["tiles"], fake_timer["fastest"]
    x, dy, c = torch.randn(3, 20, D, device=DEV), torch.randn(3, 20, P, device=DEV), torch.rand(3, device=DEV)
    out = torch.randn(P, D, device=DEV)
    for _ in range(2):  # the tuning launch, then a launch with the remembered pick
        got = clip_accumulate(x, dy, c, out.clone())
        ref = clip_accumulate_ref(x, dy, c, out.clone())
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert fake_timer["timed"] == len(tiles.candidates)  # tuned once
    (picked,) = tiles.tuned().cache.values()
    assert picked.kwargs == fastest.meta and picked.num_warps == fastest.num_warps
    assert list(tiles.chosen().values()) == [str(fastest)]
    assert _tuning.chosen_tiles()["clip_accumulate"] == tiles.chosen()


def test_sequence_lengths_share_a_pick_per_power_of_two(fake_timer):
    """Dynamic padding: T = 20, 24, 31 tune once (bucket 32), T = 40 once more (bucket 64); B never re-tunes."""
    tiles = fake_timer["tiles"]
    for B, T in ((3, 20), (5, 24), (2, 31), (3, 40), (4, 33)):
        x, dy, c = torch.randn(B, T, D, device=DEV), torch.randn(B, T, P, device=DEV), torch.rand(B, device=DEV)
        got = clip_accumulate(x, dy, c)
        assert ((got - clip_accumulate_ref(x, dy, c)).abs().max()).item() < 1e-4
    assert fake_timer["timed"] == 2 * len(tiles.candidates)
    assert sorted(k.split(",")[0] for k in tiles.chosen()) == ["32", "64"]  # T's bucket leads the key
