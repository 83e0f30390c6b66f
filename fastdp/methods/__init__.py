"""Sparse DP methods on the engine (specs: ../shared/docs/methods.md)."""
from fastdp.methods.adadpigu import AdaDPIGU
from fastdp.methods.baselines import BiTFiT, LastLayer, RandomGroups
from fastdp.methods.random_sparsification import RandomSparsification
from fastdp.methods.sparta import SPARTA

__all__ = ["AdaDPIGU", "BiTFiT", "LastLayer", "RandomGroups", "RandomSparsification", "SPARTA"]
