# GPU image: NGC PyTorch carries CUDA, Transformer Engine and NVIDIA apex, so FP8 and the
# fused kernels are available. megatron-core (the tested version; it needs the image's Python
# 3.12) and this package go on top; the C++ packer is built by setup.py (pybind11 only, no torch
# build dependency).
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/megatron-prior
COPY setup.py pyproject.toml README.md ./
COPY csrc ./csrc
COPY megatron_prior ./megatron_prior
COPY tools ./tools
COPY examples ./examples

# Keep the image's CUDA torch: --no-build-isolation and no torch re-resolution.
RUN pip install --no-cache-dir "megatron-core==0.19.2" psutil sentencepiece pybind11 \
 && pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import megatron_prior._packer, megatron.core; print('megatron-prior ready')"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
