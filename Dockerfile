# One image for the web app and the workers.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml ./
COPY static/package.json static/package-lock.json static/
COPY . .
# Python packages, front-end libraries; the default model is provisioned at
# start into the shared data volume (see docker-compose.yml).
RUN RLHF_SKIP_MODEL=1 scripts/setup.sh

ENV PATH=/app/.venv/bin:$PATH \
    RLHF_DATA_DIR=/data \
    RLHF_HOST=0.0.0.0
EXPOSE 8000
CMD ["rlhf", "serve", "--no-worker"]
