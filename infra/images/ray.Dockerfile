# syntax=docker/dockerfile:1
# The Ray head and workers, with the platform installed, for KubeRay. Build from the repository root; the tag starts
# with the Ray version because KubeRay's rayVersion must equal it (tests/test_infra.py checks both):
#   docker build -f infra/images/ray.Dockerfile -t mri-platform-ray:2.60.0-py311-gpu .                  # CUDA nodes
#   docker build -f infra/images/ray.Dockerfile --build-arg VARIANT=py311 -t mri-platform-ray:2.60.0-py311 .  # CPU
# Ray's own images carry Ray, Python 3.11 and (for -gpu) CUDA; pip keeps their Ray since the project pins the same one.
ARG RAY_VERSION=2.60.0
ARG VARIANT=py311-gpu
FROM rayproject/ray:${RAY_VERSION}-${VARIANT}
ARG RAY_VERSION

# Only what the package needs (ray.Dockerfile.dockerignore keeps .venv and .state out of the build context).
WORKDIR /home/ray/mri-platform
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mri_platform ./mri_platform
COPY --chown=ray:users tuning ./tuning
RUN pip install --no-cache-dir . \
    && python -c "import ray, mri_platform, tuning; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The embedded defaults (sqlite store, local checkpoints) are never used on a cluster, where MLFLOW_TRACKING_URI and
# --storage s3://... point elsewhere; this only keeps stray state out of the working directory.
ENV MRI_PLATFORM_HOME=/home/ray/.mri-platform
WORKDIR /home/ray
