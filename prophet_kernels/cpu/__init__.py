"""Routed experts computed on the host CPU (``miss: cpu``): the native backend and its build
(:mod:`native`), the layer call's CPU part (:mod:`experts`)."""

from .experts import BACKENDS, CpuExperts, available_cpus, pairs_of

__all__ = ["BACKENDS", "CpuExperts", "available_cpus", "pairs_of"]
