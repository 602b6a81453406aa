#!/bin/sh
# creates every topic of topics.txt that does not exist yet; never alters an existing one
set -eu
props="${TMPDIR:-/tmp}/client.properties"
: > "$props"
if [ -n "${KVREC_SECURITY_PROTOCOL:-}" ]; then
  echo "security.protocol=$KVREC_SECURITY_PROTOCOL" >> "$props"
  echo "sasl.mechanism=$KVREC_SASL_MECHANISM" >> "$props"
  echo "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$KVREC_SASL_USERNAME\" password=\"$KVREC_SASL_PASSWORD\";" >> "$props"
fi
while read -r name partitions configs; do
  case "$name" in ""|"#"*) continue ;; esac
  set -- --bootstrap-server "$KVREC_BOOTSTRAP_SERVERS" --command-config "$props" \
    --create --if-not-exists --topic "$name" --partitions "$partitions"
  for config in $configs; do set -- "$@" --config "$config"; done
  "${KAFKA_HOME:-/opt/kafka}/bin/kafka-topics.sh" "$@"
done < "${TOPICS_FILE:-/etc/kvrec-topics/topics.txt}"
