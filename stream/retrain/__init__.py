"""`kvrec retrain`, the side job: a faust-streaming app in its own consumer group keeps each
user's recent events (stream/retrain/app.py) and retrains from them, warm-started from the
serving model; a candidate is published and announced only if it is not worse than the
serving model on the same held-out tail (stream/retrain/job.py, model/decision.py).

    kvrec retrain --model-store models --once              # a Kubernetes CronJob
    kvrec retrain --model-store models --interval-s 3600   # a long-running side job
    kvrec retrain --model-store models --data games.txt    # from a file instead of the topic
"""

from kvrec.stream.retrain.command import add_arguments, main

__all__ = ["add_arguments", "main"]
