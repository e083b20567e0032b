# edgebundle as a one-shot job image.
#
#   CPU (default):       docker build -t edgebundle .
#   GPU with TensorRT:   docker build -t edgebundle:gpu \
#                          --build-arg BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3 \
#                          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#                          --build-arg EXTRAS=tensorrt .
#   run:                 docker run --rm -v "$PWD:/work" edgebundle run recipe.yaml -o bundles
#
# A job runs to completion and exits (0 ok, 1 regression from `check`, 2 error): no HEALTHCHECK.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# 1. torch from the index that matches the variant (CPU wheel, or CUDA for the GPU base): the biggest,
#    least often changed layer comes first.
RUN python3 -m pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# 2. the other dependencies, from pyproject.toml alone (an empty package stands in for the source), so
#    editing the code does not reinstall them.
WORKDIR /opt/edgebundle
COPY pyproject.toml README.md ./
# DL3013 (pin pip versions) does not apply: "." is this project; its dependencies' bounds are in pyproject.
# hadolint ignore=DL3013
RUN mkdir edgebundle && touch edgebundle/__init__.py \
    && python3 -m pip install ".${EXTRAS:+[${EXTRAS}]}" \
    && rm -rf edgebundle build ./*.egg-info

# 3. the source itself.
COPY edgebundle ./edgebundle
RUN python3 -m pip install --no-deps . && rm -rf build ./*.egg-info

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin edgebundle \
    && mkdir /work && chown edgebundle /work
USER 10001
WORKDIR /work

ENTRYPOINT ["edgebundle"]
CMD ["--help"]
