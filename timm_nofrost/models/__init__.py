"""NoFrost model family; importing this package registers the models with timm."""
from .nfnet import HF_HUB_ORG, NOFROST_RECIPE_DEFAULTS, NoFrostCfg, NormFreeBasicBlock, NormFreeBasicResNet
from ._pretrained import build_nofrost_model, describe_pretrained_source, explain_load_errors
from .converted import CONVERTED_ARCH, create_converted
