"""dimba: diffusion language models with bidirectional Mamba denoisers.

>>> from dimba import DIMBA, sample_from_model, compute_dimba_losses
"""

from dimba.config import Config, load_config
from dimba.generate import sample_from_model
from dimba.losses import compute_dimba_losses, compute_losses
from dimba.model import DIMBA, build_model
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.hybrid import HybridSampler
from dimba.samplers.masked import MaskedSampler
from dimba.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["DIMBA", "Config", "DDIMSampler", "HybridSampler", "MaskedSampler", "Tokenizer", "build_model",
           "compute_dimba_losses", "compute_losses", "load_config", "sample_from_model", "__version__"]
