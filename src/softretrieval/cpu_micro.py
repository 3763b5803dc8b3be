"""Register-tiled micro-kernels in LLVM IR, for the CPU's widest vectors.

Numba compiles loops well but cannot hold a tile of results in vector
registers across a loop the way a GEMM micro-kernel does; BLAS can, but only
for its own products. These kernels are that inner loop written once in LLVM
IR (:func:`_register_tile`) and exposed to Numba as intrinsics:

* :func:`fma_set`, :func:`fma_rows`: ``acc[r, :] (+)= sum_j P[r, j] *
  V[j, :]`` for ``ROWS`` rows and ``COLS`` columns in float32 FMAs, the
  products of a score tile (:func:`tile_products`) and the weighted sum of
  value rows of soft retrieval (:func:`softretrieval.cpu._accumulate`);
* :func:`bf16_dots`: ``ROWS`` queries by 32 keys of bfloat16 dot products
  (``vdpbf16ps``, AVX512_BF16), the bfloat16 filter of exact top-k
  (:mod:`softretrieval.cpu_bf16`);
* :func:`hit_mask`: which of 16 logits reach a threshold, as a bit mask
  (plain vector IR, for any CPU), the scans of top-k and range search.

The register tile fits the vector registers Numba compiles for
(:func:`vector_lanes`): with AVX-512F, 12 rows by two 16-lane vectors (24
of the 32 zmm registers); with AVX2 and FMA, 6 rows by two 8-lane vectors
(12 of the 16 ymm registers, the Haswell GEMM tile). Each step of its loop
loads two vectors and broadcasts one scalar per row; the kernel is compiled
into whatever kernel calls it. The loop carries
``llvm.loop.unroll.disable``: linked into the large stream kernel, LLVM
unrolled it and spilled the accumulators (a quarter slower).

A kernel is emitted only where the CPU has its instructions
(:func:`has_fma_tiles`, :func:`has_bf16`, :func:`has_vnni`); elsewhere it
compiles to a trap that the drivers never reach (they check the same
functions first), so every kernel still compiles on any machine.
"""

import functools

from llvmlite import binding as llvm
from llvmlite import ir
from numba import config as numba_config
from numba.core import codegen as numba_codegen
from numba import njit
from numba import types as nbtypes
from numba.core.extending import intrinsic
import numpy as np

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)


@functools.cache
def target_features():
    """The CPU features Numba compiles for, as ``{name: on}``, read from the
    feature list Numba hands LLVM (``+name`` on, ``-name`` off):
    ``NUMBA_CPU_FEATURES`` when set, else the host's, even for a CPU named
    through ``NUMBA_CPU_NAME``. That list is part of the key of Numba's
    cache, so two processes that share cached kernels choose the same
    register tile. An empty list (``NUMBA_CPU_NAME=generic``, or set empty)
    leaves LLVM the named CPU's own features, which are unknown here: none
    are assumed (the host's when no CPU is named)."""
    listed = numba_config.CPU_FEATURES
    if listed is None:
        listed = numba_codegen.get_host_cpu_features()
    if not listed:
        return dict(llvm.get_host_cpu_features()) if numba_config.CPU_NAME in (None, "host") else {}
    return {f[1:]: f[0] == "+" for f in listed.split(",") if f[:1] in ("+", "-")}


def _all(*names):
    features = target_features()
    return all(features.get(name) for name in names)


def has_avx512():
    """Whether Numba compiles for AVX-512F here (and the AVX2 and FMA it
    implies: a list that turns those off turns AVX-512F off in LLVM)."""
    return _all("avx512f", "avx2", "fma", "avx")


def vector_lanes():
    """float32 lanes of the register tile's vectors: 16 with AVX-512F, 8
    with AVX2 and FMA, 0 without (no :func:`fma_set`, :func:`fma_rows`)."""
    if has_avx512():
        return 16
    return 8 if _all("avx2", "fma", "avx") else 0


def has_fma_tiles():
    """Whether :func:`fma_set` and :func:`fma_rows` run here."""
    return vector_lanes() > 0


#: Rows of a register tile, its columns (two vectors) and their lanes, for
#: the vectors Numba compiles for (:func:`vector_lanes`; 12 x 32 or 6 x 16).
#: Compiled into the kernels, not run-time tunables.
LANES = vector_lanes() or 8
ROWS = 12 if LANES == 16 else 6
COLS = 2 * LANES

_VF = ir.VectorType(_F32, LANES)
_VI = ir.VectorType(_I32, LANES)


def has_bf16():
    """Whether :func:`bf16_dots` runs here (AVX-512F, AVX512BW and AVX512_BF16)."""
    return has_avx512() and _all("avx512bw", "avx512bf16")


def has_vnni():
    """Whether :func:`int8_dot` runs here (AVX-512F, AVX512BW and AVX512_VNNI)."""
    return has_avx512() and _all("avx512bw", "avx512vnni")


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


def _declare(module, name, ret, args):
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name=name)


def _loop_head(fn, b, n, entry):
    """Open a counted loop in ``fn`` after the block ``entry`` (skipped when
    ``n <= 0``): returns its blocks ``(loop, done)`` and the counter's phi
    (0 on entry; the caller adds the increment), the builder ``b`` in the
    loop body."""
    loop = fn.append_basic_block("loop")
    done = fn.append_basic_block("done")
    b.cbranch(b.icmp_signed(">", n, ir.Constant(_I64, 0)), loop, done)
    b.position_at_end(loop)
    t = b.phi(_I64)
    t.add_incoming(ir.Constant(_I64, 0), entry)
    return loop, done, t


def _register_tile(module, name, available, accumulate, step):
    """Define (once per LLVM module) ``void name(a, b, out, n, lda, ldb,
    ldo)`` over float32/int32 pointers: ROWS x COLS accumulators, started
    from ``out`` when ``accumulate`` (else 0), run through ``n`` steps of
    ``step(builder, a, b, t, lda, ldb, acc) -> new acc`` (acc: ROWS lists of
    two vectors), then stored to ``out`` (rows ``ldo`` elements apart)."""
    if name in module.globals:
        return module.globals[name]
    pf = ir.PointerType(_F32)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [pf, pf, pf, _I64, _I64, _I64, _I64]),
                     name=name)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    a, b_, out, n, lda, ldb, ldo = fn.args
    entry = fn.append_basic_block("entry")
    b = ir.IRBuilder(entry)
    if not available:
        b.call(_declare(module, "llvm.trap", ir.VoidType(), []), [])
        b.ret_void()
        return fn
    ptrs = [[b.bitcast(b.gep(out, [b.add(b.mul(ir.Constant(_I64, r), ldo),
                                         ir.Constant(_I64, c * LANES))]), ir.PointerType(_VF))
             for c in range(COLS // LANES)] for r in range(ROWS)]
    zero = ir.Constant(_VF, [0.0] * LANES)
    start = [[b.load(p, align=4) if accumulate else zero for p in row] for row in ptrs]
    loop, done, t = _loop_head(fn, b, n, entry)
    acc = [[b.phi(_VF) for _ in row] for row in ptrs]
    for r, row in enumerate(acc):
        for c, phi in enumerate(row):
            phi.add_incoming(start[r][c], entry)
    new = step(b, a, b_, t, lda, ldb, acc)
    t1 = b.add(t, ir.Constant(_I64, 1))
    t.add_incoming(t1, loop)
    for r, row in enumerate(acc):
        for c, phi in enumerate(row):
            phi.add_incoming(new[r][c], loop)
    back = b.cbranch(b.icmp_signed("<", t1, n), loop, done)
    back.set_metadata("llvm.loop", _LoopID(module, [module.add_metadata(
        [ir.MetaDataString(module, "llvm.loop.unroll.disable")])]))
    b.position_at_end(done)
    result = [[b.phi(_VF) for _ in row] for row in ptrs]
    for r, row in enumerate(result):
        for c, phi in enumerate(row):
            phi.add_incoming(start[r][c], entry)
            phi.add_incoming(new[r][c], loop)
            b.store(phi, ptrs[r][c], align=4)
    b.ret_void()
    return fn


def _splat(b, scalar):
    """A vector of ``LANES`` copies of one 32-bit value."""
    v = b.insert_element(ir.Constant(ir.VectorType(scalar.type, LANES), ir.Undefined), scalar,
                         ir.Constant(_I32, 0))
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_VI, [0] * LANES))


def _row_scalar(b, base, r, ld, t, kind):
    """Element ``t`` of row ``r`` of a matrix with rows ``ld`` apart."""
    ptr = b.gep(base, [b.add(b.mul(ir.Constant(_I64, r), ld), t)])
    return b.load(b.bitcast(ptr, ir.PointerType(kind)) if kind != _F32 else ptr)


def _columns(b, B, t, ldb):
    """Row ``t`` of a packed B operand (its COLS columns) as two vectors."""
    return [b.load(b.bitcast(b.gep(B, [b.add(b.mul(t, ldb), ir.Constant(_I64, c * LANES))]),
                             ir.PointerType(_VF)), align=4) for c in range(COLS // LANES)]


def _bf16_step(b, qp, kp, t, ldq, ldk, acc):
    """Feature pair ``t``: the pairs of 32 keys (two vectors), one query pair
    per row, ``vdpbf16ps``."""
    bf = ir.VectorType(_BFloat16(), 32)
    dp = _declare(b.module, "llvm.x86.avx512bf16.dpbf16ps.512", _V16F, [_V16F, bf, bf])
    keys = [b.bitcast(k, bf) for k in _columns(b, kp, t, ldk)]
    return [[b.call(dp, [acc[r][c], keys[c], b.bitcast(_splat(b, _row_scalar(b, qp, r, ldq, t, _I32)),
                                                          bf)])
             for c in range(len(keys))] for r in range(ROWS)]


def _fma_step(b, A, B, t, lda, ldb, acc):
    """Row ``t`` of B (two vectors), weighted by ``A[r, t]`` for each row."""
    fma = _declare(b.module, f"llvm.fma.v{LANES}f32", _VF, [_VF, _VF, _VF])
    cols = _columns(b, B, t, ldb)
    return [[b.call(fma, [_splat(b, _row_scalar(b, A, r, lda, t, _F32)), cols[c], acc[r][c]])
             for c in range(len(cols))] for r in range(ROWS)]


def _pointer(context, builder, aty, arr):
    return builder.bitcast(context.make_array(aty)(context, builder, arr).data, ir.PointerType(_F32))


def _row_stride(context, builder, aty, arr):
    """Elements (of 4 bytes) between the rows of a 2-D array."""
    strides = context.make_array(aty)(context, builder, arr).strides
    return builder.sdiv(builder.extract_value(strides, 0), ir.Constant(_I64, 4))


def _kernel(name, available, accumulate, step, doc):
    """An intrinsic ``kernel(A, B, out)`` over one register tile:
    ``out[r, c] (+)= sum_t step(A[r, t], B[t, c])`` for r < ROWS, c < COLS,
    t < ``A.shape[1]``; each a 2-D array of 4-byte elements whose rows are
    contiguous (any row stride)."""

    def typer(typingctx, A, B, out):
        def codegen(context, builder, signature, args):
            fn = _register_tile(builder.module, name, available(), accumulate, step)
            aa, ab, ao = signature.args
            n = builder.extract_value(context.make_array(aa)(context, builder, args[0]).shape, 1)
            builder.call(fn, [_pointer(context, builder, aa, args[0]),
                              _pointer(context, builder, ab, args[1]),
                              _pointer(context, builder, ao, args[2]), n,
                              _row_stride(context, builder, aa, args[0]),
                              _row_stride(context, builder, ab, args[1]),
                              _row_stride(context, builder, ao, args[2])])
            return context.get_dummy_value()

        return nbtypes.void(A, B, out), codegen

    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


bf16_dots = _kernel(
    f"softretrieval_bf16_dots_{ROWS}x{COLS}", has_bf16, False, _bf16_step,
    """``out[r, c] = sum_t dot(A[r, t], B[t, c])`` (r < ROWS, c < COLS): A
    (>= ROWS, d2) query pairs and B (d2, >= COLS) key pairs, uint32 each
    holding two bfloat16 (the even feature in the low half); out float32.""")

fma_set = _kernel(
    f"softretrieval_fma_set_{ROWS}x{COLS}", has_fma_tiles, False, _fma_step,
    """``out[r, c] = sum_t A[r, t] * B[t, c]`` (r < ROWS, c < COLS), float32.""")

fma_rows = _kernel(
    f"softretrieval_fma_rows_{ROWS}x{COLS}", has_fma_tiles, True, _fma_step,
    """``out[r, c] += sum_t A[r, t] * B[t, c]`` (r < ROWS, c < COLS), float32.""")


_I8 = ir.IntType(8)
_V64B = ir.VectorType(_I8, 64)


def _int8_dot_function(module):
    """Define (once per LLVM module) ``i32 name(q, k, d)`` over int8
    pointers: ``sum_c (k[c] + 128) * q[c]`` for ``c < d``, 64 bytes per
    ``vpdpbusd`` (AVX512_VNNI: unsigned bytes times signed bytes, summed in
    int32 lanes). The key bytes are loaded under a mask (none is read past
    ``d``); the query must be zero-padded to a multiple of 64 bytes."""
    name = "softretrieval_int8_dot"
    if name in module.globals:
        return module.globals[name]
    pb = ir.PointerType(_I8)
    fn = ir.Function(module, ir.FunctionType(_I32, [pb, pb, _I64]), name=name)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    q, k, d = fn.args
    entry = fn.append_basic_block("entry")
    b = ir.IRBuilder(entry)
    if not has_vnni():
        b.call(_declare(module, "llvm.trap", ir.VoidType(), []), [])
        b.ret(ir.Constant(_I32, 0))
        return fn
    zero = ir.Constant(_V16I, [0] * 16)
    loop, done, c = _loop_head(fn, b, d, entry)
    acc = b.phi(_V16I)
    acc.add_incoming(zero, entry)
    width = 64
    rest = b.sub(d, c)          # bytes left: the mask is the low min(rest, 64) bits
    full = b.icmp_signed(">=", rest, ir.Constant(_I64, width))
    low = b.sub(b.shl(ir.Constant(_I64, 1), b.select(full, ir.Constant(_I64, 0), rest)),
                ir.Constant(_I64, 1))
    mask = b.bitcast(b.select(full, ir.Constant(_I64, -1), low), ir.VectorType(ir.IntType(1), width))
    masked_load = _declare(module, "llvm.masked.load.v64i8.p0", _V64B,
                           [ir.PointerType(_V64B), _I32, ir.VectorType(ir.IntType(1), width), _V64B])
    kv = b.call(masked_load, [b.bitcast(b.gep(k, [c]), ir.PointerType(_V64B)), ir.Constant(_I32, 1),
                              mask, ir.Constant(_V64B, [0] * width)])
    qv = b.load(b.bitcast(b.gep(q, [c]), ir.PointerType(_V64B)), align=1)
    dp = _declare(module, "llvm.x86.avx512.vpdpbusd.512", _V16I, [_V16I, _V16I, _V16I])
    new = b.call(dp, [acc, b.bitcast(b.xor(kv, ir.Constant(_V64B, [0x80] * width)), _V16I),
                      b.bitcast(qv, _V16I)])
    c1 = b.add(c, ir.Constant(_I64, width))
    c.add_incoming(c1, loop)
    acc.add_incoming(new, loop)
    b.cbranch(b.icmp_signed("<", c1, d), loop, done)
    b.position_at_end(done)
    total = b.phi(_V16I)
    total.add_incoming(zero, entry)
    total.add_incoming(new, loop)
    reduce = _declare(module, "llvm.vector.reduce.add.v16i32", _I32, [_V16I])
    b.ret(b.call(reduce, [total]))
    return fn


@intrinsic
def int8_dot(typingctx, q, k):
    """``sum_c (k[c] + 128) * q[c]`` over the ``len(k)`` elements of k,
    modulo 2^32 as int32 (:func:`has_vnni`; the caller subtracts ``128 *
    sum(q)`` in the same wrapping arithmetic, which leaves ``q . k`` exact
    while ``|q . k| < 2^31``: ``len(k) < 2^17``). q (>= 64 * ceil(len(k) /
    64),) int8, zero past ``len(k)``; both 1-D C-contiguous arrays. k of
    another dtype compiles to a trap (a kernel's branch for other storage
    dtypes, never taken)."""
    for a in (q, k):
        if not (isinstance(a, nbtypes.Array) and a.ndim == 1 and a.layout == "C"):
            return None
    if q.dtype != nbtypes.int8:
        return None
    bytes_ = k.dtype == nbtypes.int8

    def codegen(context, builder, signature, args):
        if not bytes_:
            builder.call(_declare(builder.module, "llvm.trap", ir.VoidType(), []), [])
            return ir.Constant(_I32, 0)
        fn = _int8_dot_function(builder.module)
        qa = context.make_array(signature.args[0])(context, builder, args[0])
        ka = context.make_array(signature.args[1])(context, builder, args[1])
        n = builder.extract_value(ka.shape, 0)
        pb = ir.PointerType(_I8)
        return builder.call(fn, [builder.bitcast(qa.data, pb), builder.bitcast(ka.data, pb), n])

    return nbtypes.int32(q, k), codegen


@intrinsic
def hit_mask(typingctx, row, c0, threshold):
    """:func:`softretrieval.rules.hit_bits` of 16 logits: bit ``b`` of the
    int32 result for ``row[c0 + b] >= threshold`` with the threshold rounded
    to float32 as the rule does (an ordered compare: NaN is below), one
    16-lane compare and its mask. row 1-D C-contiguous
    float32 with ``c0 + 16 <= len(row)``."""
    if not (isinstance(row, nbtypes.Array) and row.ndim == 1 and row.layout == "C"
            and row.dtype == nbtypes.float32 and isinstance(c0, nbtypes.Integer)):
        return None

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        start = context.cast(builder, args[1], signature.args[1], nbtypes.intp)
        limit = context.cast(builder, args[2], signature.args[2], nbtypes.float32)
        ptr = builder.bitcast(builder.gep(arr.data, [start]), ir.PointerType(_V16F))
        x = builder.load(ptr, align=4)
        splat = builder.insert_element(ir.Constant(_V16F, ir.Undefined), limit,
                                       ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, ir.Constant(_V16F, ir.Undefined),
                                       ir.Constant(_V16I, [0] * 16))
        bits = builder.bitcast(builder.fcmp_ordered(">=", x, splat), ir.IntType(16))
        return builder.zext(bits, _I32)

    return nbtypes.int32(row, c0, threshold), codegen


@njit(cache=True)
def aligned_empty(n, dtype):
    """A new 1-D array of ``n`` elements of ``dtype`` (4 bytes) whose data
    start on a 64-byte boundary: Numba aligns its arrays to 32 bytes, and a
    zmm load or store that splits two cache lines costs the micro-kernel a
    quarter of its speed."""
    raw = np.empty(n + 16, dtype)
    skip = (-(raw.ctypes.data >> 2)) & 15
    return raw[skip:skip + n]


@njit(cache=True)
def aligned_rows(X, buf):
    """X (n, w) float32 (contiguous rows), or X copied into buf (>= n, w),
    from :func:`aligned_empty`, when X's rows do not start on 32 bytes. For
    the AVX2 register tile, whose 32-byte loads of such rows cross cache
    lines (large numpy arrays start 16 bytes past a line): they cost a soft-
    retrieval call 5% on Zen 4, more than the copy. The AVX-512 tile's loads
    measured the same either way, so it reads the rows where they are."""
    if X.ctypes.data % 32 == 0 and X.strides[0] % 32 == 0:
        return X
    out = buf[: X.shape[0]]
    out[:, :] = X
    return out


@njit(cache=True)
def block_width(width, r0, tn):
    """Columns a register tile of rows ``r0 .. r0 + ROWS`` needs: the most
    any of its rows needs (``width`` (bq,) int64), or all ``tn`` when
    ``width`` is empty."""
    if width.shape[0] == 0:
        return tn
    n = 0
    for r in range(r0, min(r0 + ROWS, width.shape[0])):
        n = max(n, width[r])
    return min(n, tn)


@njit(cache=True)
def tile_products(A, Bp, S, edge, bf16, width):
    """S (bq, tn) = the products of the rows of A (>= ceil(bq / ROWS) * ROWS
    rows, zero past bq) with the columns of the packed tile Bp (>=
    ceil(tn / COLS), n, COLS) (zero past tn), through :func:`bf16_dots`
    (``bf16``: uint32 pairs) or :func:`fma_set` (float32). width (bq,)
    int64 or (0,): row i needs only its first ``width[i]`` columns (a key
    window); register tiles past every row of theirs are skipped, their
    entries left unset for the caller's mask. edge (ROWS, COLS) float32
    scratch for the register tiles that cross the edge of S."""
    bq, tn = S.shape
    for r0 in range(0, bq, ROWS):
        for c0 in range(0, block_width(width, r0, tn), COLS):
            inside = r0 + ROWS <= bq and c0 + COLS <= tn
            out = S[r0:, c0:] if inside else edge
            if bf16:
                bf16_dots(A[r0:], Bp[c0 // COLS], out)
            else:
                fma_set(A[r0:], Bp[c0 // COLS], out)
            if not inside:
                for r in range(min(ROWS, bq - r0)):
                    for c in range(min(COLS, tn - c0)):
                        S[r0 + r, c0 + c] = edge[r, c]


@njit(cache=True)
def pack_columns(X, out):
    """The rows of X (tn, n) as the columns of a packed tile out
    (>= ceil(tn / COLS), n, COLS) (:func:`tile_products`), zero past tn."""
    tn, n = X.shape
    for blk in range(-(-tn // COLS)):
        dst = out[blk]
        for c in range(n):
            for lane in range(COLS):
                j = blk * COLS + lane
                dst[c, lane] = X[j, c] if j < tn else 0


@njit(cache=True)
def pad_rows(X, out):
    """X (bq, n) copied into out (>= ceil(bq / ROWS) * ROWS, n), zero past bq."""
    out[: X.shape[0]] = X
    out[X.shape[0]:] = 0
