"""The bfloat16 filter of exact top-k searches, for CPUs with AVX512_BF16.

A top-k search needs every score only to decide which keys can enter the
buffer; almost none can. With AVX512_BF16 (AMD Zen 4 and later, Intel Cooper
Lake, Sapphire Rapids and later) the instruction ``vdpbf16ps`` multiplies
pairs of bfloat16 numbers and accumulates in float32 at twice the rate of
float32 FMAs. So a query block is scored against a key tile in bfloat16
(:func:`tile_dots`), each approximate logit comes with a certified bound on
its error (:func:`slack`), and only the keys whose approximate logit comes
within that bound of the buffer's threshold are scored again in float32 and
offered (:func:`softretrieval.rules.topk_rescore_scan_row`). Every other key
is certainly below the threshold, so the buffer ends as an exact float32
scan leaves it: same ids, same float32 scores (up to the order of a float32
dot product's additions).

The error bound (``q``, ``k`` the float32 query and key; ``u = 2^-8``, the
unit roundoff of bfloat16, whose significand has 8 bits): rounding each
element to bfloat16 changes it by at most ``u`` relative; the products of
two bfloat16 numbers are exact in float32; ``vdpbf16ps`` adds them in
float32 (at most ``d + 2`` roundings of ``2^-24``), and the float32 rescoring
adds with at most ``d`` roundings. So the filter's dot and the exact float32
dot differ by at most ``c * sum |q_c k_c| <= c * |q| |k|`` (Cauchy-Schwarz),
``c = 2u + u^2 + 4 gamma(d + 2)`` with ``gamma(n) = n 2^-24 / (1 - n 2^-24)``,
plus an absolute term for the subnormal numbers the instruction flushes to
zero. The logit's factor and offset (:func:`softretrieval.rules.logit`) scale
this and add float32 roundings of the logit itself
(:data:`softretrieval.rules.FILTER_REL`). A tile whose norms could overflow
bfloat16 (above ``2^100``) is scored in float32 instead.

The micro-kernel is LLVM IR written here (:func:`_micro`), so the cached
kernels are compiled for this CPU only (Numba keys its cache by CPU). On a
CPU without AVX512_BF16 it compiles to a trap and is never called:
:func:`available` is false there, and the drivers take the float32 path.
"""

import functools
import math

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config as numba_config
from numba import njit
from numba import types as nbtypes
from numba.core.extending import intrinsic

from .core import float32_bits

#: Query rows by key columns of the micro-kernel's register tile: 12 rows
#: times 2 x 16 keys make 24 accumulators of the 32 zmm registers. Compiled
#: into the kernel (not a run-time tunable).
ROWS = 12
KEYS = 32
_LANES = 16

_U = 2.0**-8
_EPS = 2.0**-24
_TINY = 2.0**-120
#: Products of query and key norms at or above this could overflow a
#: bfloat16 dot: such tiles take the float32 path.
NORM_LIMIT = 2.0**100


@functools.cache
def available():
    """Whether the filter can run: the CPU has AVX512_BF16 and Numba compiles
    for this CPU (not for a generic one set through ``NUMBA_CPU_NAME``)."""
    if numba_config.CPU_NAME not in (None, "host") or numba_config.CPU_FEATURES:
        return False
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512bf16")) and bool(features.get("avx512f"))


@njit(cache=True)
def coefficient(d):
    """``c`` of the module's error bound for dot products of length ``d``."""
    n = d + 2
    gamma = n * _EPS / (1 - n * _EPS)
    return 2 * _U + _U * _U + 4 * gamma


class _BFloat16(ir.Type):
    """LLVM's ``bfloat`` type, which llvmlite's IR builder does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat16)

    def __hash__(self):
        return hash("bfloat")


class _LoopID(ir.values.MDValue):
    """A self-referencing ``distinct`` metadata node, the identity LLVM
    requires of a loop's ``llvm.loop`` properties (llvmlite has no such
    node)."""

    def __init__(self, module, properties):
        super().__init__(module, (), name=str(len(module.metadata)))
        self.operands = (self, *properties)

    def descr(self, buf):
        refs = ", ".join(op.get_reference() for op in self.operands)
        buf += (f"distinct !{{ {refs} }}", "\n")

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)


def _build_micro(module):
    """Define (once per LLVM module) the micro-kernel ``void (qp, kp, out, d2,
    ldq, ldo)``: ``out[r, c] = sum_p dot(qp[r, p], kp[c // 16, p, c % 16])``
    for r < ROWS, c < KEYS, where each uint32 holds two bfloat16 (the even
    feature in the low half); ``qp`` rows are ``ldq`` apart, the two key
    blocks ``16 d2`` apart, ``out`` rows ``ldo`` apart (float32)."""
    name = f"softretrieval_bf16_micro_{ROWS}x{KEYS}"
    if name in module.globals:
        return module.globals[name]
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    v16f = ir.VectorType(f32, _LANES)
    v16i = ir.VectorType(i32, _LANES)
    v32b = ir.VectorType(_BFloat16(), 2 * _LANES)
    pi, pf = ir.PointerType(i32), ir.PointerType(f32)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [pi, pi, pf, i64, i64, i64]), name=name)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    qp, kp, out, d2, ldq, ldo = fn.args
    entry = fn.append_basic_block("entry")
    b = ir.IRBuilder(entry)
    if not available():
        trap = ir.Function(module, ir.FunctionType(ir.VoidType(), []), name="llvm.trap") \
            if "llvm.trap" not in module.globals else module.globals["llvm.trap"]
        b.call(trap, [])
        b.ret_void()
        return fn
    intr = "llvm.x86.avx512bf16.dpbf16ps.512"
    dp = module.globals.get(intr) or ir.Function(module, ir.FunctionType(v16f, [v16f, v32b, v32b]),
                                                 name=intr)
    loop = fn.append_basic_block("loop")
    done = fn.append_basic_block("done")
    nb = KEYS // _LANES
    zero = ir.Constant(v16f, [0.0] * _LANES)
    b.branch(loop)
    b.position_at_end(loop)
    p = b.phi(i64)
    p.add_incoming(ir.Constant(i64, 0), entry)
    acc = [[b.phi(v16f) for _ in range(nb)] for _ in range(ROWS)]
    for row in acc:
        for a in row:
            a.add_incoming(zero, entry)
    keys = []
    for c in range(nb):
        at = b.add(b.mul(ir.Constant(i64, c * _LANES), d2), b.mul(p, ir.Constant(i64, _LANES)))
        keys.append(b.bitcast(b.load(b.bitcast(b.gep(kp, [at]), ir.PointerType(v16i)), align=4), v32b))
    new = []
    for r in range(ROWS):
        pair = b.load(b.gep(qp, [b.add(b.mul(ir.Constant(i64, r), ldq), p)]))
        splat = b.insert_element(ir.Constant(v16i, ir.Undefined), pair, ir.Constant(i32, 0))
        splat = b.shuffle_vector(splat, ir.Constant(v16i, ir.Undefined), ir.Constant(v16i, [0] * _LANES))
        q = b.bitcast(splat, v32b)
        new.append([b.call(dp, [acc[r][c], keys[c], q]) for c in range(nb)])
    p1 = b.add(p, ir.Constant(i64, 1))
    p.add_incoming(p1, loop)
    for r in range(ROWS):
        for c in range(nb):
            acc[r][c].add_incoming(new[r][c], loop)
    back = b.cbranch(b.icmp_signed("<", p1, d2), loop, done)
    # Kept rolled: unrolled inside a large caller, the loop spilled its
    # accumulators and ran 25% slower.
    back.set_metadata("llvm.loop", _LoopID(module, [module.add_metadata(
        [ir.MetaDataString(module, "llvm.loop.unroll.disable")])]))
    b.position_at_end(done)
    for r in range(ROWS):
        for c in range(nb):
            at = b.add(b.mul(ir.Constant(i64, r), ldo), ir.Constant(i64, c * _LANES))
            b.store(new[r][c], b.bitcast(b.gep(out, [at]), ir.PointerType(v16f)), align=4)
    b.ret_void()
    return fn


@intrinsic
def _micro(typingctx, qp, kp, out, ldo):
    """One ROWS x KEYS register tile (see :func:`_build_micro`): qp (>= ROWS,
    d2) uint32 query pairs, kp (>= KEYS // 16, d2, 16) uint32 key pairs,
    out float32 whose rows are ``ldo`` apart (only the data pointer is used)."""
    sig = nbtypes.void(qp, kp, out, nbtypes.int64)

    def codegen(context, builder, signature, args):
        fn = _build_micro(builder.module)
        aq = context.make_array(signature.args[0])(context, builder, args[0])
        ak = context.make_array(signature.args[1])(context, builder, args[1])
        ao = context.make_array(signature.args[2])(context, builder, args[2])
        pi = ir.PointerType(ir.IntType(32))
        d2 = builder.extract_value(aq.shape, 1)
        builder.call(fn, [builder.bitcast(aq.data, pi), builder.bitcast(ak.data, pi), ao.data, d2,
                          d2, args[3]])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def aligned_empty(n, dtype):
    """A new 1-D array of ``n`` elements of ``dtype`` (4 bytes) whose data
    start on a 64-byte boundary: Numba aligns its arrays to 32 bytes, and a
    zmm load or store that splits two cache lines costs the micro-kernel a
    quarter of its speed."""
    raw = np.empty(n + 16, dtype)
    skip = (-(raw.ctypes.data >> 2)) & 15
    return raw[skip:skip + n]


@njit(cache=True, inline="always")
def _bf16(x):
    """The bfloat16 nearest the float32 ``x`` (ties to even), as the low 16
    bits of an int64 (finite ``x`` below the largest bfloat16)."""
    b = np.int64(float32_bits(x)) & 0xFFFFFFFF
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(cache=True, inline="always")
def _pair(row, c):
    """Features ``2c`` and ``2c + 1`` of ``row`` as two bfloat16 in a uint32
    (the second is 0 past the end of an odd-length row)."""
    lo = _bf16(row[2 * c])
    hi = _bf16(row[2 * c + 1]) if 2 * c + 1 < row.shape[0] else np.int64(0)
    return np.uint32(lo | (hi << 16))


@njit(cache=True, inline="always")
def _upper_norm(row):
    """An upper bound of the Euclidean norm of the float32 ``row`` (float64
    sums, rounded up)."""
    sq = 0.0
    for c in range(row.shape[0]):
        sq += np.float64(row[c]) * np.float64(row[c])
    return math.sqrt(sq) * (1.0 + 2.0**-40)


@njit(cache=True)
def pack_queries(Qb, qp, qn):
    """Pack the float32 queries Qb (bq, d) for :func:`tile_dots`: qp
    (>= ceil(bq / ROWS) * ROWS, ceil(d / 2)) uint32 (rows past bq zero), qn
    (bq,) float64 upper bounds of their norms. Returns the largest norm."""
    bq = Qb.shape[0]
    top = 0.0
    for i in range(qp.shape[0]):
        out = qp[i]
        if i >= bq:
            out[:] = 0
            continue
        for c in range(out.shape[0]):
            out[c] = _pair(Qb[i], c)
        qn[i] = _upper_norm(Qb[i])
        top = max(top, qn[i])
    return top


@njit(cache=True, inline="always")
def norm_bound(sq, d):
    """An upper bound of the norm of a float32 vector of length ``d`` from
    ``sq``, the float32 sum of its squares in any order: relative error at
    most gamma(d), plus at most ``2^-149`` per square or sum that falls into
    the subnormal range."""
    n = d + 2
    return math.sqrt(np.float64(sq) * (1.0 + 1.01 * n * _EPS / (1 - n * _EPS))
                     + 2 * n * 2.0**-149) * (1.0 + 2.0**-22)


@njit(cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def pack_keys(Kt, kp, kn, pairs):
    """Pack the float32 key tile Kt (tn, d) for :func:`tile_dots`: kp
    (>= ceil(tn / KEYS) * KEYS // 16, ceil(d / 2), 16) uint32 (keys past tn
    zero), kn (tn,) float32 the keys' squared norms (see
    :func:`norm_bound`); pairs (>= tn, ceil(d / 2)) uint32 scratch. Returns
    the bound of the largest norm."""
    tn, d = Kt.shape
    d2 = kp.shape[1]
    top = np.float32(0.0)
    for j in range(tn):
        row = Kt[j]
        sq = np.float32(0.0)
        for c in range(d):
            sq += row[c] * row[c]
        kn[j] = sq
        top = max(top, sq)
        out = pairs[j]
        for c in range(d2):
            out[c] = _pair(row, c)
    for blk in range(-(-tn // KEYS) * (KEYS // _LANES)):
        dst = kp[blk]
        for c in range(d2):
            for lane in range(_LANES):
                j = blk * _LANES + lane
                dst[c, lane] = pairs[j, c] if j < tn else 0
    return norm_bound(top, d)


@njit(cache=True)
def tile_dots(qp, kp, S, edge):
    """S (bq, tn) float32 = the dot products of the packed queries qp and
    keys kp (:func:`pack_queries`, :func:`pack_keys`), with ``vdpbf16ps``
    accumulating in float32. edge (ROWS, KEYS) float32 scratch for the
    register tiles that cross the edge of S."""
    bq, tn = S.shape
    ldo = S.shape[1]
    for r0 in range(0, bq, ROWS):
        for c0 in range(0, tn, KEYS):
            blk = c0 // _LANES
            if r0 + ROWS <= bq and c0 + KEYS <= tn:
                _micro(qp[r0:], kp[blk:], S[r0:, c0:], ldo)
                continue
            _micro(qp[r0:], kp[blk:], edge, KEYS)
            for r in range(min(ROWS, bq - r0)):
                for c in range(min(KEYS, tn - c0)):
                    S[r0 + r, c0 + c] = edge[r, c]


@njit(cache=True)
def margin_terms(kf, fa, omax, d):
    """``(a, b)``: a query's approximate logits in a key tile are within
    ``slack = qn * a + b`` of the exact ones (see the module's error bound),
    qn its norm bound. kf is the tile's largest ``|k| * |factor|``, fa its
    largest ``|factor|``, omax its largest ``|offset|`` (1 and 0 for plain dot
    products). Both include the roundings of evaluating them and of
    :func:`slack`."""
    inflate = (1.0 + 2.0**-12) * (1.0 + 2.0**-20)
    rd = math.sqrt(d)
    a = (kf * (coefficient(d) + 2.0**-21) + _TINY * fa * rd) * inflate
    b = (_TINY * (fa * d + rd * kf) + 2.0**-21 * omax) * inflate
    return a, b


@njit(cache=True, inline="always")
def slack(qn, a, b):
    """The margin of a query with norm bound ``qn`` in a tile with margin
    terms ``(a, b)`` (:func:`margin_terms`), float32; inf if it would
    overflow."""
    bound = qn * a + b
    return np.float32(bound) if bound < 1e38 else np.float32(np.inf)
