# syntax=docker/dockerfile:1
# The MLflow tracking server with the PostgreSQL driver and boto3 (S3 artifacts); the official MLflow image has
# neither. Versions are the project's pins (pyproject.toml; tests/test_infra.py checks they agree). No files needed:
#   docker build -f infra/images/mlflow.Dockerfile -t mri-platform-mlflow:3.17.2 infra/images
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.8
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
    && useradd --create-home --uid 1000 mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
# Settings come from MLFLOW_* variables (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, ...) and arguments.
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
