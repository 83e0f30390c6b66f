"""Embedding kernels (Triton; the interpreter on the CPU): index-equality ghost norm / dot and the clipped
index-add, against the references and explicit per-sample gradients."""
import pytest
import torch

from fastdp.kernels.embedding_norm import (
    embedding_accumulate,
    embedding_accumulate_ref,
    embedding_dot,
    embedding_dot_ref,
    embedding_linear_dot,
    embedding_linear_dot_ref,
    embedding_norm,
)

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 37, 11, 5), (1, 1, 4, 7), (2, 64, 70, 3), (4, 9, 2, 33)]  # B, T, V (small: repeated ids), d


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")


def explicit(idx, dy, V):
    """[B, V, d] per-sample embedding gradients (fp64)."""
    B, T, d = dy.shape
    g = torch.zeros(B, V, d, dtype=torch.float64)
    g.index_put_((torch.arange(B).repeat_interleave(T), idx.reshape(-1).cpu()), dy.double().cpu().reshape(-1, d),
                 accumulate=True)
    return g


@pytest.mark.parametrize("B,T,V,d", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_embedding_norm_and_dot(B, T, V, d, dtype, tol):
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    dy = torch.randn(B, T, d, device=DEVICE).to(dtype)
    g = explicit(idx, dy, V)
    got = embedding_norm(idx, dy)
    assert got.dtype == torch.float32
    assert ((got.double().cpu() - g.pow(2).sum((1, 2))).abs() / g.pow(2).sum((1, 2))).max() < tol
    idx_b = torch.randint(0, V, (B, T + 3), device=DEVICE)  # a second use with its own length
    dy_b = torch.randn(B, T + 3, d, device=DEVICE).to(dtype)
    ref = (g * explicit(idx_b, dy_b, V)).sum((1, 2))
    got = embedding_dot(idx, dy, idx_b, dy_b).double().cpu()
    scale = explicit(idx_b, dy_b, V).pow(2).sum((1, 2)).sqrt() * g.pow(2).sum((1, 2)).sqrt()
    assert ((got - ref).abs() / scale).max() < tol
    assert torch.allclose(embedding_dot(idx, dy, idx_b, dy_b), embedding_dot_ref(idx, dy, idx_b, dy_b),
                          rtol=tol, atol=tol * scale.max().item())


@pytest.mark.parametrize("B,T,V,d", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_embedding_accumulate(B, T, V, d, dtype, tol):
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    dy = torch.randn(B, T, d, device=DEVICE).to(dtype)
    c = torch.rand(B, device=DEVICE) + 0.1
    ref = torch.einsum("b,bvd->vd", c.double().cpu(), explicit(idx, dy, V))
    got = embedding_accumulate(idx, dy, c, V)
    assert got.dtype == torch.float32 and got.shape == (V, d)
    assert (got.double().cpu() - ref).abs().max() <= tol * ref.abs().max()
    start = torch.randn(V, d, device=DEVICE)
    out = start.clone()
    assert embedding_accumulate(idx, dy, c, V, out) is out
    assert ((out - start).double().cpu() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.allclose(got, embedding_accumulate_ref(idx, dy, c, V), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("B,T,V,d", SHAPES)
@pytest.mark.parametrize("Tl", [1, 5, 40])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_embedding_linear_dot(B, T, V, d, Tl, dtype, tol):
    """Tied table used as embedding (T tokens) and as Linear weight (Tl head positions): the cross term against the
    explicit per-sample gradients of both uses, and the kernel against the reference (same rounded inputs)."""
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    dy_emb = torch.randn(B, T, d, device=DEVICE).to(dtype)
    x_lin = torch.randn(B, Tl, d, device=DEVICE).to(dtype)
    dy_lin = torch.randn(B, Tl, V, device=DEVICE).to(dtype)
    g_emb = explicit(idx, dy_emb, V)
    g_lin = torch.einsum("btv,btd->bvd", dy_lin.double(), x_lin.double()).cpu()
    truth = (g_emb * g_lin).sum((1, 2))
    got = embedding_linear_dot(idx, dy_emb, x_lin, dy_lin)
    ref = embedding_linear_dot_ref(idx, dy_emb, x_lin, dy_lin)
    assert got.dtype == torch.float32 and got.shape == (B,)
    scale = truth.abs().max().item() + 1e-6
    assert (got.double().cpu() - ref.double().cpu()).abs().max().item() <= 1e-5 * scale  # same rounded inputs
    assert (got.double().cpu() - truth).abs().max().item() <= tol * scale


def test_empty_batch():
    idx, dy = torch.zeros(0, 5, dtype=torch.long, device=DEVICE), torch.zeros(0, 5, 3, device=DEVICE)
    assert embedding_norm(idx, dy).shape == (0,)
    assert (embedding_accumulate(idx, dy, torch.zeros(0, device=DEVICE), 7) == 0).all()


# -- edge cases: index range, scale / out / d shapes, bf16 out, the tied cross term on the accumulated values ----------

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_index_out_of_range_raises_and_writes_nothing(backend, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    buf = torch.zeros(6, 4, device=DEVICE)
    dy, c = torch.ones(1, 2, 4, device=DEVICE), torch.ones(1, device=DEVICE)
    for lo, idx in ((0, [[0, 3]]), (3, [[-1, 0]]), (0, [[0, 9]])):
        with pytest.raises(IndexError):
            embedding_accumulate(torch.tensor(idx, device=DEVICE), dy, c, 3, buf[lo:lo + 3])
        assert (buf == 0).all()
    with pytest.raises(IndexError):
        embedding_accumulate(torch.tensor([[0, 3]], device=DEVICE), dy, c, 3)


def test_kernels_mask_indices_outside_the_table(monkeypatch):
    """The in-kernel guards (what CUDA relies on: its indices are not read on the host): an index outside [0, V)
    adds nothing anywhere and reads nothing past dy_lin; the other indices' terms are unchanged."""
    import fastdp.kernels.embedding_norm as en
    monkeypatch.setattr(en, "_check_index_range", lambda *a: None)
    V, d = 3, 4
    buf = torch.zeros(3 * V, d, device=DEVICE)
    out = buf[V:2 * V]
    idx = torch.tensor([[0, V, -1, 2], [V + 1, 1, 1, -V]], device=DEVICE)
    dy, c = torch.randn(2, 4, d, device=DEVICE), torch.rand(2, device=DEVICE) + 0.5
    embedding_accumulate(idx, dy, c, V, out)
    keep = (idx >= 0) & (idx < V)
    want = embedding_accumulate_ref(torch.where(keep, idx, 0), dy * keep[..., None], c, V)
    assert (buf[:V] == 0).all() and (buf[2 * V:] == 0).all()
    assert torch.allclose(out, want, atol=1e-6)
    store = torch.full((2 * 5 * (V + 8),), 1e6, device=DEVICE)  # dy_lin rows of V inside a buffer of huge values
    dy_lin = store.as_strided((2, 5, V), (5 * (V + 8), V + 8, 1))
    dy_lin.copy_(torch.randn(2, 5, V))
    x_lin = torch.randn(2, 5, d, device=DEVICE)
    got = embedding_linear_dot(idx, dy, x_lin, dy_lin)
    want = embedding_linear_dot_ref(torch.where(keep, idx, 0), dy * keep[..., None], x_lin, dy_lin.contiguous())
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_raise_like_the_reference(backend, monkeypatch):
    """scale must be [B] in both (no broadcast of a length-1 scale, no read past a short one), out [V, d], the uses'
    d and B must agree, and embedding_linear_dot's indices must lie in [0, V)."""
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    B, T, V, d = 3, 4, 5, 2
    idx, dy = torch.randint(0, V, (B, T), device=DEVICE), torch.randn(B, T, d, device=DEVICE)
    for scale in (torch.ones(1), torch.ones(B - 1), torch.ones(B + 1), torch.ones(B, 1)):
        with pytest.raises(ValueError):
            embedding_accumulate(idx, dy, scale.to(DEVICE), V)
    for out in (torch.zeros(V, d + 1), torch.zeros(V - 1, d), torch.zeros(d, V)):
        with pytest.raises(ValueError):
            embedding_accumulate(idx, dy, torch.ones(B, device=DEVICE), V, out.to(DEVICE))
    with pytest.raises(ValueError):
        embedding_accumulate(idx, dy[:, :T - 1], torch.ones(B, device=DEVICE), V)
    for idx_b, dy_b in ((idx, torch.randn(B, T, d + 1)), (idx[:2], dy[:2]), (idx, torch.randn(B, T + 1, d))):
        with pytest.raises(ValueError):
            embedding_dot(idx, dy, idx_b.to(DEVICE), dy_b.to(DEVICE))
    x_lin, dy_lin = torch.randn(B, 6, d, device=DEVICE), torch.randn(B, 6, V, device=DEVICE)
    with pytest.raises(IndexError):
        embedding_linear_dot(torch.full((B, T), V, device=DEVICE), dy, x_lin, dy_lin)
    with pytest.raises(IndexError):
        embedding_linear_dot(torch.full((B, T), -1, device=DEVICE), dy, x_lin, dy_lin)
    for xl, dl in ((torch.randn(B, 6, d + 1), dy_lin), (x_lin, torch.randn(B, 5, V)), (x_lin[:2], dy_lin[:2])):
        with pytest.raises(ValueError):
            embedding_linear_dot(idx, dy, xl.to(DEVICE), dl.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulate_low_precision_out_runs_the_kernel(dtype, monkeypatch):
    """FASTDP_BACKEND=triton with a bf16 / fp16 out: the kernel accumulates in fp32 and adds (no silent fallback)."""
    import fastdp.kernels.embedding_norm as en

    def no_ref(*a, **k):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(en, "embedding_accumulate_ref", no_ref)
    idx = torch.randint(0, 7, (2, 9), device=DEVICE)
    dy, c = torch.randn(2, 9, 3, device=DEVICE), torch.rand(2, device=DEVICE) + 0.1
    start = torch.randn(7, 3, device=DEVICE).to(dtype)
    out = start.clone()
    assert embedding_accumulate(idx, dy, c, 7, out) is out and out.dtype == dtype
    want = start.double().cpu() + torch.einsum("b,bvd->vd", c.double().cpu(), explicit(idx, dy, 7))
    assert (out.double().cpu() - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_cross_term_is_that_of_the_accumulated_values(backend, monkeypatch):
    """bf16 head (x_lin, dy_lin) and an fp32 embedding output gradient E: the cross term is that of the fp32 E (which
    the clipped sum adds), not of E rounded to bf16. E = h (1 + 2^-10) with h = bf16(E) makes the rounding one-sided,
    so the old cross term was short by ~1e-3 relative and c * ||g|| exceeded R. Now the measured norm equals the fp64
    norm of exactly the accumulated values to fp32 rounding, and c * ||g|| <= R."""
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    torch.manual_seed(3)
    B, T, V, d, R = 2, 6, 5, 8, 1.0
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    h = torch.randn(B, T, d, device=DEVICE).bfloat16()
    E = h.float() * (1 + 2 ** -10)
    assert torch.equal(E.bfloat16(), h)
    dy_lin = torch.nn.functional.one_hot(idx, V).to(torch.bfloat16)  # [B, Tl = T, V]: head gradient at the tokens
    g_emb = explicit(idx, E, V)  # fp64 of the values the clipped sums add
    g_lin = torch.einsum("bsv,bsd->bvd", dy_lin.double(), h.double()).cpu()
    cross = embedding_linear_dot(idx, E, h, dy_lin).double().cpu()
    truth = (g_emb * g_lin).sum((1, 2))
    assert ((cross - truth).abs() / truth.abs()).max() < 1e-5
    sq = embedding_norm(idx, E).double().cpu() + g_lin.pow(2).sum((1, 2)) + 2 * cross
    true_norm = (g_emb + g_lin).pow(2).sum((1, 2)).sqrt()
    assert ((sq.sqrt() - true_norm).abs() / true_norm).max() < 1e-5
    c = (R / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    assert (c * true_norm <= R * (1 + 1e-6)).all()


def test_linear_dot_head_positions_past_2_31():
    """dy_lin with a head-position stride of 2^30 + 64: position 2 lies past 2^31 elements (64-bit offsets)."""
    BIG, B, Te, Tl, V, d = 2 ** 30 + 64, 1, 4, 3, 6, 5
    try:
        store = torch.empty(2 * BIG + V, device=DEVICE)
    except (RuntimeError, MemoryError) as err:
        pytest.skip(f"cannot allocate: {err}")
    dy_lin = store.as_strided((B, Tl, V), (Tl * BIG, BIG, 1))
    for s in range(Tl):
        dy_lin[0, s] = torch.randn(V, device=DEVICE)
    idx, dy_emb = torch.randint(0, V, (B, Te), device=DEVICE), torch.randn(B, Te, d, device=DEVICE)
    x_lin = torch.randn(B, Tl, d, device=DEVICE)
    want = embedding_linear_dot_ref(idx, dy_emb, x_lin, dy_lin.contiguous())
    assert torch.allclose(embedding_linear_dot(idx, dy_emb, x_lin, dy_lin), want, rtol=1e-5, atol=1e-5)
