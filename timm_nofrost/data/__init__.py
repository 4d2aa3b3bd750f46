"""Data: the embedded demo dataset, and the data sources shared by ``train`` and ``eval``."""
from .demo import DEMO_CLASSES, DEMO_MEAN, DEMO_STD, NoFrostShapes, render_shapes, write_image_folder
from .sources import (
    DataSource, SourceSpec, build_datasets, build_eval_dataset, image_fingerprint, pixel_eval_transform,
    resolve_source, source_data_config)

__all__ = ['DEMO_CLASSES', 'DEMO_MEAN', 'DEMO_STD', 'NoFrostShapes', 'render_shapes', 'write_image_folder',
           'DataSource', 'SourceSpec', 'build_datasets', 'build_eval_dataset', 'image_fingerprint',
           'pixel_eval_transform', 'resolve_source', 'source_data_config']
