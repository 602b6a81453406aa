"""Everything that runs kvrec: the local Kafka launcher, container, Kubernetes, runbook."""
