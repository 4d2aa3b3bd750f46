"""Normalizer-free conversion of BatchNorm networks."""
from .normfree import INIT_MODES, NormFreeConversionError, convert_to_normfree, normfree_blocks
from .report import BlockReport, ConversionReport
from .export import convert_and_export
