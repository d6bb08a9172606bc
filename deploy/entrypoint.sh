#!/bin/sh
# The image's entry point: the exports made in its build stage (with torch) seed the model cache on the data
# volume, where the server writes its locks and this CPU's runtime timings; an export already there is kept.
set -eu
cache="${INFERENCE_MODEL_CACHE_DIR:-/data/model-cache}"
mkdir -p "$cache"
cp -Rn /opt/inference/model-cache/. "$cache/"
exec "$@"
