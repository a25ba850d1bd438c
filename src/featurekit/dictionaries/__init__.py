"""Sparse dictionaries: one `Dictionary` interface, one small file per method.

Each method file registers its class and hyper-parameters (`registry.register`); importing it here is
what puts it in `METHODS`, the one list of methods (docs/methods.md, "Adding a method")."""

from .base import Dictionary, Output
from .batchtopk import BatchAbsTopKSAE, BatchTopKSAE
from .choice import FeatureChoiceSAE, MutualChoiceSAE
from .clt import CrossLayerTranscoder
from .fileformat import build, build_from_config, load, read_meta, save
from .gba import GBASAE
from .gsae import GradientSAE
from .itda import ITDADictionary, ITDAFitter
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .mpsae import MPSAE
from .registry import METHODS, HyperParams, method_class, register
from .relu import ReLUSAE
from .snmf import SNMFDictionary, SNMFFitter
from .topafa import TopAFASAE
from .topk import AbsTopKSAE, TopKSAE
from .transcoder import SkipTranscoder, Transcoder
from .vsae import VariationalSAE

__all__ = [
    "METHODS", "Dictionary", "HyperParams", "Output", "build", "build_from_config", "load", "method_class", "read_meta",
    "register", "save",
    "AbsTopKSAE", "BatchAbsTopKSAE", "BatchTopKSAE", "CrossLayerTranscoder", "FeatureChoiceSAE", "GBASAE", "GradientSAE", "ITDADictionary",
    "ITDAFitter", "JumpReLUSAE", "MPSAE", "MatryoshkaSAE", "MutualChoiceSAE", "ReLUSAE", "SNMFDictionary", "SNMFFitter",
    "SkipTranscoder", "TopAFASAE", "TopKSAE", "Transcoder", "VariationalSAE",
]
