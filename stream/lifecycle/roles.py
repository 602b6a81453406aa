"""The two roles a model version plays in a worker: it serves, or it shadows.

`serve`: its lists are published. `shadow`: a candidate scores a sample of users' events
beside the serving version and is never published. The role labels the live counters
(`kvrec_live_events{version,role}`), the `model-live-stats` records, the refusals a worker
reports and `kvrec retrain --publish-as`. A `StrEnum`: a role is its string on the wire and in
a metric label, and equal to it in a dict key.
"""

from __future__ import annotations

from enum import StrEnum


class ModelRole(StrEnum):
    SERVE = "serve"
    SHADOW = "shadow"
