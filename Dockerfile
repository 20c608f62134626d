# Tachyon on a GPU host: CUDA runtime + cuDNN and the [gpu] extra (ONNX Runtime with the CUDA
# and TensorRT execution providers, NVML metrics, faiss-gpu), plus the text and trace
# extras; [faiss] brings tqdm for `tachyon index build`, and its faiss-cpu is swapped out.
# Everything is CUDA 12 (onnxruntime-gpu < 1.27 matches the base; 1.27+ is CUDA 13). This
# image is not verified on a GPU (see the README, GPU). The bundled
# models and the semantic-search example are built in the build stage (the examples extra
# stays there). The CPU image is Dockerfile.cpu.
#   docker build -t tachyon:0.1.0-gpu .
#   docker run --gpus all -p 8000-8002:8000-8002 tachyon:0.1.0-gpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ cmake \
      pkg-config libnghttp2-dev zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY native ./native
COPY protos ./protos
COPY server ./server
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install "scikit-build-core>=0.10" "nanobind>=2.4" \
 && /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /wheels .
# the example models, built here so that the examples extra stays out of the image
COPY model_repository /models
COPY tools/make_semantic_search.py /tools/
RUN WHEEL="$(find /wheels -name 'tachyon_serve-*.whl')" \
 && /opt/build/bin/pip install "${WHEEL}[examples]" \
 && /opt/build/bin/python /tools/make_semantic_search.py --out /models

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PATH=/opt/tachyon/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libnghttp2-14 libssl3t64 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 tachyon
COPY --from=build /wheels /wheels
# onnxruntime-gpu and faiss-gpu install the same modules as onnxruntime and faiss-cpu: swap them
RUN python3 -m venv /opt/tachyon \
 && WHEEL="$(find /wheels -name 'tachyon_serve-*.whl')" \
 && /opt/tachyon/bin/pip install "${WHEEL}[gpu,faiss,text,trace]" \
 && /opt/tachyon/bin/pip uninstall -y onnxruntime faiss-cpu \
 && /opt/tachyon/bin/pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.19,<1.27" \
      "faiss-gpu>=1.14.3" \
 && rm -rf /wheels
COPY --from=build --chown=10001:10001 /models /models
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["tachyon", "serve"]
CMD ["--model-repository", "/models"]
