#!/usr/bin/env bash
# Run a command with every library held to its AVX2 code paths, on a machine
# that has AVX-512: the closest this project can get to an AVX2-only machine
# when none is at hand (same cores, caches and memory; AVX-512 unused).
#
#     bash scripts/avx2_paths.sh python scripts/bench_heads.py --reps 3 --out bench_heads_avx2.json
#
# Numba compiles for Haswell (AVX2 + FMA; the feature list tells
# softretrieval which), so its micro-kernels take their AVX2 register tile
# (6 x 16) and its bfloat16/int8 filters are off; OpenBLAS (numpy,
# scipy, FAISS) takes its Haswell kernels; torch's ATen kernels, MKL and
# oneDNN their AVX2 ones; FAISS its AVX2 build. Numba's cache goes to a
# folder of its own. The benchmarks print these settings beside the CPU.
export NUMBA_CPU_NAME=haswell
export NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${TMPDIR:-/tmp}/softretrieval-avx2-numba-cache}"
export OPENBLAS_CORETYPE=Haswell
export ATEN_CPU_CAPABILITY=avx2
export MKL_ENABLE_INSTRUCTIONS=AVX2
export ONEDNN_MAX_CPU_ISA=AVX2
export DNNL_MAX_CPU_ISA=AVX2
export FAISS_OPT_LEVEL=avx2
exec "$@"
