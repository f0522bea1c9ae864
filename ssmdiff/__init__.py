"""ssmdiff: diffusion models with state-space backbones (DiS, DiffuSSM, DiM) and the DiT baseline."""

__version__ = "0.1.0"
