"""torch tensors and DLPack arrays in, results in the caller's kind out
(softretrieval.interop), at every public entry point: the same answers as
numpy inputs, no copy of contiguous float32 inputs, torch never imported
unless a tensor is passed, clear errors for what cannot be read."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import softretrieval as sr
from softretrieval import devices, interop

from reference import attention_ref

torch = pytest.importorskip("torch")


class DLPackOnly:
    """An array known only through DLPack (delegates to a numpy array)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class OnDevice(DLPackOnly):
    """A DLPack array that says it lives on a CUDA device."""

    def __dlpack_device__(self):
        return (2, 0)


KINDS = {"numpy": lambda a: a, "torch": torch.from_numpy, "dlpack": DLPackOnly}

B, N, d, dv, k = 5, 37, 6, 3, 4


def data():
    rng = np.random.default_rng(3)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(Q=f(B, d), K=f(N, d), V=f(N, dv), bias=f(N), gout=f(B, dv), glse=f(B),
                q3=f(7, 2, d), k3=f(7, 1, d), v3=f(7, 1, dv), gout3=f(7, 2, dv),
                mk=f(12, 1, d), mv=f(12, 1, dv), ids=np.arange(100, 100 + N),
                excl=[np.array([i, 2 * i]) for i in range(B)])


def _attention(x, a):
    return sr.attention(x(a["Q"]), x(a["K"]), x(a["V"]), bias=x(a["bias"]), exclude=
                        [x(e) for e in a["excl"]], return_lse=True)


def _attention_backward(x, a):
    out, lse = sr.attention(a["Q"], a["K"], a["V"], bias=a["bias"], return_lse=True)
    return sr.attention_backward(x(a["Q"]), x(a["K"]), x(a["V"]), x(out), x(lse), x(a["gout"]),
                                 x(a["glse"]), bias=x(a["bias"]))


def _logsumexp_backward(x, a):
    lse = sr.logsumexp(a["Q"], a["K"])
    return sr.logsumexp_backward(x(a["Q"]), x(a["K"]), x(lse), x(a["glse"]))


def _topk_attention_backward(x, a):
    res = sr.topk_attention(a["Q"], a["K"], a["V"], k=k)
    return sr.topk_attention_backward(x(a["Q"]), x(a["K"]), x(a["V"]),
                                      sr.TopKAttention(*map(x, res)), x(a["gout"]), x(a["glse"]))


def _memory(x, a):
    mem = sr.KNNMemory(d, dv, 16)
    mem.write(x(a["mk"]), x(a["mv"]))
    return mem


def _memory_attention_backward(x, a):
    return sr.memory_attention_backward(x(a["q3"]), x(a["k3"]), x(a["v3"]), _memory(x, a),
                                        x(a["gout3"]), topk=3, gate=x(np.array([0.3, 0.6])))


def _index(x, a):
    index = sr.Index(d, value_dim=dv)
    index.add(x(a["K"]), x(a["V"]), ids=x(a["ids"]), bias=x(a["bias"]))
    return index


def _removed(x, a):
    index = _index(np.asarray, a)
    assert index.remove(x(a["ids"][:5])) == 5
    return index.search(x(a["Q"]), k)


def _updated(x, a):
    index = _index(np.asarray, a)
    index.update(x(a["ids"][:3]), x(2 * a["K"][:3]), x(a["V"][:3]))
    return index.retrieve(x(a["Q"]), return_lse=True)


#: Every public entry point: (name, call(convert, data) -> result).
ENTRY_POINTS = [
    ("attention", _attention),
    ("logsumexp", lambda x, a: sr.logsumexp(x(a["Q"]), x(a["K"]), bias=x(a["bias"]))),
    ("topk", lambda x, a: sr.topk(x(a["Q"]), x(a["K"]), k, bias=x(a["bias"]))),
    ("topk_attention", lambda x, a: sr.topk_attention(x(a["Q"]), x(a["K"]), x(a["V"]), k=k)),
    ("merge", lambda x, a: sr.merge([x(a["gout"]), x(2 * a["gout"])],
                                    [x(a["glse"]), x(a["glse"][::-1].copy())])),
    ("merge_stacked", lambda x, a: sr.merge(x(a["q3"]), x(a["q3"][..., 0].copy()))),
    ("attention_backward", _attention_backward),
    ("logsumexp_backward", _logsumexp_backward),
    ("topk_attention_backward", _topk_attention_backward),
    ("memory_attention_backward", _memory_attention_backward),
    ("Index.add", lambda x, a: _index(x, a).retrieve_topk(x(a["Q"]), k)),
    ("Index.search", lambda x, a: _index(np.asarray, a).search(
        x(a["Q"]), k, exclude=[x(e + 100) for e in a["excl"]], bias=x(a["bias"]))),
    ("Index.retrieve", lambda x, a: _index(np.asarray, a).retrieve(x(a["Q"]), return_lse=True)),
    ("Index.retrieve_topk", lambda x, a: _index(np.asarray, a).retrieve_topk(x(a["Q"]), k)),
    ("Index.logsumexp", lambda x, a: _index(np.asarray, a).logsumexp(x(a["Q"]))),
    ("Index.remove", _removed),
    ("Index.update", _updated),
    ("Index.search include", lambda x, a: _index(np.asarray, a).search(
        x(a["Q"]), k, include=[x(a["ids"][i:i + 9]) for i in range(B)])),
    ("range_search", lambda x, a: sr.range_search(x(a["Q"]), x(a["K"]), 0.5, bias=x(a["bias"]))),
    ("Index.range_search", lambda x, a: _index(np.asarray, a).range_search(x(a["Q"]), 0.5)),
    ("KNNMemory.write", lambda x, a: sr.KNNMemory(d, dv, 16).write(x(a["mk"]), x(a["mv"]))),
    ("KNNMemory.read", lambda x, a: _memory(np.asarray, a).read(x(a["q3"]), k=3)),
    ("KNNMemory.read_backward", lambda x, a: _memory(np.asarray, a).read_backward(
        x(a["q3"]), x(a["gout3"][:, :, :dv]), k=3, memory_grad=True)),
    ("memory_attention", lambda x, a: sr.memory_attention(x(a["q3"]), x(a["k3"]), x(a["v3"]),
                                                          _memory(x, a), topk=3)),
]
ENTRY_IDS = [name for name, _ in ENTRY_POINTS]


def arrays_of(result):
    """The arrays of a result (an array, a tuple, a named tuple), Nones dropped."""
    if isinstance(result, tuple):
        return [a for r in result for a in arrays_of(r)]
    return [] if result is None else [result]


@pytest.mark.parametrize("kind", ["torch", "dlpack"])
@pytest.mark.parametrize("name, call", ENTRY_POINTS, ids=ENTRY_IDS)
def test_every_entry_point_takes_tensors_and_dlpack(name, call, kind):
    """The same answer as with numpy arrays; torch tensors back for torch
    tensors in (field by field in named tuples), numpy arrays for DLPack."""
    expected = call(KINDS["numpy"], data())
    got = call(KINDS[kind], data())
    if isinstance(expected, tuple):
        assert type(got) is type(expected)
    want, have = arrays_of(expected), arrays_of(got)
    assert len(have) == len(want) > 0
    for w, h in zip(want, have):
        assert isinstance(h, torch.Tensor if kind == "torch" else np.ndarray)
        h = h.numpy() if kind == "torch" else h
        assert h.dtype == w.dtype and h.shape == w.shape
        np.testing.assert_allclose(h, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, call", ENTRY_POINTS, ids=ENTRY_IDS)
def test_contiguous_float32_tensors_are_not_copied(monkeypatch, name, call):
    """Every array that the conversion hands on from a contiguous float32 CPU
    tensor or DLPack array is a view of the caller's memory: same address."""
    seen = []
    for fn in ("_torch_host", "_dlpack_host"):
        real = getattr(interop, fn)
        monkeypatch.setattr(interop, fn, lambda x, n, real=real: seen.append((x, real(x, n)))
                            or seen[-1][1])
    inputs = []

    def keep(kind):
        def convert(a):
            x = KINDS[kind](a)
            inputs.append(x)
            return x
        return convert

    for kind in ("torch", "dlpack"):
        seen.clear()
        inputs.clear()
        call(keep(kind), data())
        assert seen, "nothing went through the conversion"
        for x, arr in seen:
            src = x if kind == "torch" else x._a
            ptr = src.data_ptr() if kind == "torch" else src.__array_interface__["data"][0]
            assert arr.__array_interface__["data"][0] == ptr
        assert {id(x) for x, _ in seen} <= {id(x) for x in inputs}


def test_keys_and_values_reach_the_kernels_in_place(monkeypatch):
    """attention and topk_attention read a torch tensor's and a DLPack
    array's keys and values in place (the queries are scaled: a new array)."""
    target = devices.kernels("cpu")
    seen = []

    class Spy:
        NAME = target.NAME

        def __getattr__(self, attr):
            return getattr(target, attr)

        def run(self, p, mode):
            seen.append(p)
            return target.run(p, mode)

    monkeypatch.setattr(devices, "kernels", lambda device="cpu": Spy())
    a = data()
    for kind in ("torch", "dlpack"):
        for f in (lambda K, V: sr.attention(a["Q"], K, V),
                  lambda K, V: sr.topk_attention(a["Q"], K, V, k=3)):
            seen.clear()
            f(KINDS[kind](a["K"]), KINDS[kind](a["V"]))
            assert np.shares_memory(seen[0].keys.data, a["K"])
            assert np.shares_memory(seen[0].values.data, a["V"])


def test_torch_inputs_match_the_float64_reference(small_tiles):
    """Tensors in, tensors out, equal to the reference (shapes crossing the
    small tiles)."""
    a = data()
    out, lse = sr.attention(*(torch.from_numpy(a[n]) for n in "QKV"), return_lse=True)
    ref_out, ref_lse = attention_ref(a["Q"], a["K"], a["V"])
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=2e-5, atol=2e-5)


def test_mixed_kinds_give_torch_and_other_layouts_dtypes_are_read():
    """One torch argument among numpy ones gives torch results; a transposed
    (non-contiguous) tensor, float16 and float64 tensors and bfloat16
    (converted to float32: numpy has no bfloat16) all give numpy's answer on
    the same values."""
    a = data()
    expected = sr.attention(a["Q"], a["K"], a["V"])
    got = sr.attention(a["Q"], a["K"], torch.from_numpy(a["V"]))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    kt = torch.from_numpy(np.ascontiguousarray(a["K"].T)).T
    assert not kt.is_contiguous()
    np.testing.assert_allclose(sr.attention(a["Q"], kt, a["V"]).numpy(), expected, rtol=1e-6,
                               atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        q = torch.from_numpy(a["Q"]).to(dtype)
        want = sr.attention(q.to(torch.float32).numpy(), a["K"], a["V"])
        np.testing.assert_allclose(sr.attention(q, a["K"], a["V"]).numpy(), want, rtol=1e-6,
                                   atol=1e-6)


def test_tensor_that_requires_grad():
    """Refused while torch records gradients (TypeError naming the argument
    and softretrieval.torch); read detached under torch.no_grad()."""
    a = data()
    q = torch.from_numpy(a["Q"]).requires_grad_()
    with pytest.raises(TypeError, match="queries requires grad.*softretrieval.torch"):
        sr.attention(q, a["K"])
    index = _index(np.asarray, a)
    with pytest.raises(TypeError, match="queries requires grad"):
        index.search(q, 3)
    with torch.no_grad():
        got = index.search(q, 3)
    np.testing.assert_array_equal(got[1].numpy(), index.search(a["Q"], 3)[1])
    with torch.inference_mode():
        out = sr.attention(q, a["K"])
    np.testing.assert_allclose(out.numpy(), sr.attention(a["Q"], a["K"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call, name", [
    (lambda x: sr.attention(x, np.ones((4, 3), np.float32)), "queries"),
    (lambda x: sr.attention(np.ones((2, 3), np.float32), x), "keys"),
    (lambda x: sr.merge(x, np.zeros((2, 3), np.float32)), "outs"),
    (lambda x: _index(np.asarray, data()).search(x, 2), "queries"),
    (lambda x: sr.KNNMemory(3, 2, 4).write(x, np.ones((2, 2), np.float32)), "keys"),
], ids=["attention", "attention_keys", "merge", "Index.search", "KNNMemory.write"])
@pytest.mark.parametrize("bad, match", [
    (OnDevice(np.ones((2, 3), np.float32)), "is a DLPack array on a CUDA device"),
    (object(), "must be an array"),
    (torch.ones(2, 3, device="meta"), "is a torch tensor on meta"),
    (torch.ones(2, 3).to_sparse(), "must be a dense tensor"),
    (torch.ones(2, 3).to(torch.float8_e4m3fn), "could not be read as a numpy array"),
], ids=["dlpack_on_cuda", "neither", "meta_tensor", "sparse_tensor", "float8_tensor"])
def test_bad_inputs_are_refused_by_name(call, name, bad, match):
    """A DLPack array on another device, an object that is no array, a torch
    tensor on another device, sparse, or of a dtype numpy lacks: TypeError
    naming the argument."""
    with pytest.raises(TypeError, match=f"^{name} {match}"):
        call(bad)


def test_index_bias_setter_takes_a_tensor():
    a = data()
    index, other = _index(np.asarray, a), _index(np.asarray, a)
    index.bias = torch.from_numpy(-a["bias"])
    other.bias = -a["bias"]
    np.testing.assert_array_equal(index.bias, other.bias)


def _python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_torch_is_never_imported_without_a_tensor():
    """With torch blocked (``sys.modules['torch'] = None``: any import of it
    fails), numpy arrays and DLPack arrays go through every kind of entry
    point; without blocking, torch is not in sys.modules afterwards."""
    code = """
        import sys
        BLOCK
        import numpy as np
        import softretrieval as sr

        class DLPackOnly:
            def __init__(self, a): self._a = a
            def __dlpack__(self, **kw): return self._a.__dlpack__(**kw)
            def __dlpack_device__(self): return self._a.__dlpack_device__()

        assert "torch" not in sys.modules or sys.modules["torch"] is None
        rng = np.random.default_rng(0)
        Q, K, V = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (20, 4), (20, 2)))
        out, lse = sr.attention(Q, DLPackOnly(K), V, return_lse=True)
        sr.attention_backward(Q, K, V, out, lse, np.ones_like(out))
        sr.topk_attention(DLPackOnly(Q), K, V, k=2)
        index = sr.Index(4)
        index.add(DLPackOnly(K))
        index.search(Q, 2)
        mem = sr.KNNMemory(4, 2, 8)
        mem.write(K[:5], V[:5])
        mem.read(Q, k=2)
        sr.memory_attention(Q[:, None], K[:3, None], V[:3, None], mem, topk=2)
        assert sys.modules.get("torch") is None
        print("ok")
    """
    for block in ("sys.modules['torch'] = None", ""):
        res = _python(code.replace("BLOCK", block))
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_a_scalar_tensor_k_counts_as_its_integer():
    a = data()
    got = sr.topk(torch.from_numpy(a["Q"]), torch.from_numpy(a["K"]), torch.tensor(3))
    np.testing.assert_array_equal(got[1].numpy(), sr.topk(a["Q"], a["K"], 3)[1])
    with pytest.raises(TypeError, match="k must be an integer"):
        sr.topk(a["Q"], a["K"], torch.tensor(3.0))
