#!/bin/sh
# Keeps a pod's model store (an emptyDir at KVREC_MODEL_STORE) and a bucket in step, one whole
# version at a time, with rclone (the bucket: KVREC_MODEL_BUCKET, e.g. store:my-bucket/kvrec,
# the remote `store` configured by RCLONE_CONFIG_STORE_* variables). The store's layout is
# model/store.py's: <root>/<model name>/<version>/, complete when its manifest.json is there.
#
#   pull       every KVREC_SYNC_INTERVAL_S (a worker's sidecar): each complete version of the
#              bucket that is not here is copied into a staging folder and renamed into place
#              (atomic: the worker sees a whole version or none; an announced version not
#              here yet is retried by the worker); a version gone from the bucket goes here too
#   push       every interval and once more when stopped (the retrain pod's sidecar): each
#              local version not in the bucket is uploaded, manifest.json last (a version with
#              its manifest in the bucket is complete); a version gone here (pruned) goes from
#              the bucket too, but only once `pull-once` has filled this store from the bucket
#   pull-once, push-once: one round (the retrain pod's init container runs pull-once)
# A round that fails (the bucket unreachable) changes nothing and is retried the next time.
set -u
mode="${1:-}"
root="${KVREC_MODEL_STORE:-/models}"
remote="${KVREC_MODEL_BUCKET:?KVREC_MODEL_BUCKET names the bucket}/${KVREC_MODEL_NAME:-default}"
local="$root/${KVREC_MODEL_NAME:-default}"
interval="${KVREC_SYNC_INTERVAL_S:-30}"
pulled="$root/.kvrec-pulled"

remote_dirs() {  # every version folder in the bucket; status 1 if the bucket cannot be listed
  if listing="$(rclone lsf --dirs-only "$remote/")"; then :; else
    status=$?
    [ "$status" -eq 3 ] || return 1  # 3: directory not found, an empty store
    listing=""
  fi
  for dir in $listing; do
    case "$dir" in .*) ;; *) echo "${dir%/}" ;; esac
  done
}

remote_complete() {  # the bucket's versions with their manifest
  dirs="$(remote_dirs)" || return 1
  for version in $dirs; do
    found="$(rclone lsf --files-only --include manifest.json "$remote/$version/")" || return 1
    [ -z "$found" ] || echo "$version"
  done
}

local_complete() {
  for dir in "$local"/*/; do
    [ -f "${dir}manifest.json" ] || continue
    version="$(basename "$dir")"
    case "$version" in .*) ;; *) echo "$version" ;; esac
  done
}

has() {  # has WORD LIST...
  word="$1"; shift
  for item in "$@"; do [ "$item" = "$word" ] && return 0; done
  return 1
}

pull() {
  mkdir -p "$local" || return 1
  versions="$(remote_complete)" || return 1
  for version in $versions; do
    [ -d "$local/$version" ] && continue
    staging="$local/.staging-sync-$version"
    rm -rf "$staging"
    rclone copy "$remote/$version" "$staging" || { rm -rf "$staging"; return 1; }
    mv "$staging" "$local/$version" || return 1
    echo "model-sync: pulled $version"
  done
  # shellcheck disable=SC2086
  for version in $(local_complete); do
    has "$version" $versions && continue
    rm -rf "${local:?}/$version" && echo "model-sync: removed $version (gone from the bucket)"
  done
  return 0
}

push() {
  [ -d "$local" ] || return 0
  complete="$(remote_complete)" || return 1
  for version in $(local_complete); do
    # shellcheck disable=SC2086
    has "$version" $complete && continue
    rclone copy --exclude manifest.json "$local/$version" "$remote/$version" || return 1
    rclone copyto "$local/$version/manifest.json" "$remote/$version/manifest.json" || return 1
    echo "model-sync: pushed $version"
  done
  [ -f "$pulled" ] || return 0  # never empty the bucket from a store that was not filled from it
  dirs="$(remote_dirs)" || return 1
  for version in $dirs; do
    [ -d "$local/$version" ] && continue
    rclone purge "$remote/$version" || return 1
    echo "model-sync: removed $version from the bucket (gone from the store)"
  done
  return 0
}

case "$mode" in
  pull-once) pull && touch "$pulled" ;;
  push-once) push ;;
  pull|push)
    stop=0
    trap 'stop=1' TERM INT
    while [ "$stop" = 0 ]; do
      "$mode" || echo "model-sync: $mode failed; again in $interval s" >&2
      sleep "$interval" &
      wait $! || true
    done
    if [ "$mode" = push ]; then push; fi
    ;;
  *) echo "usage: model-sync.sh pull|push|pull-once|push-once" >&2; exit 2 ;;
esac
