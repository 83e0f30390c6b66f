"""MicroAdam vs torch.optim.Adam (step time, floor, state bytes): ``python benchmarks/bench_micro_adam.py [args]``.

The harness is ``fastdp.bench.bench_micro_adam`` (also ``python -m fastdp.bench.bench_micro_adam``); this script
runs it from a checkout. Results: ``benchmarks/results/micro_adam_<device>_<date>.json`` and ``.md``.
"""
from fastdp.bench.bench_micro_adam import main

if __name__ == "__main__":
    main()
