"""Tile sizes of the GEMM-like kernels: one default tile, or the best of a few candidates timed on the GPU.

Each kernel registers a ``Tiles``: its default configuration (what the interpreter runs, and CUDA runs with
``FASTDP_AUTOTUNE=0``) and a short list of candidates that Triton's autotuner times on the first call per key: the
shape dims that decide the best tile (never the batch size, so Poisson batches do not re-tune), each rounded up to
a power of two, and the operands' dtypes; so sequences of 300 and 500 tokens share a pick, and dynamic padding re-tunes at
most once per power of two. Buffers the kernel accumulates into are named in ``restore`` so that timing runs leave
them as they were.

Every candidate must compute the same result: ``tests/kernels/test_tile_configs.py`` runs each one, forced with
``force``, against the reference (through the interpreter in CI, compiled on a GPU).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ._backend import HAS_TRITON, interpreting
from ._common import LAUNCH_OPTIONS

if HAS_TRITON:
    import triton
    import triton.testing

REGISTRY: Dict[str, "Tiles"] = {}


@dataclass(frozen=True)
class Tile:
    """One configuration: the kernel's block-size constexprs, plus warps and pipeline stages (GPU only)."""
    blocks: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 2, **blocks: int) -> "Tile":
        return cls(tuple(sorted(blocks.items())), num_warps, num_stages)

    @property
    def meta(self) -> dict:
        return dict(self.blocks)

    def __str__(self):
        return ",".join(f"{k}={v}" for k, v in self.blocks) + f",w{self.num_warps},s{self.num_stages}"


def autotune_enabled() -> bool:
    """Whether CUDA launches time the candidates (``FASTDP_AUTOTUNE``: "1" default, "0" the default tile only)."""
    value = os.environ.get("FASTDP_AUTOTUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FASTDP_AUTOTUNE must be '0' or '1', got {value!r}")
    return value == "1" and not interpreting()


@dataclass
class Tiles:
    """The tile configurations of one Triton kernel ``fn``; ``tiles[grid](*args, **kwargs)`` launches it.

    ``grid``: a function of the block sizes (a dict) returning the launch grid. ``key``: argument names whose values
    select the tile (shape dims). ``restore``: tensor arguments the kernel adds into (restored after timing runs).
    """
    name: str
    fn: Callable
    key: Sequence[str]
    default: Tile
    candidates: List[Tile]
    restore: Sequence[str] = ("out",)
    forced: Optional[Tile] = None
    do_bench: Optional[Callable] = None  # the autotuner's timer (None: _short_bench; tests pass their own)
    _tuned: object = field(default=None, repr=False)
    _picked: Dict[tuple, Tile] = field(default_factory=dict, repr=False)  # bucketed key -> the autotuner's pick
    _key_pos: Optional[list] = field(default=None, repr=False)  # (position, name) of each key argument

    def __post_init__(self):
        if self.default not in self.candidates:
            raise ValueError(f"{self.name}: the default tile must be one of the candidates")
        REGISTRY[self.name] = self

    def tuned(self):
        """Triton's autotuner over the candidates (built on first use; timing: 5 ms warm-up, 25 ms runs)."""
        if self._tuned is None:
            configs = [triton.Config(t.meta, num_warps=t.num_warps, num_stages=t.num_stages) for t in self.candidates]
            self._tuned = triton.autotune(configs, key=list(self.key), restore_value=list(self.restore),
                                          do_bench=self.do_bench or _short_bench)(self.fn)
        return self._tuned

    def bucket(self, args, kwargs) -> tuple:
        """The tuning key of a launch: each key dim rounded up to a power of two (flags as they are), then the
        dtypes of the first two arguments (the data operands)."""
        if self._key_pos is None:
            names = list(self.fn.arg_names)
            self._key_pos = [(names.index(k), k) for k in self.key]
        key = []
        for i, name in self._key_pos:  # (on the hot path: ~4 us per launch on this 2-core CPU, timeit)
            v = args[i] if i < len(args) else kwargs[name]
            key.append(v if isinstance(v, bool) else 1 << max(0, int(v) - 1).bit_length())
        key += [args[0].dtype, args[1].dtype]  # the data operands (every tuned kernel's first two arguments)
        return tuple(key)

    def __getitem__(self, grid: Callable[[dict], tuple]):
        def launch(*args, **kwargs):
            tile = self.forced
            if tile is None and autotune_enabled():
                key = self.bucket(args, kwargs)
                tile = self._picked.get(key)
                if tile is None:  # time the candidates (the autotuner launches the fastest), remember its pick
                    out = self.tuned()[lambda meta: grid(meta)](*args, **kwargs, **LAUNCH_OPTIONS)
                    best = self._tuned.best_config
                    self._picked[key] = Tile(tuple(sorted(best.kwargs.items())), best.num_warps, best.num_stages)
                    return out
            tile = tile or self.default
            return self.fn[grid(tile.meta)](*args, **kwargs, **tile.meta, num_warps=tile.num_warps,
                                            num_stages=tile.num_stages, **LAUNCH_OPTIONS)
        return launch

    def chosen(self) -> Dict[str, str]:
        """The autotuner's pick per bucketed key so far (key values joined by ','), for the benchmark records."""
        return {",".join(map(str, k)): str(t) for k, t in self._picked.items()}


def _short_bench(fn, quantiles):
    """Triton's timer with 5 ms of warm-up and 25 ms of timed runs (its defaults: 25 and 100) per candidate."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@contextlib.contextmanager
def force(tiles: Tiles, tile: Tile):
    """Launch ``tiles``' kernel with ``tile`` (no timing) inside the block: the parity tests of every candidate."""
    previous, tiles.forced = tiles.forced, tile
    try:
        yield
    finally:
        tiles.forced = previous


def chosen_tiles() -> Dict[str, Dict[str, str]]:
    """Every registered kernel's autotuned picks (empty where nothing was tuned)."""
    return {name: t.chosen() for name, t in REGISTRY.items() if t.chosen()}


# Candidate sets shared by the kernels, four each (every candidate is compiled on the first call per dtype: a few
# seconds per kernel). The first is the default: the tile every kernel used before autotuning (32 wide, 4 warps).
# Larger tiles load fewer bytes per FLOP but give fewer programs (small batches, short sequences); the autotuner
# drops a tile that does not fit the device (shared memory, registers) and keeps the fastest of the rest.
def mma_tiles(m: str, n: str, k: str) -> List[Tile]:
    """Candidates for a [m x k] @ [k x n] tile loop (direct norm, clip-accumulate, conv tiles)."""
    return [Tile.of(**{m: 32, n: 32, k: 32}, num_warps=4, num_stages=2),
            Tile.of(**{m: 64, n: 64, k: 32}, num_warps=4, num_stages=3),
            Tile.of(**{m: 128, n: 64, k: 32}, num_warps=4, num_stages=3),
            Tile.of(**{m: 128, n: 128, k: 32}, num_warps=8, num_stages=3)]


def gram_tiles(t: str, k: str) -> List[Tile]:
    """Candidates for two [t x t] Gram tiles reduced over k (ghost norms: two fp32 accumulators per program)."""
    return [Tile.of(**{t: 32, k: 32}, num_warps=4, num_stages=2),
            Tile.of(**{t: 64, k: 32}, num_warps=4, num_stages=3),
            Tile.of(**{t: 64, k: 64}, num_warps=4, num_stages=3),
            Tile.of(**{t: 128, k: 32}, num_warps=8, num_stages=3)]
