# The distbreaker image of docker-compose.yml: the library with its Prometheus extra, the
# `distbreaker` CLI, and the examples (voice worker, provider simulator, load generator).
#
#   docker build -t distbreaker .
#   docker run --rm distbreaker                       # distbreaker --help
#   docker run --rm -e DISTBREAKER_REDIS_URL=redis://host:6379/0 distbreaker distbreaker list
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# What the wheel is built from first, so editing the examples does not reinstall.
COPY pyproject.toml README.md CHANGELOG.md ./
COPY lua ./lua
COPY distbreaker ./distbreaker
RUN pip install ".[prometheus]"

COPY examples ./examples

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 8080 8090 9464
CMD ["distbreaker", "--help"]
