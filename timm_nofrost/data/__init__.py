"""Data: the embedded demo dataset."""
from .demo import DEMO_CLASSES, DEMO_MEAN, DEMO_STD, NoFrostShapes, render_shapes, write_image_folder

__all__ = ['DEMO_CLASSES', 'DEMO_MEAN', 'DEMO_STD', 'NoFrostShapes', 'render_shapes', 'write_image_folder']
