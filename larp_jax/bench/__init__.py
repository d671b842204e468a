"""The model benchmark, ``python -m larp_jax.bench`` (``__main__.py``; BENCHMARKS.md).

``runners``: the measurements and the command line; ``flops``: XLA and analytic FLOP counts;
``timing``: timed runs and the peak matmul rate; ``memory``: compiled and device memory;
``record``: the JSON record, its table and file.
"""
