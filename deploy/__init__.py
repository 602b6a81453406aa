"""Everything that runs kvrec: the local Kafka launcher (`kafka/`) and the set-up, test and demo
scripts."""
