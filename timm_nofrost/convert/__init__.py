"""Normalizer-free conversion of BatchNorm networks (writing a converted model out lives in ``timm_nofrost.hub``)."""
from .normfree import INIT_MODES, NormFreeConversionError, convert_to_normfree, normfree_blocks
from .conversion_report import BlockReport, ConversionReport
