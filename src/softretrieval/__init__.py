"""softretrieval: streaming softmax attention of query batches over millions of keys.

Two-tower retrieval as attention, ``out = softmax(Q K^T * scale + bias) V``,
computed tile by tile with an online softmax so the B x N score matrix never
exists. Numba kernels are compiled on first use (and cached on disk).
Arrays may be numpy arrays, torch tensors or DLPack arrays (read without a
copy; torch in, torch out: :mod:`softretrieval.interop`); torch is imported
only when the caller passes a tensor.
"""

from .api import attention, logsumexp, merge, topk, topk_attention
from .grad import (AttentionGrads, MemoryGrads, attention_backward, logsumexp_backward,
                   memory_attention_backward, topk_attention_backward)
from .index import Index
from .memory import KNNMemory, memory_attention
from .merging import merge_topk
from .ranges import range_search
from .terms import MemoryRead, TopKAttention

__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "AttentionGrads", "logsumexp", "logsumexp_backward",
           "memory_attention_backward", "MemoryGrads", "merge", "merge_topk", "range_search", "topk",
           "topk_attention", "topk_attention_backward",
           "TopKAttention", "Index", "KNNMemory", "MemoryRead", "memory_attention", "__version__"]
