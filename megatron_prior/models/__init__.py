"""The architectures and how they are built: the reference LM (GPTModel), the H-LVLM
(LLaVAModel) and the U-LVLM, each one ``Arch`` in ``ARCHS`` (``megatron_prior.models.arch``).

Each architecture registers itself in its model file; importing them here fills the registry
before any module of the package is used. A new architecture is a new file that defines and
registers its ``Arch``, plus its import below.
"""

from megatron_prior.models import gpt, hlvlm, ulvlm  # noqa: F401  (each registers its Arch)
from megatron_prior.models.arch import ARCHS, Arch, get_arch

__all__ = ["ARCHS", "Arch", "get_arch"]
