"""Run megatron-core (the versions in ``TESTED_MCORE_VERSIONS``) on a machine without CUDA.

megatron-core hard-codes the CUDA device in a few dozen places (``device="cuda"``,
``torch.cuda.current_device()``, ``torch.cuda.synchronize()``, ``torch.cuda.current_stream()``,
CUDA RNG states). Rather than copying the functions that do so, each affected module gets its
own view of ``torch`` in which the CUDA device *is* the CPU: tensor factories map ``"cuda"`` to
``"cpu"`` and ``torch.cuda`` answers with the CPU generator, device and stream. The modules are
listed by name in ``PATCHED_MODULES`` so the reach of the shim is explicit; nothing outside them
changes.

Four kinds of site cannot be reached that way and get a targeted patch: the model-parallel
RNG tracker (forks the CPU generator instead of a CUDA one), gradient clipping (asserts
``torch.cuda.FloatTensor`` gradients; replaced by the same code checking fp32), the bf16 and
the distributed optimizers' constructors (sort parameters by ``torch.cuda.*`` type names; run
with CPU tensors reporting those names), and the two methods that call
``Tensor.cuda()`` (``CLIPViTModel.__init__`` on a buffer,
``LanguageModule.setup_embeddings_and_output_layer`` on tied embeddings), which run with
``Tensor.cuda`` as the identity.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, Iterator

import torch
from megatron.core.package_info import __version__ as mcore_version

log = logging.getLogger(__name__)

CPU = torch.device("cpu")

# The megatron-core modules whose CUDA device references are redirected, each with the
# reason it needs it (what would fail on CPU without it). Inference-only, CUDA-graph, fp16
# loss-scaling and distributed-optimizer paths are left alone: this fork does not use them
# on CPU, and tests/test_cpu_shim.py exercises every entry listed here.
PATCHED_MODULES: dict[str, str] = {
    "megatron.core.utils": "GlobalMemoryBuffer and local_multi_tensor_l2_norm allocate on cuda",
    "megatron.core.transformer.utils": "get_default_causal_mask builds the mask on cuda",
    "megatron.core.tensor_parallel.random": "RNG tracker and activation recompute use cuda RNG",
    "megatron.core.tensor_parallel.layers": "gathered inputs allocated on current_device()",
    "megatron.core.tensor_parallel.mappings": "all-gather outputs allocated on current_device()",
    "megatron.core.tensor_parallel.utils": "split/gather buffers on current_device()",
    "megatron.core.pipeline_parallel.schedules": "token counters created with device='cuda'",
    "megatron.core.pipeline_parallel.p2p_communication": "shape exchange on cuda, synchronize()",
    "megatron.core.distributed.param_and_grad_buffer":
        "grad buffers on current_device(); start_grad_sync waits on current_stream()",
    "megatron.core.distributed.distributed_data_parallel": "buffer (re)allocation syncs cuda",
    "megatron.core.optimizer.clip_grads":
        "grad-norm buffers on device='cuda'; clipping asserts torch.cuda.FloatTensor grads",
    "megatron.core.optimizer.optimizer":
        "optimizer buffers on device='cuda'; the bf16 optimizer accepts only torch.cuda.* type names",
    "megatron.core.optimizer.distrib_optimizer":
        "shard buffers on current_device(); the distributed optimizer accepts only torch.cuda.* type names",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "checkpoint writers synchronize cuda before copying tensors",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "save-failure flag broadcast from current_device()",
    "megatron.core.timers": "timers synchronize cuda and gather on current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to cuda",
    "megatron.core.models.vision.clip_vit_model": "position_ids moved to cuda",
    "megatron.core.models.common.language_module.language_module":
        "tied embeddings moved to cuda before the first/last-stage all-reduce",
    "megatron.core.models.multimodal.llava_model":
        "empty sound embeddings allocated on current_device() when no sound clips are given",
}

# The megatron-core versions this shim was written and tested against.
TESTED_MCORE_VERSIONS = ("0.19.2",)

_TENSOR_FACTORIES = (
    "arange", "empty", "empty_like", "full", "full_like", "ones", "ones_like",
    "rand", "randn", "randint", "tensor", "zeros", "zeros_like", "as_tensor",
)


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:0"``, an int, a torch.device) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        # CUDA pinned memory does not exist without a CUDA driver.
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _CpuStream:
    """The CPU's only stream: its work runs in program order, so every wait is already met."""

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None


_CPU_STREAM = _CpuStream()


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by a patched module: the CPU plays the CUDA device."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return CPU

    @staticmethod
    def current_stream(device: Any = None) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by a patched module."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _TENSOR_FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda() -> Iterator[None]:
    """``Tensor.type()`` answers ``torch.cuda.X`` for a CPU ``torch.X`` (type checks only)."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _run_inside(cls: type, method: str, context) -> None:
    """Run ``cls.method`` inside ``context()``."""
    original = getattr(cls, method)
    if getattr(original, "_megatron_prior_cpu", False):
        return

    @functools.wraps(original)
    def on_cpu(self, *args, **kwargs):
        with context():
            return original(self, *args, **kwargs)

    on_cpu._megatron_prior_cpu = True  # type: ignore[attr-defined]
    setattr(cls, method, on_cpu)


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 without its ``torch.cuda.FloatTensor``
    assertion: the same fp32 check on the dtype, the same clip coefficient."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in params if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype != torch.float32 and not (use_decoupled_grad and grad.dtype == torch.bfloat16):
            raise TypeError(f"clip_grad_by_total_norm_fp32 needs fp32 gradients, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _make_cpu_tracker_class(random_module: types.ModuleType) -> type:
    base = random_module.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):  # type: ignore[valid-type, misc]
        """Megatron's RNG tracker over the CPU generator.

        Each named state (data-parallel, model-parallel, expert) is a CPU generator state;
        ``fork`` swaps it in and out exactly as the CUDA tracker swaps CUDA states, so dropout
        inside tensor-parallel regions differs across TP ranks as it does on GPUs.
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name: str = random_module._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    CpuRNGStatesTracker._megatron_prior_cpu = True
    return CpuRNGStatesTracker


def _patch_module(name: str) -> None:
    module = importlib.import_module(name)
    if isinstance(getattr(module, "torch", None), _CpuTorch):
        return
    module.torch = _CpuTorch()
    if name == "megatron.core.tensor_parallel.random":
        module._get_cuda_rng_state = _get_cpu_rng_state
        module._set_cuda_rng_state = _set_cpu_rng_state
        module.CudaRNGStatesTracker = _make_cpu_tracker_class(module)
        # A tracker created before the patch would still be a CUDA one.
        module.initialize_rng_tracker(force_reset=True)
    elif name == "megatron.core.optimizer.clip_grads":
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    elif name == "megatron.core.optimizer.optimizer":
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
        # bf16 training: the mixed-precision optimizer sorts parameters by CUDA type names.
        _run_inside(module.Float16OptimizerWithFloat16Params, "__init__", _cpu_tensors_named_as_cuda)
    elif name == "megatron.core.optimizer.distrib_optimizer":
        _run_inside(module.DistributedOptimizer, "__init__", _cpu_tensors_named_as_cuda)
    elif name == "megatron.core.models.vision.clip_vit_model":
        _run_inside(module.CLIPViTModel, "__init__", _tensor_cuda_is_identity)
    elif name == "megatron.core.models.common.language_module.language_module":
        _run_inside(module.LanguageModule, "setup_embeddings_and_output_layer", _tensor_cuda_is_identity)


_applied = False


def check_version(mcore_version: str) -> bool:
    """Warn (once per call) when megatron-core is a version the shim was not tested with."""
    # Builds carry the commit as a local version label ("0.19.2+0d471a6"); the release decides.
    if mcore_version.split("+", 1)[0] in TESTED_MCORE_VERSIONS:
        return True
    log.warning(
        "megatron-prior's CPU shim was tested with megatron-core %s; found %s. "
        "CPU runs may fail where that version hard-codes CUDA in new places.",
        "/".join(TESTED_MCORE_VERSIONS),
        mcore_version,
    )
    return False


def apply() -> bool:
    """Apply the shim when CUDA is absent. Idempotent. Returns whether it is in effect."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    check_version(mcore_version)
    for name in PATCHED_MODULES:
        _patch_module(name)
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
