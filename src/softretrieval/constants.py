"""Numeric constants of the kernels' conventions (see :mod:`softretrieval.core`)."""

import numpy as np

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Running max of an online-softmax state that has seen no valid key.
NEG_INIT = np.float32(-1e30)
#: Base-2 logit given to an excluded key (bias ``-inf``); far below NEG_INIT,
#: so its weight is exactly 0 even when every key of a row is excluded.
MASKED = np.float32(-1e36)

#: How a score tile turns dot products ``s = q.k`` into logits (the kernels'
#: ``key_mode``).
KEYS_PLAIN = 0    # logit = s
KEYS_SQNORM = 1   # logit = s + key_coef * |k|^2   (l2, up to a per-query constant)
KEYS_UNIT = 2     # logit = s / |k|                (cosine; a zero key scores 0)

