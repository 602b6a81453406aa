"""The model lifecycle: which version serves, and how a new one gets there.

    roles.py          the two roles of a version in a worker: serve, shadow (`ModelRole`)
    announcements.py  the `model-updates` topic: what should serve, its shadow, the history;
                      reading and writing a compacted topic
    live_stats.py     the `model-live-stats` topic: the workers' live hit rates and reports
    decision.py       publish a retrained candidate or not: both models on a held-out tail
    policy.py         promote a shadow, roll back a serving version: on the live figures
    loading.py        the checks a version passes before it serves, and building it
    watcher.py        the worker's side: follow the announcements, prepare off the hot path
    retrain/          `kvrec retrain`: the side job that trains, decides and announces
    models_cli.py     `kvrec models` (models_show.py, models_change.py, models_context.py)

Why under stream/ and not model/: the lifecycle is carried by two Kafka topics, and model/
has no Kafka in it (it is pure ML: train, evaluate, export, retrieval). Imports point down:
these modules use model/, state/, stream's Kafka helpers (kafka_config, logs, cli) and, for
loading and the watcher, the worker's lower parts (worker/settings.py, worker/metrics.py,
worker/inference.py); the worker's loop and app (worker/loop.py, worker/app.py) use the
watcher and loading. Nothing here imports the loop or the app.
"""
