"""The architectures and how they are built: the reference LM (GPTModel), the H-LVLM
(LLaVAModel) and the U-LVLM, each one ``Arch`` in ``ARCHS`` (``megatron_prior.models.arch``).

Each architecture is defined and registered in a module of its own (``gpt.py``, ``hlvlm.py``,
``ulvlm.py``). Importing this package imports every module of it that registers one, found by
``architecture_modules``, so a new architecture is one new file (plus its test): no list names it.
"""

import importlib
import re
from pathlib import Path

from megatron_prior.models.arch import ARCHS, Arch, get_arch

# A module registers an architecture at its top level: ``NAME = register(Arch(`` or ``register(Arch(``.
_REGISTERS = re.compile(r"^(?:\w+\s*=\s*)?register\(Arch\(", re.MULTILINE)


def architecture_modules() -> list[str]:
    """The names of this package's modules that register an architecture, sorted (they are
    imported in this order; ``ARCHS`` is in registration order). Read from their source rather than by importing every module:
    ``checkpoint`` imports ``models.config`` (so this package), and the modules that load
    checkpoints would import it back half-initialised."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py")
                  if p.stem != "__init__" and _REGISTERS.search(p.read_text(encoding="utf-8")))


for _name in architecture_modules():
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["ARCHS", "Arch", "architecture_modules", "get_arch"]
