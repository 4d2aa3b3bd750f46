"""Datasets for ``timm-nofrost train``: re-exported from ``timm_nofrost.data.sources``, the one resolver that
``train`` and ``eval`` share (kept so that existing imports keep working)."""
from ..data.sources import (
    IMG_EXTENSIONS, DataSource, build_datasets, check_image_folder, holdout_split, image_fingerprint,
    spread_indices)

__all__ = ['DataSource', 'build_datasets', 'check_image_folder', 'spread_indices', 'IMG_EXTENSIONS',
           'holdout_split', 'image_fingerprint']
