# gradserve server images.
#   GPU (default target): docker build -t gradserve .
#   CPU:                  docker build --target cpu -t gradserve:cpu .
# Both install the wheel built in the first stage (never an editable install) and run as
# an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build the wheel ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY kernels ./kernels
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir build && python -m build --wheel --outdir /wheels

# --- CPU server: slim Python with the CPU build of torch ----------------------------
FROM ${PYTHON_IMAGE} AS cpu
# Where pip finds torch: PyTorch's CPU-only wheel index, so the image carries no CUDA
# libraries (PyPI's torch wheel pulls several GB of them). Empty: the default index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.4"
RUN useradd --create-home --uid 10001 gradserve
COPY --from=wheel /wheels /wheels
# The server extra's triton runs kernels on GPUs only (a CPU server's engine is torch), and
# takes about 1 GB installed (triton 3.9): removed again.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} "${TORCH_SPEC}" \
 && pip install --no-cache-dir "$(ls /wheels/gradserve-*.whl)[server]" \
 && pip uninstall --yes triton \
 && rm -rf /wheels
USER gradserve
ENV GRADSERVE_HOST=0.0.0.0 GRADSERVE_PORT=50051 GRADSERVE_METRICS_PORT=9100 \
    GRADSERVE_DEVICE=cpu
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s \
  CMD ["gradserve-client", "--address", "127.0.0.1:50051", "health"]
ENTRYPOINT ["gradserve-server"]

# --- GPU server: slim Python with a CUDA build of torch -----------------------------
FROM ${PYTHON_IMAGE} AS gpu
# torch 2.11.0 for CUDA 13.0 from PyTorch's wheel index, with the triton 3.6 it pins: what
# the kernels are checked and timed with on GPUs (bench/results/kernels_gpu_h100.md; they
# need a triton of 3.6 or newer). The CUDA libraries come in the wheels, the driver from the
# host through the NVIDIA container runtime: CUDA 13 needs driver 580 or newer; for an older
# one build with GPU_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (driver 570).
ARG GPU_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG GPU_TORCH_SPEC="torch==2.11.0"
# Triton's kernel cache in its own directory, owned by the server's user, so that a volume
# mounted there (docker-compose.yml) keeps compiled kernels across restarts; the server
# bounds it (--max-kernel-cache-bytes).
ENV TRITON_CACHE_DIR=/var/cache/gradserve/triton
RUN useradd --create-home --uid 10001 gradserve \
 && mkdir -p "${TRITON_CACHE_DIR}" && chown -R gradserve /var/cache/gradserve
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --index-url "${GPU_TORCH_INDEX_URL}" "${GPU_TORCH_SPEC}" \
 && pip install --no-cache-dir "$(ls /wheels/gradserve-*.whl)[server]" \
 && rm -rf /wheels
USER gradserve
ENV GRADSERVE_HOST=0.0.0.0 GRADSERVE_PORT=50051 GRADSERVE_METRICS_PORT=9100 \
    GRADSERVE_DEVICE=auto
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
  CMD ["gradserve-client", "--address", "127.0.0.1:50051", "health"]
ENTRYPOINT ["gradserve-server"]
