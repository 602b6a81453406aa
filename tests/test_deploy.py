"""deploy/ checked offline: every rendered manifest validates strictly, KEDA's objects against
their schema, the Dockerfile lints, compose validates, alerts and dashboard parse and select
what the shipped scrape setups give, every setting a kvrec container gets is one kvrec accepts,
and the rules a real cluster needs hold (no secret values, no `replicas` on the KEDA target,
the liveness budget at least the outage limit, hardened pods, a NetworkPolicy, a storage class
on ReadWriteMany claims, a re-appliable topics Job, a hashed image lock). Each check is also
shown to fail on a broken copy (a misspelt field, a wrong type, an unknown flag or variable, a
bad value, a committed Secret, an impatient liveness probe, a selector no scrape matches)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from tests import deploy_checks as checks
from tests.conftest import create_topics, unique_topic
from tests.test_worker_kafka import _consume, _free_port, _get

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: checks.render(overlay) for overlay in checks.OVERLAYS}


@pytest.fixture(scope="module")
def series() -> set[str]:
    return checks.exported_series() | set(checks.EXPORTER_SERIES)


@pytest.fixture(scope="module")
def setups(rendered) -> dict[str, dict[str, list[dict]]]:
    return checks.scrape_setups(rendered["cpu"])


def _lag_labels(rendered) -> dict[str, dict[str, str]]:
    """The exporter's consumergroup and topic labels for kvrec's group and input topic."""
    worker = _by(rendered["cpu"], "ConfigMap", "kvrec-worker")["data"]
    return {"exporter": {"consumergroup": worker["KVREC_WORKER_GROUP_ID"],
                         "topic": worker["KVREC_WORKER_INPUT_TOPIC"]}}


def _by(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _worker(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


# -- the real files pass -----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", checks.OVERLAYS)
def test_every_rendered_manifest_validates_strictly(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "PodDisruptionBudget", "Service", "ScaledObject", "TriggerAuthentication",
            "CronJob", "Job", "ConfigMap", "NetworkPolicy"} <= kinds
    assert ("PersistentVolumeClaim" in kinds) == (overlay != "object-store")  # the RWX model store
    assert ("Deployment" in kinds) == (overlay != "gpu")  # the always-on retrain
    assert checks.kubernetes_problems(docs, tmp_path) == []
    assert checks.keda_problems(docs) == []


def test_the_overlays_differ_only_where_they_should(rendered):
    cpu, gpu = (_by(rendered[o], "StatefulSet", "kvrec-worker") for o in ("cpu", "gpu"))
    assert _worker(cpu)["image"].endswith("-cpu") and _worker(gpu)["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in _worker(cpu)["resources"].get("limits", {})
    assert _worker(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    backends = {o: _by(rendered[o], "ConfigMap", "kvrec-worker")["data"]["KVREC_WORKER_BACKEND"]
                for o in checks.OVERLAYS}
    assert backends == {"cpu": "torch-cpu", "gpu": "torch-cuda", "object-store": "torch-cpu"}
    assert _by(rendered["gpu"], "ConfigMap", "kvrec-retrain")["data"]["KVREC_RETRAIN_DEVICE"] == "cuda"


@pytest.mark.parametrize("overlay", checks.OVERLAYS)
def test_every_kvrec_setting_in_the_manifests_is_one_kvrec_accepts(rendered, overlay, tmp_path):
    containers = list(checks.kubernetes_containers(rendered[overlay]))
    expected = ["CronJob/kvrec-retrain-once/retrain", "Deployment/kvrec-retrain/retrain",
                "StatefulSet/kvrec-worker/worker"]
    if overlay == "gpu":  # the retrain is the hourly CronJob only: no Deployment holding a GPU
        expected.remove("Deployment/kvrec-retrain/retrain")
    assert sorted(c.where for c in containers) == expected
    for container in containers:
        assert checks.settings_problems(container, tmp_path / container.where) == []


def test_every_kvrec_setting_in_compose_is_one_kvrec_accepts(tmp_path):
    compose = yaml.safe_load((checks.DEPLOY / "compose.yaml").read_text())
    containers = list(checks.compose_containers(compose))
    assert sorted(c.where for c in containers) == ["compose/retrain", "compose/worker-1", "compose/worker-2"]
    for container in containers:
        assert checks.settings_problems(container, tmp_path / container.where) == []
    ids = {c.env["KVREC_WORKER_INSTANCE_ID"] for c in containers if c.argv == ["worker"]}
    assert ids == {"worker-1", "worker-2"}  # static membership: one id per worker


def test_the_worker_pods_fit_what_the_worker_does(rendered):
    docs = rendered["cpu"]
    statefulset = _by(docs, "StatefulSet", "kvrec-worker")
    pod, worker = statefulset["spec"]["template"]["spec"], _worker(statefulset)
    data = _by(docs, "ConfigMap", "kvrec-worker")["data"]
    # static membership: the instance id is the pod name (downward API)
    instance = next(e for e in worker["env"] if e["name"] == "KVREC_WORKER_INSTANCE_ID")
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # a warm standby copy of each partition on another member (issue 30)
    assert int(data["KVREC_WORKER_STANDBY_REPLICAS"]) >= 1
    # liveness and startup on /health (a restore beats it), readiness on /ready
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health"
    assert worker["startupProbe"]["httpGet"]["path"] == "/health"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"
    # a final checkpoint waits for Kafka up to --outage-limit-s (120 s by default)
    outage_limit_s = float(data.get("KVREC_WORKER_OUTAGE_LIMIT_S", 120))
    assert pod["terminationGracePeriodSeconds"] > outage_limit_s
    # the RocksDB state is on the pod's own volume
    claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mount = next(m for m in worker["volumeMounts"] if m["name"] == claim)["mountPath"]
    assert data["KVREC_WORKER_STATE_DIR"].startswith(mount + "/")
    # the model store is the shared ReadWriteMany volume the retrain job writes
    store = _by(docs, "PersistentVolumeClaim", "kvrec-models")
    assert store["spec"]["accessModes"] == ["ReadWriteMany"]
    retrain = _by(docs, "Deployment", "kvrec-retrain")["spec"]["template"]["spec"]
    for spec in (pod, retrain):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["kvrec-models"]
    assert _by(docs, "PodDisruptionBudget", "kvrec-worker")["spec"]["maxUnavailable"] == 1


def test_autoscaling_is_capped_at_the_partitions_and_scales_down_slowly(rendered):
    docs = rendered["cpu"]
    topics = checks.topics()
    scaled = _by(docs, "ScaledObject", "kvrec-worker")["spec"]
    worker = _by(docs, "ConfigMap", "kvrec-worker")["data"]
    trigger = scaled["triggers"][0]
    input_topic, group = worker["KVREC_WORKER_INPUT_TOPIC"], worker["KVREC_WORKER_GROUP_ID"]
    assert trigger["type"] == "kafka"
    assert (trigger["metadata"]["topic"], trigger["metadata"]["consumerGroup"]) == (input_topic, group)
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    kafka = _by(docs, "ConfigMap", "kvrec-kafka")["data"]
    assert trigger["metadata"]["bootstrapServers"] == kafka["KVREC_BOOTSTRAP_SERVERS"]
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    assert trigger["metadata"]["sasl"] == keda_sasl[kafka["KVREC_SASL_MECHANISM"]]
    assert scaled["maxReplicaCount"] == topics[input_topic][0]
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] >= 300
    # the worker's changelog: its name, compacted, as many partitions as the input
    changelog = f"{group}-windows-changelog"
    assert topics[changelog][0] == topics[input_topic][0]
    for name in (changelog, worker["KVREC_WORKER_OUTPUT_TOPIC"], worker["KVREC_WORKER_UPDATES_TOPIC"],
                 worker["KVREC_WORKER_STATS_TOPIC"]):
        assert topics[name][1]["cleanup.policy"] == "compact", name
    assert worker["KVREC_WORKER_DEAD_LETTER_TOPIC"] in topics


def _run_topics_script(tmp_path, **env: str) -> tuple[list[list[str]], list[list[str]]]:
    """create-topics.sh (the Kubernetes Job's and compose's) against stand-in kafka-topics.sh
    and kafka-configs.sh that record their arguments: (topics calls, configs calls)."""
    (tmp_path / "bin").mkdir()
    for tool in ("kafka-topics.sh", "kafka-configs.sh"):
        stub = tmp_path / "bin" / tool
        stub.write_text(f'#!/bin/sh\necho "$@" >> "$RECORD.{tool}"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "calls"
    topics_dir = checks.DEPLOY / "k8s" / "base" / "topics"
    subprocess.run(["sh", str(topics_dir / "create-topics.sh")], check=True, timeout=30, env={
        "PATH": os.environ["PATH"], "KAFKA_HOME": str(tmp_path), "RECORD": str(record),
        "TMPDIR": str(tmp_path), "TOPICS_FILE": str(topics_dir / "topics.txt"),
        "KVREC_BOOTSTRAP_SERVERS": "b:9092", **env})
    return ([line.split() for line in Path(f"{record}.kafka-topics.sh").read_text().splitlines()],
            [line.split() for line in Path(f"{record}.kafka-configs.sh").read_text().splitlines()])


def test_the_topics_script_creates_each_topic_with_its_settings(rendered, tmp_path):
    job = _by(rendered["cpu"], "Job", "kvrec-topics")["spec"]["template"]["spec"]["containers"][0]
    job_env = {e["name"]: e["value"] for e in job["env"]}
    replication = (job_env["KVREC_TOPICS_REPLICATION_FACTOR"], job_env["KVREC_TOPICS_MIN_INSYNC_REPLICAS"])
    assert replication == ("3", "2")  # one broker may fail, no acknowledged write lost
    creates, alters = _run_topics_script(
        tmp_path, KVREC_SECURITY_PROTOCOL="SASL_PLAINTEXT", KVREC_SASL_MECHANISM="SCRAM-SHA-512",
        KVREC_SASL_USERNAME="u", KVREC_SASL_PASSWORD="p",
        KVREC_TOPICS_REPLICATION_FACTOR=job_env["KVREC_TOPICS_REPLICATION_FACTOR"],
        KVREC_TOPICS_MIN_INSYNC_REPLICAS=job_env["KVREC_TOPICS_MIN_INSYNC_REPLICAS"])
    assert len(creates) == len(alters) == len(checks.topics())
    expected = checks.topics().items()
    for call, alter, (name, (partitions, configs)) in zip(creates, alters, expected, strict=True):
        assert call[call.index("--topic") + 1] == name
        assert call[call.index("--partitions") + 1] == str(partitions)
        assert call[call.index("--replication-factor") + 1] == "3"
        assert "--if-not-exists" in call
        given = [call[i + 1] for i, word in enumerate(call) if word == "--config"]
        assert given == ["min.insync.replicas=2", *(f"{k}={v}" for k, v in configs.items())]
        # an existing topic gets topics.txt's configs too: a rerun applies a change
        assert alter[alter.index("--entity-name") + 1] == name and "--alter" in alter
        assert alter[alter.index("--add-config") + 1].split(",") == given
    properties = (tmp_path / "client.properties").read_text()
    assert "security.protocol=SASL_PLAINTEXT" in properties and 'username="u"' in properties
    assert "ScramLoginModule" in properties


def test_compose_topics_fit_its_one_broker(tmp_path):
    compose = yaml.safe_load((checks.DEPLOY / "compose.yaml").read_text())
    env = compose["services"]["topics"]["environment"]
    assert (env["KVREC_TOPICS_REPLICATION_FACTOR"], env["KVREC_TOPICS_MIN_INSYNC_REPLICAS"]) == ("1", "1")
    creates, _ = _run_topics_script(tmp_path)  # no settings: one broker, PLAINTEXT
    assert all(c[c.index("--replication-factor") + 1] == "1" for c in creates)
    assert (tmp_path / "client.properties").read_text() == ""


def test_the_topics_job_can_be_applied_again_after_topics_txt_changes(rendered, tmp_path):
    """A Job's pod template is immutable: if a change of topics.txt changed it (a hashed
    ConfigMap name), the next `kubectl apply` would fail. The template stays the same, and the
    Job deletes itself once done, so the next apply runs it (with the new topics.txt) again."""
    copy = tmp_path / "k8s"
    shutil.copytree(checks.DEPLOY / "k8s", copy)
    topics = copy / "base" / "topics" / "topics.txt"
    topics.write_text(topics.read_text().replace("retention.ms=604800000", "retention.ms=86400000"))
    changed = checks.render(copy / "overlays" / "cpu")
    before, after = (_by(docs, "Job", "kvrec-topics") for docs in (rendered["cpu"], changed))
    assert before["spec"]["template"] == after["spec"]["template"]
    assert "retention.ms=86400000" in _by(changed, "ConfigMap", "kvrec-topics")["data"]["topics.txt"]
    assert before["spec"]["ttlSecondsAfterFinished"] == 0


def test_the_dockerfile_lints():
    assert checks.dockerfile_problems() == []


def test_compose_validates_against_the_compose_specification():
    assert checks.compose_problems() == []


def test_alert_rules_parse_and_name_only_exported_metrics(series):
    rules = yaml.safe_load((checks.DEPLOY / "monitoring" / "alerts.yaml").read_text())
    assert checks.alert_problems(rules, series) == []
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"KvrecConsumerLagHigh", "KvrecDeadLetters", "KvrecLatencyHigh", "KvrecCacheHitRateLow",
            "KvrecRestoreSlow", "KvrecModelVersionSkew", "KvrecModelRefused",
            "KvrecLiveHitRateDrop"} <= names


def test_the_dashboard_parses_and_names_only_exported_metrics(series):
    dashboard = json.loads((checks.DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    assert checks.dashboard_problems(dashboard, series) == []


def test_prometheus_config_loads_the_alert_rules():
    config = yaml.safe_load((checks.DEPLOY / "monitoring" / "prometheus.yml").read_text())
    compose = yaml.safe_load((checks.DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[1::-1][:2] for v in compose["services"]["prometheus"]["volumes"])
    for rule_file in config["rule_files"]:
        assert (checks.DEPLOY / "compose.yaml").parent.joinpath(mounts[rule_file]).is_file()


def _alerts() -> dict:
    return yaml.safe_load((checks.MONITORING / "alerts.yaml").read_text())


def test_every_alert_selects_what_a_real_scrape_gives(rendered, setups):
    """Each selector of each alert (and dashboard query) matches the labels that compose's
    prometheus.yml, the annotation-based Kubernetes job and the ServiceMonitors give the
    workers' and the exporter's series: those setups' relabelling replayed on the rendered
    Services."""
    assert set(setups) == {"compose (monitoring/prometheus.yml)",
                           "Kubernetes, prometheus.io annotations (monitoring/prometheus-kubernetes.yml)",
                           "Kubernetes, Prometheus Operator (monitoring/prometheus-operator)"}
    for setup in setups.values():  # every setup scrapes one or more workers and the exporter
        assert setup.get("worker") and setup.get("exporter"), setups
    expected = _lag_labels(rendered)
    problems = [p for group in _alerts()["groups"] for rule in group["rules"]
                for p in checks.selector_problems(rule["alert"], rule["expr"], setups, expected)]
    dashboard = json.loads((checks.MONITORING / "grafana-dashboard.json").read_text())
    problems += [p for panel in dashboard["panels"] for target in panel["targets"]
                 for p in checks.selector_problems(panel["title"], target["expr"], setups, expected)]
    assert problems == []


@pytest.mark.parametrize(("expr", "setup"), [
    # the old rule: annotation-based scraping gives job="kubernetes-service-endpoints"
    ('up{job=~".*kvrec-worker.*"} == 0', "prometheus.io annotations"),
    ('sum(kafka_consumergroup_lag{consumergroup="kvrec"}) > 1', "compose"),  # another group
    ('sum(kvrec_consumer_lag{pod=~"kvrec-worker-.*"}) > 1', "compose"),  # compose has no pod label
    ('up{service="kvrec-worker"} == 0', "Prometheus Operator"),  # the headless Service: unscraped
])
def test_a_selector_no_scrape_gives_fails(rendered, setups, expr, setup):
    problems = checks.selector_problems("rule", expr, setups, _lag_labels(rendered))
    assert any(setup in p for p in problems), problems


def test_the_relabelling_replay_keeps_prometheus_semantics():
    rules = yaml.safe_load((checks.MONITORING / "prometheus-kubernetes.yml").read_text())
    job = rules["scrape_configs"][0]["relabel_configs"]
    annotation = "__meta_kubernetes_service_annotation_prometheus_io_"
    meta = {"__address__": "10.1.2.3:8080", f"{annotation}scrape": "true", f"{annotation}port": "9464",
            "__meta_kubernetes_service_label_app_kubernetes_io_name": "x",
            "__meta_kubernetes_service_name": "s", "__meta_kubernetes_namespace": "n", "job": "j"}
    assert checks.relabel(meta, job) == {"app_kubernetes_io_name": "x", "namespace": "n",
                                         "service": "s", "job": "j"}
    to_instance = {"source_labels": ["__address__"], "target_label": "instance"}
    assert checks.relabel(meta, [*job, to_instance])["instance"] == "10.1.2.3:9464"
    unannotated = {k: v for k, v in meta.items() if "prometheus_io_scrape" not in k}
    assert checks.relabel(unannotated, job) is None  # keep: the headless Service is not scraped
    assert checks.relabel({"a": "1", "b": "2"}, [{"action": "labeldrop", "regex": "a"}]) == {"b": "2"}
    assert checks.relabel({"a": "1", "b": "2"}, [{"action": "labelkeep", "regex": "a"}]) == {"a": "1"}


def test_group_lag_is_the_brokers_not_the_workers_own_gauges(rendered):
    """The workers' kvrec_consumer_lag covers only the partitions each owns: a partition no
    member owns (a scale-down gap) vanishes from its sum. The lag alerts and the dashboard's
    lag panel read the exporter's committed-offset lag, which covers every partition; the
    exporter runs in compose and in monitoring/kafka-exporter, and reads kvrec's group."""
    rules = {r["alert"]: r["expr"] for g in _alerts()["groups"] for r in g["rules"]}
    assert not [name for name, expr in rules.items() if "kvrec_consumer_lag" in expr]
    for name in ("KvrecConsumerLagHigh", "KvrecPartitionStuck", "KvrecLagUnknown"):
        assert "kafka_consumergroup_lag" in rules[name], name
    dashboard = json.loads((checks.MONITORING / "grafana-dashboard.json").read_text())
    lag = [t["expr"] for p in dashboard["panels"] if "lag" in p["title"].lower() for t in p["targets"]]
    assert lag and all("kafka_consumergroup_lag" in e and "kvrec_consumer_lag" not in e for e in lag)
    group = _lag_labels(rendered)["exporter"]["consumergroup"]
    compose = yaml.safe_load((checks.DEPLOY / "compose.yaml").read_text())
    exporter = _by(checks.render(checks.MONITORING / "kafka-exporter"), "Deployment", "kvrec-kafka-exporter")
    for args in (compose["services"]["kafka-exporter"]["command"], _worker(exporter)["args"]):
        pattern = next(a.split("=", 1)[1] for a in args if a.startswith("--group.filter="))
        assert re.search(pattern, group), args


def test_the_kafka_exporter_validates_and_uses_the_workers_kafka_settings(rendered, tmp_path):
    docs = checks.render(checks.MONITORING / "kafka-exporter")
    assert checks.kubernetes_problems(docs, tmp_path) == []
    container = _worker(_by(docs, "Deployment", "kvrec-kafka-exporter"))
    worker = _worker(_by(rendered["cpu"], "StatefulSet", "kvrec-worker"))
    assert container["envFrom"] == [e for e in worker["envFrom"] if "secretRef" in e
                                    or e["configMapRef"]["name"] == "kvrec-kafka"]
    kafka = _by(rendered["cpu"], "ConfigMap", "kvrec-kafka")["data"]
    assert kafka["KVREC_SECURITY_PROTOCOL"].startswith("SASL") and "--sasl.enabled" in container["args"]
    mechanism = {"SCRAM-SHA-512": "scram-sha512", "SCRAM-SHA-256": "scram-sha256", "PLAIN": "plain"}
    assert f"--sasl.mechanism={mechanism[kafka['KVREC_SASL_MECHANISM']]}" in container["args"]


def test_the_prometheus_rule_is_the_alert_file():
    path = checks.MONITORING / "prometheus-operator" / "prometheusrule.yaml"
    assert path.read_text() == checks.prometheus_rule()
    docs = checks.render(checks.MONITORING / "prometheus-operator")
    assert sorted(d["kind"] for d in docs) == ["PrometheusRule", "ServiceMonitor", "ServiceMonitor"]
    rule = _by(docs, "PrometheusRule", "kvrec")
    assert rule["spec"] == _alerts() and rule["metadata"]["namespace"] == "kvrec"


KUSTOMIZATIONS = sorted((checks.DEPLOY / "k8s").rglob("kustomization.yaml"))


@pytest.mark.parametrize("overlay", checks.OVERLAYS)
def test_the_rules_a_real_cluster_needs_hold(rendered, overlay):
    """No secret value in the manifests, no `replicas` on the workload KEDA scales, every pod
    hardened (no service account token, read-only root, a writable /tmp), a NetworkPolicy that
    lets each pod reach Kafka and DNS only and Prometheus reach the metrics, and a storage
    class named on every ReadWriteMany claim."""
    docs = rendered[overlay]
    assert checks.secret_problems(docs, KUSTOMIZATIONS) == []
    assert checks.keda_target_problems(docs) == []
    assert checks.hardening_problems(docs) == []
    assert checks.network_policy_problems(docs) == []
    assert checks.storage_problems(docs) == []
    assert checks.scale_down_problems(docs) == []


def test_the_liveness_budget_covers_the_outage_limit(rendered, tmp_path):
    """A worker rides out a Kafka outage of up to --outage-limit-s; liveness must not restart
    it sooner: /health's stall time plus the failed probes the kubelet waits for."""
    statefulset = _by(rendered["cpu"], "StatefulSet", "kvrec-worker")
    data = _by(rendered["cpu"], "ConfigMap", "kvrec-worker")["data"]
    outage_limit_s = float(data.get("KVREC_WORKER_OUTAGE_LIMIT_S", 120))
    assert checks.liveness_budget_s(_worker(statefulset)["livenessProbe"]) >= outage_limit_s

    def impatient(doc: dict) -> None:
        _worker(doc)["livenessProbe"]["failureThreshold"] = 3  # the old 60 + 2 x 10 = 80 s

    def longer_outages(doc: dict) -> None:
        doc["data"]["KVREC_WORKER_OUTAGE_LIMIT_S"] = "200"

    for kind, name, change in (("StatefulSet", "kvrec-worker", impatient),
                               ("ConfigMap", "kvrec-worker", longer_outages)):
        docs = checks.mutated(rendered["cpu"], kind, name, change)
        worker = next(c for c in checks.kubernetes_containers(docs) if c.where.startswith("StatefulSet"))
        assert "before --outage-limit-s" in " ".join(checks.settings_problems(worker, tmp_path)), change


def test_the_runbook_creates_the_secrets_the_manifests_use():
    """Every Secret the manifests read is one the runbook's `kubectl create secret` makes,
    with the same keys."""
    runbook = (checks.DEPLOY / "README.md").read_text()
    for name, keys in checks.OPERATOR_SECRETS.items():
        command = re.search(rf"kubectl -n kvrec create secret generic {name}((?:\\\n|[^\n])*)", runbook)
        assert command, name
        assert set(re.findall(r"--from-literal=([A-Z_]+)=", command.group(1))) == set(keys)


def test_broken_copies_break_the_rules(rendered, tmp_path):
    docs = rendered["cpu"]

    def scaled(doc: dict) -> None:
        doc["spec"]["replicas"] = 2

    assert "`replicas` on a workload KEDA scales" in " ".join(checks.keda_target_problems(
        checks.mutated(docs, "StatefulSet", "kvrec-worker", scaled)))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kvrec-kafka-sasl"},
              "stringData": {"KVREC_SASL_PASSWORD": "change-me"}}
    assert checks.secret_problems([*docs, secret], [])

    def literal(doc: dict) -> None:
        _worker(doc)["env"].append({"name": "KVREC_SASL_PASSWORD", "value": "change-me"})

    assert "literal value" in " ".join(checks.secret_problems(
        checks.mutated(docs, "StatefulSet", "kvrec-worker", literal), []))
    generator = tmp_path / "kustomization.yaml"
    generator.write_text("secretGenerator:\n  - name: x\n    literals: [a=b]\n")
    assert checks.secret_problems(docs, []) == []  # the control
    assert any("secretGenerator" in p for p in checks.secret_problems(docs, [generator]))

    def writable(doc: dict) -> None:
        del _worker(doc)["securityContext"]["readOnlyRootFilesystem"]
        del doc["spec"]["template"]["spec"]["serviceAccountName"]  # the token of `default`

    writable_docs = checks.mutated(docs, "StatefulSet", "kvrec-worker", writable)
    problems = " ".join(checks.hardening_problems(writable_docs))
    assert "readOnlyRootFilesystem" in problems and "automountServiceAccountToken" in problems

    def other_port(doc: dict) -> None:
        doc["data"]["KVREC_BOOTSTRAP_SERVERS"] = "kafka-bootstrap.kafka.svc:9093"

    assert "no egress to Kafka" in " ".join(checks.network_policy_problems(
        checks.mutated(docs, "ConfigMap", "kvrec-kafka", other_port)))
    unpoliced = [d for d in docs if d["kind"] != "NetworkPolicy"]
    assert "no NetworkPolicy" in " ".join(checks.network_policy_problems(unpoliced))

    def list_all(doc: dict) -> None:
        doc["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]})

    greedy = checks.mutated(docs, "Role", "kvrec-worker-scale-down", list_all)
    assert "beyond `get` on named objects" in " ".join(checks.hardening_problems(greedy))

    def unnamed(doc: dict) -> None:
        del doc["rules"][0]["resourceNames"]

    assert "beyond `get` on named objects" in " ".join(checks.hardening_problems(
        checks.mutated(docs, "Role", "kvrec-worker-scale-down", unnamed)))
    assert checks.scale_down_problems(docs) == []  # the control

    def off(doc: dict) -> None:
        del doc["data"]["KVREC_WORKER_LEAVE_ON_SCALE_DOWN"]

    def tokenless(doc: dict) -> None:
        doc["spec"]["template"]["spec"]["automountServiceAccountToken"] = False

    def nameless(doc: dict) -> None:
        _worker(doc)["env"] = [v for v in _worker(doc)["env"] if v["name"] != "KVREC_WORKER_POD_NAME"]

    def other_object(doc: dict) -> None:
        doc["rules"][0]["resourceNames"] = ["kvrec-retrain"]

    for kind, name, change, problem in (
        ("ConfigMap", "kvrec-worker", off, "LEAVE_ON_SCALE_DOWN is not true"),
        ("StatefulSet", "kvrec-worker", tokenless, "no service account token"),
        ("StatefulSet", "kvrec-worker", nameless, "KVREC_WORKER_POD_NAME"),
        ("Role", "kvrec-worker-scale-down", other_object, "may not get statefulsets/kvrec-worker"),
    ):
        assert problem in " ".join(checks.scale_down_problems(
            checks.mutated(docs, kind, name, change))), problem
    apiless = [d for d in docs if d["metadata"]["name"] != "kvrec-worker-kubernetes-api"]
    assert "egress to the API server" in " ".join(checks.scale_down_problems(apiless))

    def default_class(doc: dict) -> None:
        del doc["spec"]["storageClassName"]

    classless = checks.mutated(docs, "PersistentVolumeClaim", "kvrec-models", default_class)
    assert "ReadWriteMany with no storageClassName" in " ".join(checks.storage_problems(classless))


def test_the_object_store_overlay_needs_no_shared_volume(rendered):
    docs = rendered["object-store"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for kind, name in (("StatefulSet", "kvrec-worker"), ("Deployment", "kvrec-retrain")):
        spec = _by(docs, kind, name)["spec"]["template"]["spec"]
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert set(models) == {"name", "emptyDir"}, models
        sync = {c["name"]: c for c in spec["initContainers"]}
        modes = sorted(c["command"][-1] for c in sync.values())
        assert modes == (["pull"] if kind == "StatefulSet" else ["pull-once", "push"])
        for container in sync.values():
            if container["command"][-1] != "pull-once":  # sidecars: they run beside the main container
                assert container["restartPolicy"] == "Always"
            assert "/models" in [m["mountPath"] for m in container["volumeMounts"]]
    bucket = _by(docs, "ConfigMap", "kvrec-model-bucket")["data"]
    worker = _by(docs, "ConfigMap", "kvrec-worker")["data"]
    assert bucket["KVREC_MODEL_NAME"] == worker["KVREC_WORKER_MODEL_NAME"]
    assert bucket["KVREC_MODEL_STORE"] == worker["KVREC_WORKER_MODEL_STORE"]


def test_the_build_context_and_the_image_lock():
    assert checks.dockerignore_problems() == []
    from kvrec.deploy import image_lock

    assert image_lock.problems() == []
    text = (checks.DEPLOY / "Dockerfile").read_text()
    assert "--require-hashes -r deploy/requirements-image.lock" in text
    assert not re.search(r"^(COPY|RUN).*deploy/requirements\.lock", text, re.M)


def test_a_broken_build_context_or_image_lock_fails(tmp_path):
    ignore = tmp_path / ".dockerignore"
    text = (checks.REPO / ".dockerignore").read_text()
    ignore.write_text(text.replace("bench/results\n", ""))
    assert "bench/results/e2e.json: in the build context" in checks.dockerignore_problems(dockerignore=ignore)
    ignore.write_text(text.replace("!stream\n", ""))
    assert "COPY stream: left out of the build context" in checks.dockerignore_problems(dockerignore=ignore)
    assert checks.dockerignore_problems(dockerignore=tmp_path / "none")
    from kvrec.deploy import image_lock

    lock = tmp_path / "requirements-image.lock"
    lines = image_lock.IMAGE_LOCK.read_text().splitlines()
    lock.write_text("\n".join(line.split(" --hash")[0] if line.startswith("numpy==") else line
                              for line in lines))
    assert image_lock.problems(lock) == ["requirements-image.lock: no sha256 hash: numpy==2.4.6"]
    lock.write_text("\n".join(line for line in lines if not line.startswith("six==")))
    assert image_lock.problems(lock) == [
        "requirements-image.lock: six==None where requirements.lock has 1.17.0"]


# a stand-in rclone: remotes `store:PATH` are folders under $BUCKETS; lsf, copy, copyto, purge
# with the options model-sync.sh uses; status 3 for a folder that does not exist, as rclone;
# every call recorded; $RCLONE_FAIL makes every call fail (an unreachable bucket)
RCLONE_STUB = """#!/usr/bin/env python3
import os, shutil, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["RECORD"], "a") as record:
    record.write(" ".join(args) + "\\n")
if os.environ.get("RCLONE_FAIL"):
    sys.exit(1)
def path(word):
    return Path(os.environ["BUCKETS"]) / word.split(":", 1)[1] if ":" in word else Path(word)
command, options = args[0], [a for a in args[1:] if a.startswith("--")]
words = [a for a in args[1:] if not a.startswith("--")]
exclude = words.pop(0) if "--exclude" in options else None
include = words.pop(0) if "--include" in options else None
if command == "lsf":
    folder = path(words[0])
    if not folder.is_dir():
        sys.exit(3)
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and "--files-only" not in options:
            print(entry.name + "/")
        elif entry.is_file() and "--dirs-only" not in options and include in (None, entry.name):
            print(entry.name)
elif command == "copy":
    source, target = path(words[0]), path(words[1])
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.rglob("*"):
        if entry.is_file() and entry.name != exclude:
            (target / entry.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(entry, target / entry.relative_to(source))
elif command == "copyto":
    path(words[1]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path(words[0]), path(words[1]))
elif command == "purge":
    shutil.rmtree(path(words[0]))
"""
MODEL_SYNC = checks.DEPLOY / "k8s" / "components" / "model-store-object" / "model-sync.sh"


def _version(folder: Path, name: str, complete: bool = True) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "model.safetensors").write_text(f"weights of {name}")
    if complete:
        (folder / name / "manifest.json").write_text(f'{{"version": "{name}"}}')


def _sync(tmp_path: Path, mode: str, **env: str) -> tuple[int, list[str]]:
    (tmp_path / "bin").mkdir(exist_ok=True)
    stub = tmp_path / "bin" / "rclone"
    stub.write_text(RCLONE_STUB)
    stub.chmod(0o755)
    record = tmp_path / "rclone-calls"
    record.write_text("")
    result = subprocess.run(["sh", str(MODEL_SYNC), mode], capture_output=True, text=True, timeout=60, env={
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RECORD": str(record),
        "BUCKETS": str(tmp_path / "buckets"), "KVREC_MODEL_BUCKET": "store:b/models",
        "KVREC_MODEL_NAME": "default", "KVREC_MODEL_STORE": str(tmp_path / "models"), **env})
    return result.returncode, record.read_text().splitlines()


def test_model_sync_pulls_whole_versions_and_follows_the_bucket(tmp_path):
    bucket, local = tmp_path / "buckets" / "b" / "models" / "default", tmp_path / "models" / "default"
    _version(bucket, "v1")
    _version(bucket, "v2", complete=False)  # still uploading: no manifest yet
    assert _sync(tmp_path, "pull-once")[0] == 0
    assert sorted(p.name for p in local.iterdir()) == ["v1"]  # whole, renamed into place
    assert (local / "v1" / "manifest.json").is_file() and (tmp_path / "models" / ".kvrec-pulled").is_file()
    (bucket / "v2" / "manifest.json").write_text("{}")
    shutil.rmtree(bucket / "v1")  # pruned from the store
    assert _sync(tmp_path, "pull-once")[0] == 0
    assert sorted(p.name for p in local.iterdir()) == ["v2"]
    # an unreachable bucket changes nothing here (and is not read as an empty one)
    status, _ = _sync(tmp_path, "pull-once", RCLONE_FAIL="1")
    assert status != 0 and sorted(p.name for p in local.iterdir()) == ["v2"]


def test_model_sync_pushes_the_manifest_last_and_never_empties_the_bucket(tmp_path):
    bucket, local = tmp_path / "buckets" / "b" / "models" / "default", tmp_path / "models" / "default"
    _version(local, "v1")
    (local / ".staging-x").mkdir()  # a version being written: never uploaded
    _version(bucket, "v0")  # not here: this store was not filled from the bucket yet
    status, calls = _sync(tmp_path, "push-once")
    assert status == 0
    uploads = [c for c in calls if c.startswith(("copy ", "copyto "))]
    assert uploads[0].startswith("copy --exclude manifest.json") and uploads[-1].endswith("v1/manifest.json")
    assert sorted(p.name for p in bucket.iterdir()) == ["v0", "v1"]  # v0 kept: no pull-once yet
    assert (bucket / "v1" / "manifest.json").is_file()
    assert _sync(tmp_path, "pull-once")[0] == 0  # now this store holds the bucket's versions
    shutil.rmtree(local / "v0")  # pruned here
    assert _sync(tmp_path, "push-once")[0] == 0
    assert sorted(p.name for p in bucket.iterdir()) == ["v1"]
    assert _sync(tmp_path, "bogus")[0] == 2


# -- and broken copies fail --------------------------------------------------------------------

def test_a_misspelt_field_fails_strict_validation(rendered, tmp_path):
    def misspell(doc: dict) -> None:
        probe = _worker(doc)["readinessProbe"]
        probe["periodSecond"] = probe.pop("periodSeconds")

    docs = checks.mutated(rendered["cpu"], "StatefulSet", "kvrec-worker", misspell)
    problems = checks.kubernetes_problems(docs, tmp_path)
    assert problems and "periodSecond" in problems[0]


def test_a_wrong_type_fails_validation(rendered, tmp_path):
    def stringly(doc: dict) -> None:
        doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "150s"

    docs = checks.mutated(rendered["cpu"], "StatefulSet", "kvrec-worker", stringly)
    assert checks.kubernetes_problems(docs, tmp_path)


def test_a_broken_scaled_object_fails_its_schema(rendered):
    def wrong_type(doc: dict) -> None:
        doc["spec"]["maxReplicaCount"] = "12"

    def unknown_field(doc: dict) -> None:
        doc["spec"]["maxReplicas"] = doc["spec"].pop("maxReplicaCount")

    def number_in_metadata(doc: dict) -> None:
        doc["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 20000

    for change in (wrong_type, unknown_field, number_in_metadata):
        docs = checks.mutated(rendered["cpu"], "ScaledObject", "kvrec-worker", change)
        assert checks.keda_problems(docs), change.__name__


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("KVREC_WORKER_METRICS_PROT", "9464", "not a variable of kvrec worker"),  # unknown variable
    ("KVREC_WORKER_SESSION_TIMEOUT_MS", "90s", "KVREC_WORKER_SESSION_TIMEOUT_MS"),  # not a number
    ("KVREC_WORKER_PROCESSING_GUARANTEE", "exactly_once", "choose from"),  # not a choice
    ("KVREC_WORKER_METRICS_PORT", "9465", "is not --metrics-port"),  # probes on another port
    ("KVREC_MODEL_STORE", "/models", "KVREC_MODEL_STORE"),  # the refused un-namespaced form
    ("KVREC_WORKER_STATE_DIR", "/var/lib/other", "not on a mounted volume"),
    ("KVREC_SASL_MECHANISM", "SCRAM-SHA-256", None),  # still valid: the control case
])
def test_a_bad_worker_setting_fails_the_replay(rendered, tmp_path, key, value, expected):
    def change(doc: dict) -> None:
        doc.setdefault("data", {})[key] = value

    docs = checks.mutated(rendered["cpu"], "ConfigMap", "kvrec-worker", change)
    worker = next(c for c in checks.kubernetes_containers(docs) if c.where.startswith("StatefulSet"))
    problems = checks.settings_problems(worker, tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert problems and expected in " ".join(problems), problems


def test_an_unknown_flag_fails_the_replay(rendered, tmp_path):
    def add_flag(doc: dict) -> None:
        _worker(doc)["args"] = ["worker", "--metrics-prot", "9464"]

    docs = checks.mutated(rendered["cpu"], "StatefulSet", "kvrec-worker", add_flag)
    worker = next(c for c in checks.kubernetes_containers(docs) if c.where.startswith("StatefulSet"))
    problems = checks.settings_problems(worker, tmp_path)
    assert problems and "unrecognized arguments: --metrics-prot" in problems[0]


def test_a_mechanism_faust_cannot_use_fails_the_retrain_replay(rendered, tmp_path):
    """kvrec retrain reads with Faust, which takes PLAIN and SCRAM (over PLAINTEXT or SSL): an
    OAUTHBEARER setting is refused, as the command itself would refuse it."""
    def oauth(doc: dict) -> None:
        doc["data"]["KVREC_SASL_MECHANISM"] = "OAUTHBEARER"

    docs = checks.mutated(rendered["cpu"], "ConfigMap", "kvrec-kafka", oauth)
    retrain = next(c for c in checks.kubernetes_containers(docs) if c.where.startswith("Deployment"))
    assert "not SASL_PLAINTEXT OAUTHBEARER" in " ".join(checks.settings_problems(retrain, tmp_path))


KAFKA_SECURITY = ("KVREC_BOOTSTRAP_SERVERS", "KVREC_SECURITY_PROTOCOL", "KVREC_SASL_MECHANISM",
                  "KVREC_SASL_USERNAME", "KVREC_SASL_PASSWORD")


@pytest.mark.parametrize("overlay", checks.OVERLAYS)
def test_every_kafka_client_uses_one_security_setting(rendered, overlay):
    """Workers, retrain (Deployment and CronJob), the topics Job and the Kafka exporter all
    connect with the ConfigMap kvrec-kafka and the Secret kvrec-kafka-sasl: the same listener,
    protocol, mechanism and user; KEDA's trigger too."""
    docs = rendered[overlay]
    settings = {c.where: tuple(c.env.get(k) for k in KAFKA_SECURITY)
                for c in checks.kubernetes_containers(docs)}
    assert len(set(settings.values())) == 1, settings
    protocol = next(iter(settings.values()))[1]
    assert protocol and protocol.startswith("SASL"), settings
    topics = _by(docs, "Job", "kvrec-topics")["spec"]["template"]["spec"]["containers"][0]
    exporter = _worker(_by(checks.render(checks.MONITORING / "kafka-exporter"), "Deployment",
                           "kvrec-kafka-exporter"))
    for container in (topics, exporter):
        assert {"configMapRef": {"name": "kvrec-kafka"}} in container["envFrom"]
        assert {"secretRef": {"name": "kvrec-kafka-sasl"}} in container["envFrom"]
    auth = _by(docs, "TriggerAuthentication", "kvrec-kafka")["spec"]["secretTargetRef"]
    assert {a["name"] for a in auth} == {"kvrec-kafka-sasl"}


def test_a_bad_dockerfile_fails_the_lint(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    text = (checks.DEPLOY / "Dockerfile").read_text()
    dockerfile.write_text(text.replace("USER 10001:10001", "USER root"))
    assert checks.dockerfile_problems(dockerfile)
    dockerfile.write_text(text.replace("WORKDIR /home/kvrec", "RUN cd /home/kvrec"))
    assert checks.dockerfile_problems(dockerfile)


def test_a_bad_compose_file_fails_the_specification(tmp_path):
    compose = yaml.safe_load((checks.DEPLOY / "compose.yaml").read_text())
    compose["services"]["worker-1"]["restart_policy"] = "always"  # not a service key
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(compose))
    assert checks.compose_problems(path)


def test_broken_alerts_and_panels_fail(series):
    rules = yaml.safe_load((checks.DEPLOY / "monitoring" / "alerts.yaml").read_text())
    rule = rules["groups"][0]["rules"][0]
    rule["expr"] = "sum(kvrec_consumer_lags) > 100000"  # a metric the worker does not export
    assert "exports no kvrec_consumer_lags" in " ".join(checks.alert_problems(rules, series))
    rule["expr"] = "sum(kafka_consumergroup_lags) > 100000"  # nor the Kafka exporter
    assert "exports no kafka_consumergroup_lags" in " ".join(checks.alert_problems(rules, series))
    rule["expr"] = "sum(rate(kvrec_events_in_total[5m]) > 1"  # does not parse
    assert "does not parse" in " ".join(checks.alert_problems(rules, series))
    rule["expr"], rule["for"] = "sum(kvrec_consumer_lag) > 1", "10 minutes"
    assert "not a Prometheus duration" in " ".join(checks.alert_problems(rules, series))
    dashboard = {"panels": [{"title": "t", "targets": [{"expr": "rate(kvrec_cache_hit_total[5m])"}]}]}
    assert checks.dashboard_problems(dashboard, series)


def test_the_image_leaves_out_only_packages_the_lock_has():
    """The Dockerfile's exclusions name packages of deploy/requirements.lock (a renamed or
    dropped package would otherwise be silently installed, or silently missing)."""
    lock = {line.split("==")[0].lower() for line in
            (checks.DEPLOY / "requirements.lock").read_text().split()}
    text = (checks.DEPLOY / "Dockerfile").read_text()
    for group in re.findall(r"\^\(([a-z0-9|._-]+)\)==", text, re.I):
        for name in group.split("|"):
            if "[" in name:
                continue
            assert name.lower() in lock, name
    from kvrec.deploy import image_lock

    assert {name.lower() for name in image_lock.NOT_IN_IMAGE} <= lock



# -- and the worker, started as the StatefulSet starts it, works ------------------------------

@pytest.mark.kafka
def test_a_worker_with_the_manifests_settings_serves_and_stops_within_its_grace_period(
    kafka_bootstrap, rendered, tmp_path
):
    """The StatefulSet's worker, with the variables the manifests give it (the broker, SASL
    aside, and the topic names swapped for this test's), against the real broker: ready, one
    recommendation per event (exactly-once, cold-start mode: no model announced yet), and a
    SIGTERM that ends it, status 0, well within terminationGracePeriodSeconds."""
    docs = rendered["cpu"]
    statefulset = _by(docs, "StatefulSet", "kvrec-worker")
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    worker = next(c for c in checks.kubernetes_containers(docs) if c.where.startswith("StatefulSet"))
    topics = checks.topics()
    group = unique_topic("deploy-group")
    names = {name: unique_topic(f"deploy-{name}") for name in
             ("events", "recommendations", "events-dead-letter", "model-updates", "model-live-stats")}
    names["kvrec-worker-windows-changelog"] = f"{group}-windows-changelog"
    partitions = topics["events"][0]
    for name, (count, configs) in topics.items():  # as the topics Job creates them
        create_topics(kafka_bootstrap, {names[name]: count}, config=configs)
    port = _free_port()
    env = checks._rerooted(worker.env, worker.mounts, tmp_path)
    for key in ("KVREC_SECURITY_PROTOCOL", "KVREC_SASL_MECHANISM", "KVREC_SASL_USERNAME",
                "KVREC_SASL_PASSWORD"):
        env.pop(key)
    env |= {
        "KVREC_BOOTSTRAP_SERVERS": kafka_bootstrap, "KVREC_WORKER_GROUP_ID": group,
        "KVREC_WORKER_INPUT_TOPIC": names["events"], "KVREC_WORKER_OUTPUT_TOPIC": names["recommendations"],
        "KVREC_WORKER_DEAD_LETTER_TOPIC": names["events-dead-letter"],
        "KVREC_WORKER_UPDATES_TOPIC": names["model-updates"],
        "KVREC_WORKER_STATS_TOPIC": names["model-live-stats"],
        "KVREC_WORKER_METRICS_PORT": str(port), "KVREC_WORKER_METRICS_HOST": "127.0.0.1",
    }
    assert env["KVREC_WORKER_PROCESSING_GUARANTEE"] == "exactly-once"
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVREC_")}
    log = tmp_path / "worker.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvrec.stream.cli", *worker.argv],
            env={**base, **env, "PYTHONPATH": str(checks.REPO)}, stderr=stderr, text=True,
        )
    try:
        started = time.monotonic()
        deadline = started + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                if _get(port, "/ready").startswith("ready"):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"not ready in 180 s: {log.read_text()[-2000:]}")
        ready_s = time.monotonic() - started
        events = [{"user_id": f"u{i % 7}", "item_id": f"sku-{i}", "event_type": "view",
                   "ts": int(time.time() * 1000)} for i in range(40)]
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for event in events:
            producer.produce(names["events"], key=event["user_id"], value=json.dumps(event))
        producer.flush(30)
        assert len(_consume(kafka_bootstrap, names["recommendations"], expected=len(events))) == len(events)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=grace)
        stop_s = time.monotonic() - stopping
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"worker with the manifests' settings: ready {ready_s:.1f} s after start, "
          f"{partitions} partitions; SIGTERM to exit {stop_s:.2f} s (status {status}, grace {grace} s)")
    assert status == 0, log.read_text()[-2000:]
    assert stop_s < grace / 2
