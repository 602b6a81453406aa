"""Tell a StatefulSet scale-down from a restart at SIGTERM, so that only a scale-down leaves.

A pod of a StatefulSet gets SIGTERM both when it restarts (a rolling update, a drain, a
delete) and when a scale-down removes it. A static member must keep its identity through the
first (its partitions wait for it) and leave the group at once for the second (otherwise its
partitions have no owner for the session timeout). Kubernetes says which it is the way a
StatefulSet works: a scale-down lowers `spec.replicas` first and then removes the pods with the
highest ordinals, so a pod is being scaled away exactly when its ordinal (the number after the
last `-` of its name, `kvrec-worker-3`) is >= `spec.replicas`.

With `--leave-on-scale-down` the worker asks the in-cluster Kubernetes API for its StatefulSet's
`spec.replicas` when it stops on SIGTERM (stdlib HTTPS, the pod's service-account token and CA)
and leaves the group when `is_scale_down` says so. Any failure to ask (no API, 403, a timeout)
is one WARNING line and the static identity is kept: the safe default is a restart (the worst
case is the old gap, never a restart that loses its partitions' warm owner).
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_API = "https://kubernetes.default.svc"
DEFAULT_CREDENTIALS = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def split_pod_name(pod_name: str) -> tuple[str, int] | None:
    """`kvrec-worker-3` -> (`kvrec-worker`, 3); None for a name that is no StatefulSet pod's."""
    name, _, number = pod_name.rpartition("-")
    if not name or not number.isdigit() or not number.isascii():
        return None
    return name, int(number)


def is_scale_down(ordinal: int, replicas: int) -> bool:
    """Whether the pod with this ordinal is being removed by a scale-down to `replicas`: a
    StatefulSet keeps ordinals 0..replicas-1 and removes the ones above."""
    return ordinal >= replicas


@dataclass(frozen=True)
class KubernetesApi:
    """Where the API is and the pod's credentials: `token`, `ca.crt` and `namespace` files."""

    base_url: str = DEFAULT_API
    credentials: Path = DEFAULT_CREDENTIALS
    timeout_s: float = 2.0

    def replicas(self, statefulset: str) -> int:
        """The StatefulSet's `spec.replicas` (raises OSError/ValueError/KeyError on failure)."""
        namespace = (self.credentials / "namespace").read_text().strip()
        token = (self.credentials / "token").read_text().strip()
        url = (f"{self.base_url.rstrip('/')}/apis/apps/v1/namespaces/{namespace}"
               f"/statefulsets/{statefulset}")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}",
                                                       "Accept": "application/json"})
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(self.credentials / "ca.crt"))
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as answer:
            body = json.loads(answer.read())
        replicas = body["spec"].get("replicas", 1)  # the API's default when unset
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ValueError(f"spec.replicas is {replicas!r}")
        return replicas


def scaled_down(pod_name: str, api: KubernetesApi) -> bool:
    """Whether this pod is stopping for a scale-down (leave the group) rather than a restart
    (keep the static identity). False, with one WARNING line, when it cannot be told."""
    parts = split_pod_name(pod_name)
    if parts is None:
        log.warning("cannot tell a scale-down from a restart: pod name %r has no ordinal; "
                    "keeping the static identity (a restart)", pod_name)
        return False
    statefulset, ordinal = parts
    try:
        replicas = api.replicas(statefulset)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        reason = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else str(exc)
        log.warning("cannot tell a scale-down from a restart (statefulset %s: %s); keeping the "
                    "static identity (a restart)", statefulset, reason)
        return False
    leaving = is_scale_down(ordinal, replicas)
    log.info("statefulset %s has %d replicas, this pod is ordinal %d: %s", statefulset,
             replicas, ordinal, "a scale-down, leaving the group" if leaving else "a restart")
    return leaving
