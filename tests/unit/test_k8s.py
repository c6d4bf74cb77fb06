"""The Kubernetes deployment in k8s/, checked without a cluster.

- Ray custom resources against the openAPIV3Schema of the real KubeRay CRDs in
  ../shared/kuberay-crds (never copied into the project), strictly (unknown
  fields are errors, as with kubectl's default --validate=strict), and against
  the KubeRay operator's own rules that a schema cannot say
  (ValidateRayClusterSpec / ValidateRayJobSpec in the operator's validation.go).
- Kubernetes objects, and the pod templates inside the Ray resources, against
  Kubernetes' own schemas (kubernetes-validate, which ships them: no network).
- The manifests against the code: entry points and their options (parsed by
  the jobs' real parsers), Ray version and image tag, GPUs and CPUs against the
  sweep's preset and resource planning, the Serve config against Ray Serve's
  schema and cluster/serve.py, metric names against what the code creates.
- Broken copies of every manifest fail with a readable message.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import re
import shlex
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOC = ROOT / "docs" / "kubernetes.md"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# Kubernetes release whose schemas core objects are checked against (the newest
# bundled one not above it): a few releases old, so the manifests need nothing newer.
K8S_VERSION = "1.30"
SHARED_MOUNT = "/mnt/shared"
GPU = "nvidia.com/gpu"
GPUS_PER_TRAIN_WORKER = 1   # ScalingConfig(use_gpu=True) without a GPU entry in resources_per_worker
PLACEHOLDERS = {"REGISTRY", "STORAGE_CLASS", "GPU_TYPE", "CHANGE_ME", "REDIS_HOST", "CHECKPOINT_ID"}


# --------------------------------------------------------------------------- loading


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@cache
def objects_by_file() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object in k8s/ (files whose documents have apiVersion and kind)."""
    out = {}
    for path in sorted(K8S.rglob("*.yaml")):
        docs = load_yaml_docs(path)
        if docs and all("apiVersion" in d and "kind" in d for d in docs):
            out[str(path.relative_to(K8S))] = docs
    return out


def all_objects() -> list[dict[str, Any]]:
    return [copy.deepcopy(o) for docs in objects_by_file().values() for o in docs]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in all_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def ray_objects() -> list[dict[str, Any]]:
    return [o for o in all_objects() if o["kind"] in CRD_FILES]


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[obj["kind"]](obj["spec"])


def pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"]["template"])] + [
        (f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]   # KubeRay's RayContainerIndex


def gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    groups = [g for g in spec["workerGroupSpecs"] if GPU in ray_container(g["template"])["resources"].get("limits", {})]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    return groups[0]


def quantity(value: str | int) -> float:
    """A Kubernetes CPU or count quantity ("500m", "32", 4) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def load_module(relpath: str):
    """A script of the repository (jobs/*.py, k8s/*.py) as a module, without running it."""
    name = "_k8s_test_" + re.sub(r"\W", "_", relpath)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


# --------------------------------------------------------------------------- validators


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server does with
    kubectl's default strict field validation (a structural schema prunes them otherwise)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    if not CRD_DIR.is_dir():
        reason = f"KubeRay CRDs not found at {CRD_DIR}: Ray resources not validated against their schema"
        warnings.warn(reason)
        print(reason)
        pytest.skip(reason)
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top)"


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of a Ray custom resource, as 'Kind name: field.path: message'."""
    name = obj.get("metadata", {}).get("name", "?")
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{obj['kind']} {name}: {_path(e)}: {e.message}" for e in errors)


def core_errors(obj: dict[str, Any]) -> list[str]:
    """Errors of a Kubernetes object against Kubernetes' schema (strict: unknown fields are errors)."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{obj['kind']} {obj.get('metadata', {}).get('name', '?')}: {_path(e)}: {e.message}"]
    return []


def pod_template_errors(obj: dict[str, Any]) -> list[str]:
    """The pod templates inside a Ray resource, checked as Kubernetes PodTemplates."""
    errors = []
    for where, template in pod_templates(cluster_spec(obj)):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        errors += [f"{obj['kind']} {obj['metadata']['name']} {where}: {e.split(': ', 1)[1]}"
                   for e in core_errors(wrapped)]
    return errors


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def operator_errors(obj: dict[str, Any]) -> list[str]:
    """The KubeRay operator's own checks that the CRD schema cannot express, with its
    messages (ValidateRayClusterSpec, ValidateRayJobSpec, Validate*Metadata in
    ray-operator/controllers/ray/utils/validation.go); a resource failing them is
    accepted by the API server but never reconciled."""
    errors = []
    name = obj["metadata"]["name"]
    if not DNS1035.match(name) or len(name) > 63:
        errors.append(f"{obj['kind']} name should be a valid DNS1035 label: {name!r}")
    annotations = obj["metadata"].get("annotations", {})
    spec = cluster_spec(obj)
    head = spec["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        return errors + ["headGroupSpec should have at least one container"]
    head_env = {e["name"]: e.get("value") for e in ray_container(head["template"]).get("env", [])}
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (spec.get("autoscalerOptions", {}).get("version") == "v2"
                          or head_env.get("RAY_enable_autoscaler_v2") in ("1", "true"))

    def resource_conflict(group: str, params: dict[str, str], resources: dict[str, str] | None) -> None:
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and resources:
            errors.append(f"resource fields should not be set in both rayStartParams and Resources for {group} group")

    resource_conflict("Head", head.get("rayStartParams", {}), head.get("resources"))
    for g in spec.get("workerGroupSpecs", []):
        gname = g["groupName"]
        if not g["template"]["spec"].get("containers"):
            errors.append("workerGroupSpec should have at least one container")
            continue
        if not autoscaling and ("minReplicas" not in g or "maxReplicas" not in g):
            errors.append(f"worker group {gname} must set both minReplicas and maxReplicas "
                          "when autoscaling is disabled")
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if lo < 0 or hi < 0:
            errors.append(f"worker group {gname} has negative minReplicas or maxReplicas")
        if lo > hi:
            errors.append(f"worker group {gname} has minReplicas {lo} greater than maxReplicas {hi}")
        resource_conflict(gname, g.get("rayStartParams", {}), g.get("resources"))
        if v2 and g["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append(f"restartPolicy for worker group {gname} should be Never or unset when using autoscaler V2")
    if v2 and head["template"]["spec"].get("restartPolicy", "Never") != "Never":
        errors.append("restartPolicy for head Pod should be Never or unset when using autoscaler V2")
    if autoscaling and spec.get("autoscalerOptions", {}).get("version") and "RAY_enable_autoscaler_v2" in head_env:
        errors.append("both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set, "
                      "please only use the former")
    if not autoscaling and head_env.get("RAY_enable_autoscaler_v2") in ("1", "true"):
        errors.append("environment variable RAY_enable_autoscaler_v2 cannot be set "
                      "when enableInTreeAutoscaling is false")
    ft = spec.get("gcsFaultToleranceOptions")
    if ft and annotations.get("ray.io/ft-enabled"):
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    if ft and head.get("rayStartParams", {}).get("redis-password"):
        errors.append("cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled")
    if ft and ({"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & head_env.keys()):
        errors.append("cannot set REDIS_PASSWORD or RAY_REDIS_ADDRESS env var in head Pod when "
                      "GcsFaultToleranceOptions is enabled")
    if not ft and not annotations.get("ray.io/ft-enabled") and "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, "
                      "but GcsFaultToleranceOptions is not set")
    auth = spec.get("authOptions", {})
    if auth.get("mode") == "token":
        if not spec.get("rayVersion"):
            errors.append("authOptions.mode is 'token' but RayVersion was not specified")
        elif _version_tuple(spec["rayVersion"]) < (2, 52, 0):
            errors.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {spec['rayVersion']}")
    elif auth.get("enableK8sTokenAuth"):
        errors.append("authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'")
    if obj["kind"] == "RayJob":
        job = obj["spec"]
        if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
        if job.get("clusterSelector") and job.get("backoffLimit", 0) > 0:
            errors.append("BackoffLimit is incompatible with ClusterSelector mode")
        if job.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit must be a positive integer")
    return errors


def all_errors(obj: dict[str, Any]) -> list[str]:
    if obj["kind"] in CRD_FILES:
        # What the API server refuses never reaches the operator.
        return crd_errors(obj) or (pod_template_errors(obj) + operator_errors(obj))
    if obj["kind"] == "PodMonitor":
        return podmonitor_errors(obj)
    return core_errors(obj)


def podmonitor_errors(obj: dict[str, Any]) -> list[str]:
    """The Prometheus Operator's CRD is not available offline: its required fields, by hand."""
    errors = []
    if obj["apiVersion"] != "monitoring.coreos.com/v1":
        errors.append(f"PodMonitor apiVersion must be monitoring.coreos.com/v1, got {obj['apiVersion']}")
    spec = obj.get("spec", {})
    if not isinstance(spec.get("selector"), dict):
        errors.append("PodMonitor spec.selector: required, a label selector")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        errors.append("PodMonitor spec.podMetricsEndpoints: required, a non-empty list")
    else:
        for i, e in enumerate(endpoints):
            if not isinstance(e.get("port"), str):
                errors.append(f"PodMonitor spec.podMetricsEndpoints[{i}].port: must be a container port name")
    return errors


# --------------------------------------------------------------------------- schema validation


def test_every_file_in_k8s_is_known():
    kinds = {f: sorted({o["kind"] for o in docs}) for f, docs in objects_by_file().items()}
    assert kinds == {
        "namespace.yaml": ["Namespace"], "ray-token-secret.yaml": ["Secret"], "storage.yaml": ["PersistentVolumeClaim"],
        "raycluster.yaml": ["RayCluster"], "rayjob-sweep.yaml": ["RayJob"], "rayservice.yaml": ["RayService"],
        "serve-ingress.yaml": ["Ingress"], "prometheus/podmonitor.yaml": ["PodMonitor"],
    }


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_ray_resources_match_the_kuberay_crds(kind):
    objs = [o for o in ray_objects() if o["kind"] == kind]
    assert objs, f"no {kind} in k8s/"
    for obj in objs:
        assert obj["apiVersion"] == "ray.io/v1"
        assert crd_errors(obj) == []
        assert pod_template_errors(obj) == []
        assert operator_errors(obj) == []


def test_kubernetes_objects_match_kubernetes_schemas():
    core = [o for o in all_objects() if o["kind"] not in CRD_FILES and o["kind"] != "PodMonitor"]
    assert {o["kind"] for o in core} == {"Namespace", "Secret", "PersistentVolumeClaim", "Ingress"}
    for obj in core:
        assert core_errors(obj) == []
    assert podmonitor_errors(one("PodMonitor")) == []


@pytest.mark.parametrize("patch_file,kind", [("gcs-ft/raycluster.patch.yaml", "RayCluster"),
                                             ("gcs-ft/rayservice.patch.yaml", "RayService")])
def test_gcs_fault_tolerance_patches_make_valid_resources(patch_file, kind):
    def merge(target: Any, patch: Any) -> Any:   # JSON merge patch, RFC 7386
        if not isinstance(patch, dict):
            return patch
        out = dict(target) if isinstance(target, dict) else {}
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out.get(k), v)
        return out

    (patch,) = load_yaml_docs(K8S / patch_file)
    patched = merge(one(kind), patch)
    ft = cluster_spec(patched)["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith("REDIS_HOST:")
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert all_errors(patched) == []


# A broken copy of each manifest fails with a message that says where and what.
BROKEN = [
    ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "eight"),
     "RayCluster resnet-dist: spec.workerGroupSpecs[0].maxReplicas: 'eight' is not of type 'integer'"),
    ("RayCluster", lambda o: o["spec"].pop("headGroupSpec"),
     "RayCluster resnet-dist: spec: 'headGroupSpec' is a required property"),
    ("RayCluster", lambda o: o["spec"]["headGroupSpec"].__setitem__("rayStartParam", {}),
     "spec.headGroupSpec: Additional properties are not allowed ('rayStartParam' was unexpected)"),
    ("RayCluster", lambda o: o["spec"]["authOptions"].__setitem__("mode", "tokens"),
     "spec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']"),
    ("RayCluster", lambda o: ray_container(o["spec"]["headGroupSpec"]["template"]).__setitem__(
        "env", [{"name": "RAY_enable_autoscaler_v2", "value": "1"}]),
     "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set"),
    ("RayCluster", lambda o: o["spec"]["workerGroupSpecs"][0].__setitem__("minReplicas", 9),
     "worker group gpu has minReplicas 9 greater than maxReplicas 8"),
    ("RayCluster", lambda o: o["spec"].__setitem__("rayVersion", "2.51.0"),
     "authOptions.mode is 'token' but minimum Ray version is 2.52.0, got 2.51.0"),
    ("RayCluster", lambda o: ray_container(o["spec"]["workerGroupSpecs"][0]["template"])["resources"][
        "limits"].__setitem__(GPU, "four"),
     "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu: 'four' does not match"),
    ("RayJob", lambda o: o["spec"].__setitem__("shutdownAfterJobFinish", o["spec"].pop("shutdownAfterJobFinishes")),
     "RayJob resnet-dist-sweep: spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"),
    ("RayJob", lambda o: o["spec"].__setitem__("backoffLimit", "2"),
     "RayJob resnet-dist-sweep: spec.backoffLimit: '2' is not of type 'integer'"),
    ("RayJob", lambda o: o["spec"].__setitem__("shutdownAfterJobFinishes", False),
     "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"),
    ("RayService", lambda o: o["spec"].pop("rayClusterConfig"),
     "RayService classifier: spec: 'rayClusterConfig' is a required property"),
    ("RayService", lambda o: o["spec"].__setitem__("serveConfigV2", {"applications": []}),
     "RayService classifier: spec.serveConfigV2: {'applications': []} is not of type 'string'"),
    ("RayService", lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"].__setitem__(
        "restartPolicy", "Always"),
     "restartPolicy for head Pod should be Never or unset when using autoscaler V2"),
    ("PersistentVolumeClaim", lambda o: o["spec"].__setitem__("accessModes", "ReadWriteMany"),
     "PersistentVolumeClaim resnet-dist-shared: spec.accessModes: 'ReadWriteMany' is not of type 'array'"),
    ("Secret", lambda o: o.__setitem__("stringdata", o.pop("stringData")),
     "Secret resnet-dist-ray-token: (top): Additional properties are not allowed ('stringdata' was unexpected)"),
    ("Ingress", lambda o: o["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"].__setitem__(
        "number", "8000"),
     "Ingress classifier: spec.rules[0].http.paths[0].backend.service.port.number: '8000' is not of type 'integer'"),
    ("Namespace", lambda o: o["metadata"].__setitem__("name", 7),
     "Namespace 7: metadata.name: 7 is not of type 'string'"),
    ("PodMonitor", lambda o: o["spec"].pop("podMetricsEndpoints"),
     "PodMonitor spec.podMetricsEndpoints: required, a non-empty list"),
]


@pytest.mark.parametrize("kind,mutate,message", BROKEN, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BROKEN)])
def test_a_broken_manifest_fails_with_a_readable_message(kind, mutate, message):
    obj = one(kind)
    assert all_errors(obj) == []
    mutate(obj)
    errors = all_errors(obj)
    assert any(message in e for e in errors), f"{message!r} not in {errors}"


# --------------------------------------------------------------------------- the image


def _dockerfile() -> dict[str, Any]:
    text = (K8S / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    args = {m.group(1): m.group(2) for ln in lines if (m := re.match(r"ARG (\w+)=(\S+)", ln))}
    base = next(ln.split()[1] for ln in lines if ln.startswith("FROM "))
    for k, v in args.items():
        base = base.replace("${" + k + "}", v)
    copies = []
    for ln in lines:
        if ln.startswith("COPY "):
            parts = [p for p in shlex.split(ln)[1:] if not p.startswith("--")]
            copies.append((parts[:-1], parts[-1]))
    return {"text": text, "lines": lines, "args": args, "base": base, "copies": copies,
            "users": [ln.split()[1] for ln in lines if ln.startswith("USER ")],
            "workdir": [ln.split()[1] for ln in lines if ln.startswith("WORKDIR ")][-1]}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    dep = next(d for d in _pyproject()["project"]["dependencies"] if re.match(rf"{name}(\[|=)", d))
    return dep.split("==")[1]


IMAGE_REPO = "REGISTRY/resnet-dist"


def image_tag() -> str:
    d = _dockerfile()
    return f"{_pyproject()['project']['version']}-ray{d['args']['RAY_VERSION']}-{d['args']['PYTHON_TAG']}-gpu"


def test_dockerfile_is_ray_at_the_pinned_version_running_as_non_root():
    d = _dockerfile()
    ray_pin = _pin("ray")   # "2.60.*"
    assert d["base"] == f"rayproject/ray:{d['args']['RAY_VERSION']}-{d['args']['PYTHON_TAG']}-gpu"
    assert re.fullmatch(ray_pin.replace(".", r"\.").replace("*", r"\d+"), d["args"]["RAY_VERSION"]), \
        f"Dockerfile's Ray {d['args']['RAY_VERSION']} is not pyproject's ray=={ray_pin}"
    # The image's Python is one the project supports.
    py = d["args"]["PYTHON_TAG"]
    assert re.fullmatch(r"py3\d+", py)
    lo, hi = re.findall(r"3\.(\d+)", _pyproject()["project"]["requires-python"])
    assert int(lo) <= int(py[3:]) < int(hi)
    # The pinned torch and torchvision, as in pyproject.
    for name in ("torch", "torchvision"):
        assert f'"{name}=={_pin(name)}"' in d["text"], f"Dockerfile must install {name}=={_pin(name)}"
    # Non-root: the base image's `ray` user, never switched back to root.
    assert d["users"] and all(u == "ray" for u in d["users"])
    assert d["workdir"] == "/home/ray/resnet-dist"


def test_image_and_main_script_start_ray_in_serves_throughput_mode():
    # Serve reads these when its processes start: the image (every pod) and scripts/main.sh
    # (the local `ray start`) must carry the values that cluster/runtime.py sets for a local Ray.
    from cluster.runtime import SERVE_ENV

    image_env = dict(kv.split("=", 1) for ln in _dockerfile()["lines"] if ln.startswith("ENV ")
                     for kv in shlex.split(ln)[1:])
    main_env = dict(kv.split("=", 1) for ln in (ROOT / "scripts" / "main.sh").read_text().splitlines()
                    if ln.startswith("export RAY_SERVE_") for kv in shlex.split(ln)[1:])
    for key, value in SERVE_ENV.items():
        assert image_env.get(key) == value, f"k8s/Dockerfile must set ENV {key}={value}"
        assert main_env.get(key) == value, f"scripts/main.sh must export {key}={value}"


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    d = _dockerfile()
    ignore = [ln.strip() for ln in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "the ignore file must start from nothing"
    included = {ln[1:] for ln in ignore if ln.startswith("!")}
    sources = [s for srcs, _ in d["copies"] for s in srcs]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src in included, f"Dockerfile copies {src}, but k8s/Dockerfile.dockerignore leaves it out"
    for entry in included:
        assert entry in sources, f"Dockerfile.dockerignore lets in {entry}, which the Dockerfile does not copy"


def test_ray_version_and_image_agree_everywhere():
    d = _dockerfile()
    image = f"{IMAGE_REPO}:{image_tag()}"
    for obj in ray_objects():
        spec = cluster_spec(obj)
        assert spec["rayVersion"] == d["args"]["RAY_VERSION"], obj["metadata"]["name"]
        for where, template in pod_templates(spec):
            for c in template["spec"]["containers"]:
                assert c["image"] == image, f"{obj['kind']} {where}: {c['image']} != {image}"
    # The build command of the Dockerfile and of the docs tags that image.
    assert f"-t {image} ." in d["text"]
    assert f"-t {image} ." in DOC.read_text()


# --------------------------------------------------------------------------- entry points


class _Parsed(Exception):
    pass


def parse_command(tokens: list[str], monkeypatch) -> list[tuple[str, Any]]:
    """Parse `python SCRIPT ARGS` with SCRIPT's own parser; follows wait_for_gpus.py's command.
    Returns (script, parsed) for each script in the chain; argparse errors fail the test."""
    assert tokens[0] == "python" and tokens[1].endswith(".py"), f"not a python command: {tokens}"
    script = tokens[1].removeprefix(_dockerfile()["workdir"] + "/")
    assert (ROOT / script).is_file(), f"{tokens[1]}: {script} does not exist in the repository"
    argv = tokens[2:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if script == "jobs/sweep.py":
                # The job's real main(): parse, build the SweepConfig, and stop before validate() reads data.
                import cluster.sweep_config

                def stop(cfg):
                    raise _Parsed(cfg)

                monkeypatch.setattr(cluster.sweep_config, "validate", stop)
                with pytest.raises(_Parsed) as parsed:
                    load_module(script).main(argv)
                return [(script, parsed.value.args[0])]
            module = load_module(script)
            args = module.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{script} refuses {shlex.join(argv)}: {err.getvalue().strip()} (exit {e.code})")
    if script == "k8s/wait_for_gpus.py":
        return [(script, args)] + parse_command(args.command, monkeypatch)
    return [(script, args)]


def doc_commands() -> list[list[str]]:
    """Every command of docs/kubernetes.md's code blocks that runs a script of the repository."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if ".py" not in line:
                continue
            tokens = shlex.split(re.sub(r"\s+#\s.*$", "", line))
            starts = [i for i in range(len(tokens) - 1) if tokens[i] == "python" and tokens[i + 1].endswith(".py")]
            if starts:
                commands.append(tokens[starts[0]:])
    return commands


def test_rayjob_entrypoint_runs_scripts_and_options_that_exist(monkeypatch):
    job = one("RayJob")
    chain = parse_command(shlex.split(job["spec"]["entrypoint"]), monkeypatch)
    assert [s for s, _ in chain] == ["k8s/wait_for_gpus.py", "jobs/sweep.py"]
    cfg = chain[-1][1]
    assert cfg.storage.startswith(SHARED_MOUNT + "/") and cfg.data_dir.startswith(SHARED_MOUNT + "/")
    assert not cfg.serve, "the RayJob's cluster is deleted after the job: serve with rayservice.yaml instead"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1, "retries (on a new cluster) resume the sweep from the shared storage"
    assert "clusterSelector" not in spec, "a RayJob retry needs a cluster of its own"


def test_documented_commands_parse_with_the_jobs_parsers(monkeypatch):
    commands = doc_commands()
    scripts = [s for cmd in commands for s, _ in parse_command(cmd, monkeypatch)]
    assert {"jobs/prepare_data.py", "jobs/sweep.py", "k8s/wait_for_gpus.py", "jobs/predict.py"} <= set(scripts)
    # The sweep submitted by hand is the RayJob's.
    job_cmd = one("RayJob")["spec"]["entrypoint"]
    assert any(shlex.join(cmd) == job_cmd for cmd in commands), "docs' `ray job submit` of the sweep != the RayJob's"


def test_wait_for_gpus_refuses_a_bad_request(monkeypatch):
    module = load_module("k8s/wait_for_gpus.py")
    err = io.StringIO()
    for argv in (["--gpus", "6", "--bundle-gpus", "4", "--", "true"], ["--gpus", "4"]):
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
            module.parse_args(argv)
    assert "multiple of --bundle-gpus" in err.getvalue() and "no command to run" in err.getvalue()
    assert module.parse_args(["--gpus", "0"]).command == []


# --------------------------------------------------------------------------- resources


def _group_shape(spec: dict[str, Any]) -> tuple[int, float, int]:
    """(max pods, CPUs per pod, GPUs per pod) of the GPU worker group."""
    group = gpu_group(spec)
    limits = ray_container(group["template"])["resources"]["limits"]
    return group["maxReplicas"], quantity(limits["cpu"]), int(limits[GPU])


def _check_sweep_fits(cfg, spec: dict[str, Any], wait_args) -> None:
    from cluster.resources import plan_resources

    max_pods, pod_cpus, pod_gpus = _group_shape(spec)
    head_cpus = quantity(spec["headGroupSpec"]["rayStartParams"].get(
        "num-cpus", ray_container(spec["headGroupSpec"]["template"])["resources"]["limits"]["cpu"]))
    trial_gpus = cfg.workers_per_trial * GPUS_PER_TRAIN_WORKER
    # The preset at full concurrency fills the group exactly, one trial per pod's GPUs.
    assert trial_gpus * cfg.max_concurrent == max_pods * pod_gpus, \
        f"{cfg.max_concurrent} trials x {trial_gpus} GPUs != {max_pods} pods x {pod_gpus} GPUs"
    assert pod_gpus % trial_gpus == 0, "a trial's Train workers should fit on one pod"
    assert wait_args.gpus == max_pods * pod_gpus and wait_args.bundle_gpus == pod_gpus
    # Whatever number of pods the autoscaler has brought up when the sweep starts, the plan's
    # Train workers fit the pods they land on (a GPU each, their CPUs beside it).
    for pods in range(1, max_pods + 1):
        plan = plan_resources(cfg.workers_per_trial, cfg.max_concurrent, head_cpus + pods * pod_cpus,
                              pods * pod_gpus, int(pod_cpus))
        assert plan.use_gpu and plan.max_concurrent * plan.workers <= pods * pod_gpus
        assert plan.cpus_per_worker * pod_gpus <= pod_cpus, \
            f"with {pods} pods the sweep asks {plan.cpus_per_worker:g} CPUs per GPU worker: more than a pod has"
        if pods == max_pods:
            assert plan.max_concurrent == cfg.max_concurrent
            assert pod_cpus - plan.cpus_per_worker * pod_gpus >= 1, "no CPU left on a pod for Ray Data"


def test_gpus_of_the_sweep_match_the_worker_group(monkeypatch):
    job = one("RayJob")
    chain = parse_command(shlex.split(job["spec"]["entrypoint"]), monkeypatch)
    _check_sweep_fits(chain[1][1], job["spec"]["rayClusterSpec"], chain[0][1])
    # The same command submitted to the long-lived cluster (docs) fits it too.
    _check_sweep_fits(chain[1][1], one("RayCluster")["spec"], chain[0][1])


def test_head_has_no_gpus_and_gpu_pods_tolerate_gpu_nodes():
    for obj in ray_objects():
        spec = cluster_spec(obj)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert head["rayStartParams"]["num-cpus"] == "0", "no tasks or actors on the head: it runs the drivers"
        resources = ray_container(head["template"])["resources"]
        assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
        group = gpu_group(spec)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        container = ray_container(group["template"])
        assert container["resources"]["requests"][GPU] == container["resources"]["limits"][GPU]
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in tolerations)


def test_every_ray_pod_mounts_the_shared_claim():
    pvc = one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for obj in ray_objects():
        for where, template in pod_templates(cluster_spec(obj)):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            mounts = {m["mountPath"]: m for m in ray_container(template)["volumeMounts"]}
            assert SHARED_MOUNT in mounts, f"{obj['kind']} {where} does not mount {SHARED_MOUNT}"
            volume = volumes[mounts[SHARED_MOUNT]["name"]]
            assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_token_auth_from_the_secret():
    secret = one("Secret")
    assert secret["stringData"] == {"auth_token": "CHANGE_ME"}, "never commit a real token"
    for obj in ray_objects():
        spec = cluster_spec(obj)
        assert spec["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
        for _, template in pod_templates(spec):   # KubeRay sets these from authOptions; twice would clash
            names = {e["name"] for e in ray_container(template).get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_one_namespace():
    ns = one("Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in all_objects() if o["kind"] != "Namespace"} == {ns}


def test_placeholders_are_the_documented_ones():
    def strings(node: Any):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    found = set()
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml_docs(path):
            for s in strings(doc):
                found |= set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*\b", s)) - {"GPU", "CPU"}
    assert found == PLACEHOLDERS
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", DOC.read_text(), re.M))
    assert documented == PLACEHOLDERS


# --------------------------------------------------------------------------- serving


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


def test_serve_config_is_valid_for_ray_serve_and_the_app():
    from ray.serve.schema import ServeDeploySchema

    import cluster.serve as app

    config = _serve_config()
    ServeDeploySchema.model_validate(config)   # Ray Serve's own schema of a config file
    (application,) = config["applications"]
    module, attr = application["import_path"].split(":")
    assert module == "cluster.serve" and getattr(app, attr) is app.app_builder
    args = application["args"]
    # What app_builder accepts: ServeConfig fields less the ones the config file sets itself.
    allowed = {f.name for f in dataclasses.fields(app.ServeConfig)} - set(app.DEPLOY_ONLY_FIELDS)
    assert set(args) <= allowed
    (deployment,) = application["deployments"]
    assert deployment["name"] == app.DEPLOYMENT_NAME
    assert set(deployment["user_config"]) == set(app.LIVE_FIELDS)
    # The settings together pass the app's own validation.
    app.ServeConfig(**args, **deployment["user_config"]).validated()
    assert config["http_options"]["port"] == 8000 and config["http_options"]["host"] == "0.0.0.0"


def test_app_builder_refuses_unknown_or_deploy_only_arguments():
    import cluster.serve as app
    from resnet_dist.config import ConfigError

    with pytest.raises(ConfigError, match="unknown serve argument.*max_replica\\b"):
        app.app_builder({"checkpoint": "/x", "max_replica": 2})
    with pytest.raises(ConfigError, match="unknown serve argument.*port"):
        app.app_builder({"checkpoint": "/x", "port": 9000})
    with pytest.raises(ConfigError, match="need `checkpoint`"):
        app.app_builder({"replicas": 1})


def test_serve_serves_the_sweeps_model_on_its_gpu_pods(monkeypatch):
    args = _serve_config()["applications"][0]["args"]
    sweep = parse_command(shlex.split(one("RayJob")["spec"]["entrypoint"]), monkeypatch)[-1][1]
    assert args["checkpoint"] == f"{sweep.storage}/{sweep.name}", "serve the sweep directory the RayJob writes"
    max_pods, pod_cpus, pod_gpus = _group_shape(one("RayService")["spec"]["rayClusterConfig"])
    per_pod = min(pod_gpus // args["num_gpus"], pod_cpus // args["num_cpus"])
    assert per_pod >= 1, "a replica does not fit a GPU pod"
    assert args["max_replicas"] <= max_pods * per_pod, "max_replicas more than the worker group can hold"


def test_ingress_reaches_the_serve_service():
    service = one("RayService")
    ingress = one("Ingress")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    # KubeRay's Serve Service: <RayService name>-serve-svc.
    assert backend["name"] == f"{service['metadata']['name']}-serve-svc"
    assert backend["port"]["number"] == _serve_config()["http_options"]["port"]
    # The proxy's body limit lets the app's largest request through.
    from cluster.serve import ServeConfig

    limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert re.fullmatch(r"\d+m", limit) and int(limit[:-1]) * 2**20 > ServeConfig("x").max_body_bytes


# --------------------------------------------------------------------------- metrics


def test_every_ray_pod_exposes_the_metrics_port_prometheus_scrapes():
    monitor = one("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    scrape = yaml.safe_load((K8S / "prometheus" / "scrape-config.yaml").read_text())
    (job,) = scrape["scrape_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_container_port_name"] == endpoint["port"]
    for label, value in selector.items():
        assert keep["__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", label)] == value
    for obj in ray_objects():
        for where, template in pod_templates(cluster_spec(obj)):
            ports = {p["name"]: p["containerPort"] for p in ray_container(template)["ports"]}
            group = cluster_spec(obj)["headGroupSpec"] if where == "head" else gpu_group(cluster_spec(obj))
            assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"] == "8080"
            labels = template["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{obj['kind']} {where} is not selected by the PodMonitor"
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/scrape"] == "true"


SERVE_TAGS = ("deployment", "replica", "application")   # what ray.serve.metrics adds inside a replica


def exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (kind, labels) of every metric the code creates (cluster/metrics.py, cluster/serve.py)."""
    import ray.serve.metrics
    from ray.util.metrics import Counter, Gauge, Histogram

    from cluster.metrics import TrainMetrics
    from cluster.serve import model_info_gauge

    kinds = {Gauge: "gauge", Counter: "counter", Histogram: "histogram"}
    metrics = [*vars(TrainMetrics({})).values(), model_info_gauge()]
    out = {}
    for metric in metrics:
        kind = next((k for cls, k in kinds.items() if isinstance(metric, cls)), None)
        if kind is None:
            continue
        # Outside a replica (here) ray.serve.metrics adds no labels; in one, Serve's come first.
        serve_tags = SERVE_TAGS if type(metric).__module__ == ray.serve.metrics.__name__ else ()
        out[metric._name] = (kind, serve_tags + tuple(metric._tag_keys))
    return out


def ray_serve_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (kind, labels) of the metrics the installed Ray Serve registers, read from its source
    (most are created deep inside the proxy, router and replicas, which need a running cluster)."""
    import ray.serve

    root = Path(ray.serve.__file__).parent
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        if "tests" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())
        # Counter/Gauge/Histogram imported from ray.serve.metrics add Serve's labels.
        serve_classes = {a.asname or a.name for n in ast.walk(tree)
                         if isinstance(n, ast.ImportFrom) and n.module == "ray.serve.metrics" for a in n.names}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[:1] + [k.value for k in node.keywords if k.arg == "name"]
            if kind not in ("Counter", "Gauge", "Histogram") or not first:
                continue
            if isinstance(first[0], ast.Constant) and isinstance(first[0].value, str):
                name = first[0].value
            elif isinstance(first[0], ast.JoinedStr):   # f"serve_num_{protocol_name}_requests": HTTP's
                name = "".join(v.value if isinstance(v, ast.Constant) else "http" for v in first[0].values)
            else:
                continue
            tags = next((k.value for k in node.keywords if k.arg == "tag_keys"), None)
            labels = {e.value for e in tags.elts} if isinstance(tags, ast.Tuple) else set()
            if isinstance(func, ast.Name) and kind in serve_classes:
                labels |= set(SERVE_TAGS)
            out[name] = (kind.lower(), frozenset(labels))
    return out


SERIES_SUFFIXES = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def test_metric_list_is_what_the_code_and_ray_serve_export():
    from cluster.serve import MODEL_INFO_METRIC, PROMETHEUS_NAMES

    listed = yaml.safe_load((K8S / "grafana" / "metrics.yaml").read_text())
    assert listed["prefix"] == "ray_"
    exported, serve = exported_metrics(), ray_serve_metrics()
    assert len(serve) > 40, "the scan of Ray Serve's source found too few metrics to be trusted"
    for name, info in listed["metrics"].items():
        if info.get("source") == "ray_serve":
            assert name in serve, f"{name} is not a metric of the installed Ray Serve"
            assert serve[name] == (info["kind"], frozenset(info["labels"])), name
        else:
            assert name in exported, f"{name} is not a metric of cluster/metrics.py or cluster/serve.py"
            assert exported[name] == (info["kind"], tuple(info["labels"])), name
    # Serving is measured by Serve: the project's only serving metric is what Serve cannot know.
    assert [n for n in exported if "_serve_" in n] == [MODEL_INFO_METRIC]
    assert MODEL_INFO_METRIC not in serve
    # cluster/serve.py's own table of scraped names follows the same rule.
    for name, scraped in PROMETHEUS_NAMES.items():
        kind = exported[name][0]
        assert scraped == "ray_" + name + ("_total" if kind == "counter" else "")


def test_dashboard_queries_only_exported_metrics_and_labels():
    listed = yaml.safe_load((K8S / "grafana" / "metrics.yaml").read_text())["metrics"]
    series = {f"ray_{name}{suffix}": name for name, info in listed.items() for suffix in SERIES_SUFFIXES[info["kind"]]}
    dashboard = json.loads((K8S / "grafana" / "resnet-dist.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = set()
    promql_words = {"sum", "max", "min", "avg", "by", "without", "rate", "histogram_quantile", "le", "label_values",
                    "increase"}
    for expr in exprs:
        names = set(re.findall(r"\bray_[a-z0-9_]+", expr))
        assert names, f"no project metric in {expr!r}"
        for n in names:
            assert n in series, f"dashboard queries {n}, which the code does not export (k8s/grafana/metrics.yaml)"
            used.add(series[n])
        labels = set(re.findall(r"by \(([^)]*)\)", expr))
        labels = {x.strip() for group in labels for x in group.split(",")}
        labels |= set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
        allowed = {lab for n in names for lab in listed[series[n]]["labels"]} | {"le"}
        assert labels - promql_words <= allowed, f"{expr!r} uses labels {labels - promql_words - allowed}"
    assert used == set(listed), f"listed but not on the dashboard: {set(listed) - used}"
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in ("training throughput", "data wait", "epoch time", "validation accuracy per trial", "request rate",
                   "latency p50 / p99", "batch size", "error rate", "queues", "model served"):
        assert wanted in titles, f"no dashboard panel for {wanted}"
    # Grafana's own structure: unique ids, a Prometheus query per target.
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["type"] == "prometheus" for p in panels for t in p["targets"])
