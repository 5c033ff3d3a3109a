# kaapcli in a container: Debian slim, kaapcli's wheel built from this repository, and the DICOM tools that
# rules, --on-complete hooks and people at a shell call beside it (kaapcli itself runs none of them).
#
#   docker build -t kaapcli:0.1.0 .
#   docker run --rm -v "$PWD:/data" kaapcli:0.1.0 dcm2json /data/in -o /data/meta
#
# The install and smoke steps below are what tests/test_packaging.py runs outside Docker.
ARG DEBIAN=bookworm

FROM debian:${DEBIAN}-slim AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE MANIFEST.in ./
COPY kaapcli ./kaapcli
COPY man ./man
COPY completions ./completions
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir "build>=1.2" \
    && /opt/build/bin/python -m build --wheel --outdir /dist .

FROM debian:${DEBIAN}-slim
LABEL org.opencontainers.image.title="kaapcli" \
      org.opencontainers.image.description="Kaapana's DICOM processing operators as one Unix command-line toolkit" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       python3 python3-venv dcmtk dcm2niix dicom3tools \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/kaapcli \
    && /opt/kaapcli/bin/pip install --no-cache-dir /tmp/dist/*.whl \
    && rm -rf /tmp/dist
ENV PATH=/opt/kaapcli/bin:$PATH
# smoke: the installed kaapcli starts, writes DICOM and reads it back
RUN kaapcli --version && kaapcli mock -o /tmp/smoke/ct --slices 2 --rows 16 --columns 16 -q \
    && kaapcli dcm2json /tmp/smoke/ct -o /tmp/smoke/meta -q && rm -rf /tmp/smoke
RUN useradd --uid 1000 --create-home kaapcli
USER kaapcli
WORKDIR /data
ENTRYPOINT ["kaapcli"]
CMD ["--help"]
