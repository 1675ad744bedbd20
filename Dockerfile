# extproc-host in a container: the ext_proc host (the default command) and, from the same
# image, the echo upstream (`echo --listen 0.0.0.0:8080`). See docker-compose.yaml.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY host/ host/
COPY plugins/ plugins/
COPY config/ config/
RUN pip install --no-cache-dir . && mkdir -p /data/tee

EXPOSE 9001 8080
ENTRYPOINT ["extproc-host"]
CMD ["--config", "config/full_duplex.toml", "--listen", "0.0.0.0:9001"]
