"""The k8s/ manifests: RayCluster/RayJob against KubeRay's CRD schemas (closed, so an unknown field fails),
core objects with kubernetes-validate --strict, and raycraft's rules: non-root, no privilege, requests and
limits on every container, secrets only through secretKeyRef, ClusterIP only, RayJobs with an entrypoint,
shutdownAfterJobFinishes and a TTL. Broken copies must be rejected by the same `problems` function."""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

K8S = REPO / "k8s"
# ../shared/k8s-schemas beside the repository; RAYCRAFT_K8S_SCHEMAS names another folder.
SCHEMAS = Path(os.environ.get("RAYCRAFT_K8S_SCHEMAS", REPO.parent / "shared" / "k8s-schemas"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERNETES_VERSION = "1.33.0"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)


def closed(schema):
    """A copy of an OpenAPI schema where every object that lists `properties` rejects others, unless
    Kubernetes keeps unknown fields there (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def crd_validator(kind: str):
    path = SCHEMAS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (expected beside the repository)")
    return _crd_validator(path)


@functools.cache
def _crd_validator(path: Path):
    import jsonschema

    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = closed(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server's ObjectMeta, not by the CRD (its schema is a bare object)
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def schema_problems(doc: dict) -> list[str]:
    kind = doc.get("kind", "?")
    if kind in CRD_FILES:
        validator = crd_validator(kind)
        return [f"{kind} {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except ValidationError as exc:
        return [f"{kind}: {exc.message} at {'/'.join(map(str, exc.path))}"]
    return []


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec inside a manifest, named by where it sits."""
    kind, spec = doc["kind"], doc.get("spec", {})
    out = []
    if kind == "Deployment":
        out.append(("template", spec["template"]["spec"]))
    cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec")
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        out.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    if cluster:
        out.append(("head", cluster["headGroupSpec"]["template"]["spec"]))
        out += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def rule_problems(doc: dict) -> list[str]:
    kind, name = doc["kind"], doc["metadata"]["name"]
    where = f"{kind} {name}"
    found: list[str] = []
    if kind == "Secret":
        found.append(f"{where}: a Secret with its values in the repository; create it with kubectl instead")
    if kind == "Service" and doc["spec"].get("type", "ClusterIP") != "ClusterIP":
        found.append(f"{where}: type {doc['spec']['type']}; only ClusterIP is allowed")
    if kind == "RayJob":
        spec = doc["spec"]
        if not spec.get("entrypoint"):
            found.append(f"{where}: no entrypoint")
        if spec.get("shutdownAfterJobFinishes") is not True:
            found.append(f"{where}: shutdownAfterJobFinishes must be true")
        if not spec.get("ttlSecondsAfterFinished"):
            found.append(f"{where}: no ttlSecondsAfterFinished")
    cluster = doc["spec"] if kind == "RayCluster" else doc["spec"].get("rayClusterSpec") if kind == "RayJob" else None
    if cluster:
        if cluster["headGroupSpec"].get("serviceType", "ClusterIP") != "ClusterIP":
            found.append(f"{where}: the head service must be ClusterIP")
        if not cluster.get("enableInTreeAutoscaling"):
            found.append(f"{where}: autoscaling is off")
        for group in cluster.get("workerGroupSpecs", []):
            if "minReplicas" not in group or "maxReplicas" not in group:
                found.append(f"{where}: worker group {group['groupName']} has no autoscaling bounds")
    for place, pod in pod_specs(doc):
        pod_sec = pod.get("securityContext", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            at = f"{where} {place} container {c['name']}"
            sec = {**pod_sec, **c.get("securityContext", {})}
            if not sec.get("runAsNonRoot") or sec.get("runAsUser") == 0:
                found.append(f"{at}: must run as non-root (runAsNonRoot: true)")
            if sec.get("privileged"):
                found.append(f"{at}: privileged")
            if sec.get("allowPrivilegeEscalation") is not False:
                found.append(f"{at}: allowPrivilegeEscalation must be false")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(part, {}))
                if missing:
                    found.append(f"{at}: no {part} for {', '.join(sorted(missing))}")
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]) and "value" in env:
                    found.append(f"{at}: env {env['name']} holds a secret inline; use valueFrom.secretKeyRef")
    return found


def problems(doc: dict) -> list[str]:
    return schema_problems(doc) + rule_problems(doc)


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(f"{path.name}:{d['kind']}/{d['metadata']['name']}", d)
                 for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict:
    return next(d for _, d in manifests() if d["kind"] == kind)


@pytest.mark.parametrize("name,doc", manifests(), ids=[n for n, _ in manifests()])
def test_manifest_is_valid(name, doc):
    assert problems(doc) == []


def test_every_required_object_is_there():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in manifests()}
    assert {("RayCluster", "raycraft"), ("RayJob", "raycraft-train"), ("RayJob", "raycraft-tune"),
            ("Deployment", "raycraft-mlflow"), ("Service", "raycraft-mlflow")} <= kinds
    entrypoints = {d["metadata"]["name"]: d["spec"]["entrypoint"] for _, d in manifests() if d["kind"] == "RayJob"}
    assert "raycraft train" in entrypoints["raycraft-train"] and "raycraft tune" in entrypoints["raycraft-tune"]
    cluster = by_kind("RayCluster")["spec"]
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cluster["authOptions"]["mode"] == "token"
    mlflow = next(d for _, d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "raycraft-mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://$(DB_USER):$(DB_PASSWORD)@")
    assert (K8S / "Dockerfile").is_file() and "USER 1000" in (K8S / "Dockerfile").read_text()


def _broken(kind: str, breaks) -> dict:
    doc = copy.deepcopy(by_kind(kind))
    breaks(doc)
    return doc


BROKEN = {
    "unknown field in a RayCluster": ("RayCluster", lambda d: d["spec"]["headGroupSpec"].update(replicaz=2)),
    "unknown field in a container": ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
                                     ["spec"]["containers"][0].update(imagePolicy="Always")),
    "missing entrypoint": ("RayJob", lambda d: d["spec"].pop("entrypoint")),
    "privileged container": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]
                             ["containers"][0]["securityContext"].update(privileged=True)),
    "root pod": ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
                 .update(securityContext={"runAsUser": 0})),
    "no limits": ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"].pop("limits")),
    "inline secret": ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "POSTGRES_PASSWORD", "value": "hunter2"})),
    "unknown field in a Deployment": ("Deployment", lambda d: d["spec"].update(replica=1)),
    "LoadBalancer service": ("Service", lambda d: d["spec"].update(type="LoadBalancer")),
    "no TTL": ("RayJob", lambda d: d["spec"].pop("ttlSecondsAfterFinished")),
    "no autoscaling bounds": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][1].pop("maxReplicas")),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_broken_copy_is_rejected(what):
    kind, breaks = BROKEN[what]
    assert problems(by_kind(kind)) == []  # the original passes: the break alone is what fails
    assert problems(_broken(kind, breaks)), f"{what} was accepted"


def test_closed_schema_keeps_open_maps_open():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                                                     "x-kubernetes-preserve-unknown-fields": True}}}
    import jsonschema

    v = jsonschema.Draft7Validator(closed(schema))
    assert not list(v.iter_errors({"a": {"b": "x", "c": 1}}))
    assert list(v.iter_errors({"a": {}, "z": 1}))


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "mlflow.db", "mlruns", "ray_results"} <= set(ignored)
    assert Path(K8S / "Dockerfile").read_text().count("COPY . /app") == 1


def test_rayjob_commands_parse_with_the_real_cli():
    """Each RayJob's `python -m raycraft ...` is parsed by raycraft's own CLI (options and arguments,
    without running it), and what it names exists: a sweep file copied into the image at /app is read
    and validated, a train job's model and dataset are registered."""
    import shlex

    import typer.main

    from raycraft.cli import app
    from raycraft.sweep.config import load_sweep
    from raycraft.train.config import build_config

    group = typer.main.get_command(app)
    for _, doc in manifests():
        if doc["kind"] != "RayJob":
            continue
        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[:3] == ["python", "-m", "raycraft"], words
        name, args = words[3], words[4:]
        ctx = group.get_command(group.make_context("raycraft", [name]), name).make_context(name, list(args))
        params = ctx.params
        if name == "tune":
            sweep_file = REPO / Path(params["file"]).relative_to("/app")
            load_sweep(sweep_file, params["set_"] or [])
        else:
            flags = {k: params[k] for k in ("model", "dataset", "workers", "epochs", "experiment") if params[k]}
            build_config(flags, params["set_"] or [])
