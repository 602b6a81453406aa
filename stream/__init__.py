"""Kafka and the loops: the worker, the retrain side job, producers, schemas, the CLI."""
