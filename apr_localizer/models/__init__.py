"""Torch models: MS-Transformer (APR), pose auto-encoders and the iAPR relative pose regressor."""

from .backbone import EfficientNetB0Features, calibrate_batchnorm
from .losses import CameraPoseLoss, scene_nll_loss
from .ms_transformer import MSTransformer, MSTransformerConfig, PoseRegressor, build_ms_transformer
from .pae import PAEConfig, PoseAutoEncoder, build_pae, nerf_encoding
from .rpr import IAPR, IAPRConfig, build_iapr, localize_apr_iapr

__all__ = [
    "IAPR",
    "CameraPoseLoss",
    "EfficientNetB0Features",
    "IAPRConfig",
    "MSTransformer",
    "MSTransformerConfig",
    "PAEConfig",
    "PoseAutoEncoder",
    "PoseRegressor",
    "build_iapr",
    "calibrate_batchnorm",
    "build_ms_transformer",
    "build_pae",
    "localize_apr_iapr",
    "nerf_encoding",
    "scene_nll_loss",
]
