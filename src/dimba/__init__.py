"""dimba: diffusion language models with bidirectional Mamba denoisers.

>>> from dimba import DIMBA, sample_from_model, compute_dimba_losses
"""

from dimba.config import Config, load_config
from dimba.data.tokenizer import Tokenizer
from dimba.families import Family, compute_dimba_losses, compute_losses, get_family, register_family
from dimba.generation import sample_from_model
from dimba.model import DIMBA, build_model
from dimba.samplers.ar import ARSampler
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.hybrid import HybridSampler
from dimba.samplers.masked import MaskedSampler

__version__ = "0.1.0"

__all__ = ["ARSampler", "DIMBA", "Config", "DDIMSampler", "Family", "HybridSampler", "MaskedSampler", "Tokenizer",
           "build_model", "compute_dimba_losses", "compute_losses", "get_family", "load_config", "register_family",
           "sample_from_model", "__version__"]
