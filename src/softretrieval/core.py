"""The scalar math every mode and every target shares.

These are plain Python functions on scalars: no arrays, no Python objects, no
BLAS. Every target compiles them (with :mod:`softretrieval.rules` and
:mod:`softretrieval.topk_buffer`, through :func:`softretrieval.rules.shared`):
the CPU with ``numba.njit(inline="always")``, CUDA with
``numba.cuda.jit(device=True)``; they also run as plain Python.

Conventions (all float32):

* Logits are kept in **base 2**: the drivers fold ``log2(e)`` into the query
  scale and the bias, so a score is ``t = log2(e) * (scale * q.k + bias)`` and
  the softmax weight is ``2 ** (t - m)``. This saves a multiply per score.
* An online-softmax state over a set of keys is ``(m, l, acc)``: ``m`` the
  running max of ``t``, ``l = sum 2 ** (t - m)``, ``acc = sum 2 ** (t - m) v``.
  A state that has seen no valid key has ``m = NEG_INIT`` and ``l = 0``.
* An excluded key has logit ``MASKED`` (far below ``NEG_INIT``), so its weight
  is exactly 0 even when every key of a row is excluded. Valid logits below
  ``NEG_INIT`` (about -1e30) are treated as excluded too.
"""

import math
import types

import numpy as np
from llvmlite import ir
from numba import njit
from numba import types as nbtypes
from numba.core.extending import intrinsic, overload

from .constants import LN2

# Coefficients of a degree-5 polynomial for 2**r on [-0.5, 0.5], fitted for
# the least largest relative error (9.2e-8, as small as the degree-6 Taylor
# polynomial's 9e-8 that it replaced, for one multiply-add less per score:
# the exp2 pass of a tile is bound by its multiply-adds).
_C1 = np.float32(0.6931469775990403)
_C2 = np.float32(0.2402224208517656)
_C3 = np.float32(0.05550733743347245)
_C4 = np.float32(0.009671512652609375)
_C5 = np.float32(0.0013264727206878284)


def float32_from_bits(bits):
    """The float32 whose IEEE bit pattern is the int32 ``bits``."""
    return np.array([bits], np.int32).view(np.float32)[0]


def float32_bits(x):
    """The IEEE bit pattern of the float32 ``x``, as an int32 (an int32 ``x``
    is taken to be such a pattern already and returned as it is)."""
    if isinstance(x, (np.int32, int)):
        return np.int32(x)
    return np.array([x], np.float32).view(np.int32)[0]


@intrinsic
def _bitcast_int32_float32(typingctx, bits):
    sig = nbtypes.float32(nbtypes.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bitcast_float32_int32(typingctx, x):
    sig = nbtypes.int32(nbtypes.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


# Compiled (CPU and CUDA): plain bitcasts, which LLVM vectorizes.
@overload(float32_from_bits, inline="always")
def _float32_from_bits_compiled(bits):
    def impl(bits):
        return _bitcast_int32_float32(np.int32(bits))

    return impl


@overload(float32_bits, inline="always")
def _float32_bits_compiled(x):
    if x == nbtypes.int32:
        return lambda x: x
    return lambda x: _bitcast_float32_int32(np.float32(x))


def pow2i(n):
    """``2.0 ** n`` as float32 for an integer ``-126 <= n <= 127``; 0.0 for -127.

    The exponent goes straight into the float's bits (``n = -127`` gives the
    bits of 0.0): vectorizable, unlike a libm ``ldexp``.
    """
    return float32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


def exp2(x):
    """``2 ** x`` for float32 ``x <= 127``; exactly 0 for ``x < -126.5``.

    Range reduction ``x = n + r`` with ``|r| <= 0.5`` (``n`` by truncating
    ``x + 127.5``, positive after the clamp: no ``floor``, which the CUDA
    target lacks), a degree-5 polynomial for ``2 ** r``, and the exponent
    ``n`` put in with :func:`pow2i`; clamping ``x`` at -127 makes
    ``n = -127``, whose power of two is 0. No branch, so a loop over it
    vectorizes. Relative error < 3e-7 (subnormals flush to 0).
    """
    xc = max(x, np.float32(-127.0))
    ni = np.int32(xc + np.float32(127.5))      # round(xc) + 127: truncation of a positive number
    # n = ni - 127 converted from the integer, so that the subtraction below
    # stays exact under fast-math reassociation (computing (xc + 127) - ni
    # instead rounded at 127's magnitude: 2.8e-6 relative error in kernels).
    r = xc - np.float32(np.int32(ni - np.int32(127)))
    p = _C5 * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = p * r + _C1
    p = p * r + np.float32(1.0)
    return p * pow2i(ni - np.int32(127))


_TWO112 = np.float32(2.0**112)
_HALF_SIGN = np.int32(0x8000)
_HALF_MAGNITUDE = np.int32(0x7FFF)


def half_to_float(h):
    """The float32 value of the finite IEEE half-precision number whose bits
    are the integer ``h`` (0..65535).

    The half's exponent and mantissa are placed in a float32's low exponent
    bits (shift by 13) and rebased by a multiply by ``2 ** 112``, which also
    gets subnormal halves right. No branch, so a loop over it vectorizes.
    (Storage never holds half inf/NaN: encoding refuses them.)
    """
    b = np.int32(h)
    return float32_from_bits(np.int32(((b & _HALF_SIGN) << np.int32(16))
                                      | ((b & _HALF_MAGNITUDE) << np.int32(13)))) * _TWO112


def bfloat16_to_float(h):
    """The float32 value of the bfloat16 whose bits are the integer ``h``
    (0..65535): the top half of a float32's bits."""
    return float32_from_bits(np.int32(np.int32(h) << np.int32(16)))


def next_hit(bits):
    """The position of the lowest set bit of a nonzero int32 mask below
    2^31, and the mask without that bit. The position is read from the
    exponent of the bit's float32 value: a count of trailing zeros in plain
    arithmetic, the same on every target."""
    low = bits & -bits
    return (float32_bits(np.float32(low)) >> np.int32(23)) - np.int32(127), bits ^ low


def rescale(m_old, tile_max):
    """New running max after a tile, and the factor that rescales old sums.

    Returns ``(m_new, c)`` with ``m_new = max(m_old, tile_max)`` and
    ``c = 2 ** (m_old - m_new)``; ``l`` and ``acc`` of the state are
    multiplied by ``c`` before the tile's weights ``2 ** (t - m_new)`` are added.
    """
    m_new = max(m_old, tile_max)
    return m_new, exp2(m_old - m_new)


def merge_pair(m1, l1, m2, l2):
    """Merge two states over disjoint key sets (associative, exact).

    Returns ``(m, l, c1, c2)``: the merged max and sum, and the factors that
    scale each accumulator: ``acc = c1 * acc1 + c2 * acc2``.
    """
    m = max(m1, m2)
    c1 = exp2(m1 - m)
    c2 = exp2(m2 - m)
    return m, l1 * c1 + l2 * c2, c1, c2


def finalize(m, l):
    """Normalizer and natural-log partition of a state.

    Returns ``(inv_l, lse)``: ``out = acc * inv_l`` and
    ``lse = ln(sum exp(logit))``; a state with no valid key gives
    ``inv_l = 0`` (so ``out = 0``) and ``lse = -inf``.
    """
    if l > 0.0:
        return 1.0 / l, (m + math.log2(l)) * LN2
    return 0.0, -math.inf


#: The functions of this module that every target compiles, in dependency order.
FUNCTIONS = (pow2i, exp2, half_to_float, bfloat16_to_float, next_hit, rescale, merge_pair,
             finalize)


def compile_for(decorator, funcs=None, scope=None):
    """Compile plain functions with ``decorator``, e.g. a target's jit.

    Each function is rebuilt with globals in which the functions it calls
    (earlier in ``funcs``) are the already compiled ones, and the names in
    ``scope`` (e.g. compiled modules it calls through, or a target's own
    ``decode``) are bound as given, so a single source becomes a set of
    functions that call each other on the target. ``funcs`` defaults to
    :data:`FUNCTIONS`. Returns a module object with one attribute per
    function (a module, so compiled code can call through it).
    """
    compiled = {}
    for func in funcs or FUNCTIONS:
        names = dict(func.__globals__, **(scope or {}), **compiled)
        rebuilt = types.FunctionType(func.__code__, names, func.__name__, func.__defaults__)
        compiled[func.__name__] = decorator(rebuilt)
    module = types.ModuleType(f"{funcs[0].__module__ if funcs else __name__}.compiled")
    module.__dict__.update(compiled)
    return module


#: The core for the CPU kernels, inlined into its callers (so each takes its
#: caller's fast-math flags).
cpu = compile_for(njit(inline="always"))
