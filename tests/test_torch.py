"""softretrieval.torch: gradients against torch autograd through dense float64
attention, gradcheck, the custom operators' registrations, full_softmax_loss
against a dense cross-entropy."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("softretrieval.torch")

F = torch.nn.functional


def dense_logits(q, k, metric, scale, bias=None, mask=None):
    if metric == "ip":
        z = scale * q @ k.T
    elif metric == "cosine":
        z = scale * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
    else:
        z = -scale * torch.cdist(q, k) ** 2
    if bias is not None:
        z = z + bias
    if mask is not None:
        z = z.masked_fill(mask, -torch.inf)
    return z


def leaves(*shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(s, dtype=dtype, generator=g).requires_grad_() for s in shapes]


def grads_of(loss, xs):
    for x in xs:
        x.grad = None
    loss.backward()
    return [x.grad.clone() for x in xs]


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_attention_matches_torch_autograd(small_tiles, metric):
    """Gradients for queries, keys, values and bias (with out and lse both in
    the loss, exclusions, one row fully excluded) equal torch autograd through
    dense float64 attention; they come back in the inputs' dtype."""
    B, N, d, dv = 7, 45, 5, 3
    q, k, v, b = leaves((B, d), (N, d), (N, dv), (N,))
    w, u = torch.randn(B, dv, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    excl = [np.arange(N)] + [np.array([i, (3 * i) % N]) for i in range(1, B)]
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i, e in enumerate(excl):
        mask[i, e] = True
    out, lse = st.attention(q, k, v, scale=0.8, bias=b, metric=metric, exclude=excl, return_lse=True)
    ours = grads_of((out * w).sum() + (lse[1:] * u[1:]).sum(), (q, k, v, b))
    z = dense_logits(q, k, metric, 0.8, b, mask)
    P = torch.softmax(z[1:], -1)
    ref = grads_of(((P @ v) * w[1:]).sum() + (torch.logsumexp(z[1:], -1) * u[1:]).sum(),
                   (q, k, v, b))
    for a, r in zip(ours, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, r, rtol=2e-4, atol=2e-5)
    assert (out[0] == 0).all() and torch.isneginf(lse[0])


def test_grouped_query_causal_matches_torch(small_tiles):
    """(batch, T, H, d) with grouped-query heads, causal: against torch SDPA
    in float64 (KV heads repeated for torch)."""
    q, k, v = leaves((2, 9, 4, 5), (2, 9, 2, 5), (2, 9, 2, 3))
    out = st.attention(q, k, v, causal=True)
    w = torch.randn(out.shape, dtype=torch.float64)
    ours = grads_of((out * w).sum(), (q, k, v))
    kr, vr = (x.repeat_interleave(2, dim=2) for x in (k, v))
    ref_out = F.scaled_dot_product_attention(q.transpose(1, 2), kr.transpose(1, 2),
                                             vr.transpose(1, 2), is_causal=True).transpose(1, 2)
    ref = grads_of((ref_out * w).sum(), (q, k, v))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=2e-4, atol=2e-5)


def test_gradcheck_float32_tolerances(small_tiles):
    """torch.autograd.gradcheck on float64 inputs: the kernels compute in
    float32, so the finite differences use eps = 1e-3 and tolerances of 5e-3."""
    q, k, v, b = leaves((3, 4), (11, 4), (11, 2), (11,))
    tol = dict(eps=1e-3, atol=5e-3, rtol=5e-3)
    assert torch.autograd.gradcheck(lambda q, k, v, b: st.attention(q, k, v, bias=b, scale=0.5),
                                    (q, k, v, b), **tol)
    assert torch.autograd.gradcheck(lambda q, k: st.logsumexp(q, k, metric="l2", scale=0.3),
                                    (q, k), **tol)
    t = torch.tensor([0, 5, 10])
    assert torch.autograd.gradcheck(lambda q, k, b: st.full_softmax_loss(q, k, t, bias=b,
                                                                         temperature=2.0),
                                    (q, k, b), **tol)


def test_custom_operators_pass_opcheck():
    """Schema, fake (shape-only) implementations and autograd registration of
    every operator, as torch.library.opcheck checks them."""
    q, k, v = (x.detach().float() for x in leaves((4, 3), (9, 3), (9, 2)))
    q.requires_grad_()
    args = (q, k, v, 0.5, None, "ip", None, None, False, -1, None, None)
    torch.library.opcheck(torch.ops.softretrieval.attention.default, args)
    torch.library.opcheck(torch.ops.softretrieval.logsumexp.default,
                          (q, k, 0.5, None, "cosine", None, None, False, -1, None, None))
    torch.library.opcheck(torch.ops.softretrieval.topk_attention.default,
                          (q, k, v, 3, 0.5, None, "ip", None, None, False, -1, None, None))
    torch.library.opcheck(torch.ops.softretrieval.full_softmax_loss.default,
                          (q, k, torch.tensor([0, 3, 8, 1]), 0.5, None, "l2", None, None))


def test_torch_compile_holds_the_operators():
    """A compiled function (aot_eager: no C++ compiler needed) containing the
    operators gives the eager results and gradients."""
    q, k, v = (x.detach().float().requires_grad_() for x in leaves((4, 3), (20, 3), (20, 2)))

    def f(q, k, v):
        return st.attention(q, k, v).sum() + st.logsumexp(q, k).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager = grads_of(f(q, k, v), (q, k, v))
    got = grads_of(compiled(q, k, v), (q, k, v))
    for a, r in zip(got, eager):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_softmax_loss_against_dense_cross_entropy(small_tiles, metric, reduction):
    """Exact cross-entropy over the whole catalog, with a logQ-style bias and
    per-query exclusions (a user's other positives), against
    F.cross_entropy on dense float64 logits; gradients too."""
    B, N, d = 6, 50, 4
    q, k, b = leaves((B, d), (N, d), (N,))
    t = torch.tensor([0, 7, 7, 49, 20, 3])
    excl = [np.array([1, 2]), np.array([], int), np.array([8, 9, 10]), np.array([0]),
            np.array([21]), np.array([], int)]
    loss = st.full_softmax_loss(q, k, t, temperature=0.25, bias=b, exclude=excl, metric=metric,
                                reduction=reduction)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for i, e in enumerate(excl):
        mask[i, e] = True
    ref = F.cross_entropy(dense_logits(q, k, metric, 4.0, b, mask), t, reduction=reduction)
    torch.testing.assert_close(loss.to(torch.float64), ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn(B, dtype=torch.float64) if reduction == "none" else 1.0
    ours = grads_of((loss * weight).sum(), (q, k, b))
    want = grads_of((ref * weight).sum(), (q, k, b))
    for a, r in zip(ours, want):
        torch.testing.assert_close(a, r, rtol=2e-4, atol=2e-5)


def test_float32_tensors_are_read_without_a_copy():
    from softretrieval.torch import _np

    x = torch.randn(5, 3)
    assert np.shares_memory(_np(x), x.numpy())
    assert not np.shares_memory(_np(x.T), x.numpy())      # a transposed view is copied


def test_bad_input():
    q, k = torch.randn(3, 4), torch.randn(10, 4)
    t = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="temperature must be a positive"):
        st.full_softmax_loss(q, k, t, temperature=0.0)
    with pytest.raises(ValueError, match="scale or temperature"):
        st.full_softmax_loss(q, k, t, temperature=1.0, scale=1.0)
    with pytest.raises(ValueError, match="targets must lie in"):
        st.full_softmax_loss(q, k, torch.tensor([1, 2, 10]))
    with pytest.raises(TypeError, match="targets must be an int64"):
        st.full_softmax_loss(q, k, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="targets must have shape"):
        st.full_softmax_loss(q, k, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"targets\[1\] = 2 is excluded"):
        st.full_softmax_loss(q, k, t, exclude=[np.array([0]), np.array([2]), np.array([])])
    with pytest.raises(ValueError, match="reduction"):
        st.full_softmax_loss(q, k, t, reduction="max")
    with pytest.raises(ValueError, match="share d"):
        st.full_softmax_loss(q, torch.randn(10, 5), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        st.full_softmax_loss(q, k, t, bias=torch.zeros(1, 10))
    with pytest.raises(TypeError, match="temperature is not differentiable"):
        st.full_softmax_loss(q, k, t, temperature=torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match="window"):
        st.attention(q[None, :, None], k[None, :, None], causal=True, window=-1)
    with pytest.raises(ValueError, match="-inf bias on a target"):
        bias = torch.zeros(10)
        bias[2] = -torch.inf
        st.full_softmax_loss(q, k, t, bias=bias)


def test_import_softretrieval_does_not_import_torch():
    code = "import sys, softretrieval; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_topk_attention_gradients(small_tiles):
    """Through out and weights (to the selected keys and values), lse (to
    every key) and coverage (both): against torch autograd on the dense
    float64 computation with the same selection."""
    B, N, d, dv, k = 5, 30, 4, 3, 4
    q, kk, v, b = leaves((B, d), (N, d), (N, dv), (N,))
    res = st.topk_attention(q, kk, v, k, scale=0.6, bias=b)
    w, u = torch.randn(B, dv, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    ww, cw = torch.randn(B, k, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    ours = grads_of((res.out * w).sum() + (res.lse * u).sum() + (res.weights * ww).sum()
                    + (res.coverage * cw).sum(), (q, kk, v, b))
    z = dense_logits(q, kk, "ip", 0.6, b)
    zsel = torch.gather(z, 1, res.ids)
    P = torch.softmax(zsel, -1)
    out = torch.einsum("ij,ijc->ic", P, v[res.ids])
    lse = torch.logsumexp(z, -1)
    cov = torch.exp(torch.logsumexp(zsel, -1) - lse)
    ref = grads_of((out * w).sum() + (lse * u).sum() + (P * ww).sum() + (cov * cw).sum(),
                   (q, kk, v, b))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("gate", [None, [0.3, 0.9]])
def test_memory_attention(gate):
    """One memorizing-transformer step in torch: the numpy function's result,
    and the gradients for q, k, v (and the gate) of torch autograd over the
    explicit [memory top-k ; causal local keys] softmax; the memory gets none."""
    import softretrieval as sr

    rng = np.random.default_rng(3)
    T, H, d, dv = 6, 2, 4, 3
    memory = sr.KNNMemory(d, dv, capacity=20, heads=H)
    memory.write(rng.standard_normal((25, H, d)), rng.standard_normal((25, H, dv)))  # wraps
    q, k, v = leaves((T, H, d), (T, H, d), (T, H, dv))
    g = None if gate is None else torch.tensor(gate, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="gate must be"):
        st.memory_attention(q, k, v, memory, topk=4, gate=[0.2, 1.7])
    out, cov = st.memory_attention(q, k, v, memory, topk=4, gate=g)
    ref_out, ref_cov = sr.memory_attention(*(x.detach().numpy() for x in (q, k, v)), memory, topk=4,
                                           gate=gate)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, dtype=torch.float64)
    params = (q, k, v) if g is None else (q, k, v, g)
    ours = grads_of((out * w).sum(), params)
    ids = memory.read(q.detach().numpy(), k=4).ids
    mk, mv = (torch.from_numpy(a).double() for a in memory.snapshot())
    scale = d ** -0.5
    outs = []
    for h in range(H):
        zm = scale * torch.einsum("td,tjd->tj", q[:, h], mk[ids[:, h], h])
        zl = (scale * q[:, h] @ k[:, h].T).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf)
        if g is None:
            P = torch.softmax(torch.cat([zm, zl], 1), -1)
            outs.append(P[:, :4, None].mul(mv[ids[:, h], h]).sum(1) + P[:, 4:] @ v[:, h])
        else:
            mem_out = torch.softmax(zm, -1)[:, :, None].mul(mv[ids[:, h], h]).sum(1)
            outs.append(g[h] * mem_out + (1 - g[h]) * torch.softmax(zl, -1) @ v[:, h])
    ref = grads_of((torch.stack(outs, 1) * w).sum(), params)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.to(r.dtype), r, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gradients_come_back_in_the_inputs_dtype(dtype):
    """Inputs of any float dtype are computed in float32; outputs are float32
    and each gradient has its input's dtype (and matches the float32 one)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in leaves((3, 4), (9, 4), (9, 2)))
    out = st.attention(q, k, v)
    assert out.dtype == torch.float32
    out.sum().backward()
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    st.attention(*ref).sum().backward()
    for x, r in zip((q, k, v), ref):
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.float(), r.grad, rtol=1e-2, atol=1e-2)
