"""Sparse dictionaries: one `Dictionary` interface, one small file per method."""

from .base import Dictionary, Output
from .batchtopk import BatchAbsTopKSAE, BatchTopKSAE
from .choice import FeatureChoiceSAE, MutualChoiceSAE
from .fileformat import METHODS, build, build_from_config, load, read_meta, save
from .gba import GBASAE
from .gsae import GradientSAE
from .itda import ITDADictionary, ITDAFitter
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .mpsae import MPSAE
from .relu import ReLUSAE
from .snmf import SNMFDictionary, SNMFFitter, fit_snmf
from .topafa import TopAFASAE
from .topk import AbsTopKSAE, TopKSAE
from .transcoder import SkipTranscoder, Transcoder
from .vsae import VariationalSAE

__all__ = [
    "AbsTopKSAE", "BatchAbsTopKSAE", "BatchTopKSAE", "Dictionary", "GradientSAE", "Output", "METHODS", "build", "build_from_config",
    "FeatureChoiceSAE", "MatryoshkaSAE", "MutualChoiceSAE",
    "load", "read_meta", "save", "JumpReLUSAE", "ReLUSAE", "TopAFASAE", "TopKSAE", "VariationalSAE",
    "GBASAE", "MPSAE", "SkipTranscoder", "Transcoder",
    "ITDADictionary", "ITDAFitter",
    "SNMFDictionary", "SNMFFitter", "fit_snmf",
]
