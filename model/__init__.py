"""Pure machine learning: encoder, training, evaluation, export, retrieval. No Kafka here."""
