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
# examples/gpu_check.sh runs the CUDA tests and the benchmarks inside the image.
COPY tests ./tests
COPY benchmarks ./benchmarks

# Keep the image's CUDA torch: --no-build-isolation and no torch re-resolution.
# The package's other requirements (setup.py's install_requires), listed here because of --no-deps.
RUN pip install --no-cache-dir "megatron-core==0.19.2" psutil sentencepiece pybind11 pyyaml tqdm \
      "transformers>=4.45" "tokenizers>=0.15" "safetensors>=0.4" "webdataset>=0.2.90" pytest pytest-timeout \
 && pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import megatron_prior._packer, megatron.core; print('megatron-prior ready')"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
