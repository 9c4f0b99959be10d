import os

# One BLAS thread: numpy's multithreaded OpenBLAS turned a 0.05 ms matrix-vector product into 8 ms on
# two busy cores (thread wake-ups). Must be set before numpy is imported; an explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from retrieval_svc.server import main  # noqa: E402

main()
