# syntax=docker/dockerfile:1
# The Bento as an image, for where no Docker daemon runs `bentoml containerize`: the same layout as the Dockerfile
# BentoML 1.4 generates (user bentoml, uid 1034; the Bento in /home/bentoml/bento; port 3000). The build context is
# the built Bento's folder, as for `bentoml containerize`:
#   mri-platform build                                   # bentoml build: the Bento mri-denoiser:<version>
#   docker build -f infra/images/bento.Dockerfile -t mri-denoiser:<version> \
#       "$(bentoml get mri-denoiser:<version> -o path)"
# With a daemon, `bentoml containerize mri-denoiser:<version>` makes the equivalent image under the same name.
FROM python:3.11-slim
ENV LANG=C.UTF-8 LC_ALL=C.UTF-8 PYTHONIOENCODING=UTF-8 PYTHONUNBUFFERED=1
RUN groupadd --gid 1034 bentoml && useradd --create-home --uid 1034 --gid 1034 --system bentoml
ENV BENTO_PATH=/home/bentoml/bento BENTOML_HOME=/home/bentoml/ BENTOML_CONTAINERIZED=true BENTOML_DO_NOT_TRACK=true
WORKDIR /home/bentoml/bento

# Dependencies first, so that a new model (same requirements) reuses this layer. As BentoML does, requirements are
# resolved from src/ (where the Bento's local paths point) when the Bento has one.
COPY --chown=bentoml:bentoml env/python ./env/python/
COPY --chown=bentoml:bentoml src ./src/
RUN pip install --no-cache-dir bentoml==1.4.40 \
    && cd src && pip install --no-cache-dir -r ../env/python/requirements.txt
COPY --chown=bentoml:bentoml . ./

USER bentoml
# 3000: the API, /livez, /readyz and /metrics (Prometheus).
EXPOSE 3000
CMD ["bentoml", "serve", "/home/bentoml/bento", "--host", "0.0.0.0", "--port", "3000"]
