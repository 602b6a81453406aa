#!/bin/sh
# Creates every topic of topics.txt that does not exist yet, with replication factor
# KVREC_TOPICS_REPLICATION_FACTOR and min.insync.replicas KVREC_TOPICS_MIN_INSYNC_REPLICAS (both
# default 1: one broker), then sets each topic's configs (topics.txt's and min.insync.replicas)
# on the topic, existing or new, so a rerun after a change of topics.txt applies it. It never
# changes a partition count or a replication factor (a key's partition is the worker's state).
set -eu
rf="${KVREC_TOPICS_REPLICATION_FACTOR:-1}"
isr="${KVREC_TOPICS_MIN_INSYNC_REPLICAS:-1}"
bin="${KAFKA_HOME:-/opt/kafka}/bin"
props="${TMPDIR:-/tmp}/client.properties"
: > "$props"
if [ -n "${KVREC_SECURITY_PROTOCOL:-}" ]; then
  echo "security.protocol=$KVREC_SECURITY_PROTOCOL" >> "$props"
fi
if [ -n "${KVREC_SASL_MECHANISM:-}" ]; then
  case "$KVREC_SASL_MECHANISM" in
    PLAIN) module=org.apache.kafka.common.security.plain.PlainLoginModule ;;
    *) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
  esac
  echo "sasl.mechanism=$KVREC_SASL_MECHANISM" >> "$props"
  echo "sasl.jaas.config=$module required username=\"$KVREC_SASL_USERNAME\" password=\"$KVREC_SASL_PASSWORD\";" >> "$props"
fi
while read -r name partitions configs; do
  case "$name" in ""|"#"*) continue ;; esac
  all="min.insync.replicas=$isr"
  set -- --bootstrap-server "$KVREC_BOOTSTRAP_SERVERS" --command-config "$props" \
    --create --if-not-exists --topic "$name" --partitions "$partitions" --replication-factor "$rf" \
    --config "min.insync.replicas=$isr"
  for config in $configs; do
    set -- "$@" --config "$config"
    all="$all,$config"
  done
  "$bin/kafka-topics.sh" "$@"
  "$bin/kafka-configs.sh" --bootstrap-server "$KVREC_BOOTSTRAP_SERVERS" --command-config "$props" \
    --alter --entity-type topics --entity-name "$name" --add-config "$all"
done < "${TOPICS_FILE:-/etc/kvrec-topics/topics.txt}"
