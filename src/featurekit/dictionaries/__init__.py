"""Sparse dictionaries: one `Dictionary` interface, one small file per method."""

from .base import Dictionary, Output
from .batchtopk import BatchAbsTopKSAE, BatchTopKSAE
from .fileformat import METHODS, build, build_from_config, load, read_meta, save
from .jumprelu import JumpReLUSAE
from .relu import ReLUSAE
from .topk import AbsTopKSAE, TopKSAE

__all__ = [
    "AbsTopKSAE", "BatchAbsTopKSAE", "BatchTopKSAE", "Dictionary", "Output", "METHODS", "build", "build_from_config",
    "load", "read_meta", "save", "JumpReLUSAE", "ReLUSAE", "TopKSAE",
]
