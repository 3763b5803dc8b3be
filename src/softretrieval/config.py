"""Every tunable of the kernels, in one place.

The drivers read these values at call time, so tests (and users) may change
them between calls, e.g. to shrink the tiles so tiny inputs cross tile edges.
None of them changes a result beyond float32 rounding.
"""

#: Largest query block a CPU work item processes against a key tile (give
#: or take the 6 rows by which blocks are cut at whole register tiles of the
#: micro-kernels). Blocks are made equal in size, and their count a multiple
#: of the thread count.
QUERY_BLOCK = 512

#: Keys per tile for a query block on the BLAS path.
KEY_TILE = 512

#: Query blocks of at most this many queries use SIMD loops, not BLAS.
FEW_QUERIES = 16

#: Keys per tile on the SIMD path: at least KEY_TILE_FEW, and more for the
#: fewest queries, so that a tile holds about FEW_TILE_SCORES scores (4,096
#: keys for one query: a single query's per-tile costs, its row pass and
#: top-k scan, then weigh 1.12-1.19x less against the time to read its keys;
#: 16 queries ran 2-5% slower on such long tiles). Rounded down to a
#: multiple of 64 keys; 0 turns the lengthening off (the tests' small tiles).
KEY_TILE_FEW = 512
FEW_TILE_SCORES = 4096

#: Below this many queries per thread the CPU driver splits the keys across
#: threads (flash-decoding) instead of splitting the queries.
MIN_QUERIES_PER_THREAD = 64

#: A key split never gets fewer keys than this (small N runs in one split).
MIN_KEYS_PER_SPLIT = 2048

#: Top-k searches on a CPU with AVX512_BF16 score their BLAS tiles in
#: bfloat16 first and only the keys that may enter the top-k again in float32
#: (:mod:`softretrieval.cpu_bf16`): the same results, about twice the speed.
#: False: every tile in float32.
BF16_FILTER = True

#: Top-k searches of a few queries (the SIMD path) over int8 keys, on a CPU
#: with AVX512_VNNI, score the keys in integers against int8-rounded queries
#: first and only the keys that may enter the top-k again in float32
#: (:mod:`softretrieval.cpu_int8`): the same results. False: in float32.
INT8_FILTER = True

#: On a CPU with AVX-512F, or AVX2 and FMA, the tiles past the SIMD path's
#: size are scored and their value rows summed through softretrieval's own
#: float32 micro-kernels (:mod:`softretrieval.cpu_micro`), faster than
#: OpenBLAS on these shapes and able to skip the register tiles past a
#: causal window. False: BLAS everywhere.
MICRO_KERNELS = True

#: Range search, first pass over the keys: each query may store
#: ``max(RANGE_SLOTS, RANGE_BUFFER_BYTES / (12 * queries * key ranges))``
#: hits per key range (never more than the range's keys); a query with more
#: is run again with room for all it found (:mod:`softretrieval.ranges`).
#: The buffer is allocated, not written: only the pages that hits reach
#: take memory.
RANGE_SLOTS = 128
RANGE_BUFFER_BYTES = 64 << 20

#: Threads for the CPU kernels; ``None`` means every thread Numba has.
NUM_THREADS = None

#: CPU kernel calls of more multiply-adds than this (about 3 ms of
#: arithmetic, 10-30 ms for a single query that reads its keys from memory)
#: run in a helper thread while the calling main thread waits, so that
#: Ctrl-C stops them within one key tile (:func:`runtime.parallel_call`).
#: Smaller calls run directly: the hand-off to the long-lived helper thread
#: costs about 0.1 ms, 2-3% of a single query over 1M int8 keys.
INTERRUPTIBLE_WORK = 1 << 28

#: Per-row finishing kernels (top-k merges and finishes) smaller than this
#: (rows times k) run their serial twins (:func:`runtime.with_serial_twin`):
#: waking the parallel threads costs about 0.1 ms, more than a single
#: query's finish.
SERIAL_WORK = 4096

#: Index allow-lists (``include=``): the allowed rows are gathered and each
#: query scores only its own (cost O(sum of list lengths x d)) when the lists
#: hold at most this share of the B x N (query, item) pairs and the gathered
#: rows take at most ``INCLUDE_GATHER_BYTES``; otherwise every key is scanned
#: and the rows not allowed are masked (cost O(B x N x d), like a search).
INCLUDE_GATHER_SHARE = 1 / 16
INCLUDE_GATHER_BYTES = 256 << 20

#: CUDA: threads per block of the one-thread-per-row kernels (the split
#: merges, the top-k finishes, the head gathers and scatters).
CUDA_QUERY_BLOCK = 64

#: CUDA: problems of at most this many query rows use the decode layout
#: (a block of ``CUDA_DECODE_THREADS`` threads, one key each, scores every
#: row of the problem); larger ones the tiled layout.
CUDA_DECODE_ROWS = 16

#: CUDA: threads per block of the decode layout (also its keys per tile).
CUDA_DECODE_THREADS = 128

#: CUDA: query rows per block of the tiled layout.
CUDA_TILE_ROWS = 64

#: CUDA: threads per block of the tiled layout.
CUDA_TILE_THREADS = 256

#: CUDA: registers per thread of the tiled layout's kernel (0: the
#: compiler's choice). Uncapped it took 238 on an H200, so one block fit an
#: SM; capped at 128 (two blocks, a few spills) soft retrieval at B = 1024,
#: N = 1M ran in 95.6 ms instead of 132 (docs/gpu.md). The decode layout is
#: left uncapped: capped at 64 it spilled and ran slower (21.7 ms, not 17.3).
CUDA_TILE_MAX_REGISTERS = 128

#: CUDA: a thread's register tile of scores is at most this many rows by
#: this many keys (the tiled layout's is exactly this square).
CUDA_MICRO = 4

#: CUDA: feature columns of the query and key tiles staged in shared memory
#: at a time (any ``d`` is a loop over such chunks).
CUDA_CHUNK = 32

#: CUDA: shared memory a block of the backward kernel may use for its tiles
#: (the 48 KiB every GPU grants without opting in).
CUDA_SHARED_BYTES = 48 * 1024

#: CUDA backward: keys per block (fewer when wide keys and values would not
#: fit ``CUDA_SHARED_BYTES``), and query rows per tile streamed past them.
CUDA_BACKWARD_KEYS = 32
CUDA_BACKWARD_ROWS = 8

#: CUDA: key splits are added until the grid has about this many blocks
#: (8 per SM of an H100/H200), so a single query still fills the GPU.
CUDA_MIN_BLOCKS = 1056

#: CUDA: a key split never gets fewer keys than this.
CUDA_MIN_KEYS_PER_SPLIT = 4096
