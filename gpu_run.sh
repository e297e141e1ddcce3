#!/bin/bash
# One device session: the kernel benchmark with its configuration sweep, then the compiled kernel tests.
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/aaac_kernels
export PYTHONPATH=/tmp/pp TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.version.cuda)"
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-330} python benchmarks/kernels.py $BENCH_ARGS --json $OUT/kernels.json --no-docs > $OUT/bench.log 2>&1
echo "benchmark rc $? took $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-130} python -m pytest tests/test_triton_kernels.py -q -k "not compile" -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $? took $(( $(date +%s) - start )) s"
tail -c 3000 $OUT/tests.log
grep -v '^{' $OUT/bench.log | tail -c 6000
