"""deploy/: Kubernetes manifests, the compose file and the Dockerfiles, checked offline against the code they run.

The kustomize base and overlay are rendered by a small renderer below (resources, strategic-merge patches with
``$patch: delete``, namespace, images: the only features deploy/k8s uses; anything else is refused), every
object is validated against the Kubernetes JSON schemas (kubernetes_validate), and the settings are read back
through the services' own config classes, so a port, an address or a variable name that does not match what
the code binds or reads fails here, not in a cluster.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import http.server
import importlib.util
import re
import shlex
import threading
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.config import GatewayConfig
from gateway.modes import production_problems
from ranking_svc.config import RankingConfig
from recsys_cli.main import build_parser
from recsys_common.config import ConfigError
from retrieval_svc.config import RetrievalConfig
from tests.pki import CA

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
# Oldest supported cluster, and the newest schemas kubernetes_validate ships (removed APIs fail there).
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
CONFIGS = {"RECSYS_RETRIEVAL_": RetrievalConfig, "RECSYS_RANKING_": RankingConfig, "RECSYS_GATEWAY_": GatewayConfig}
SERVICE_MODULES = {"retrieval_svc": "RECSYS_RETRIEVAL_", "ranking_svc": "RECSYS_RANKING_", "gateway": "RECSYS_GATEWAY_"}
OUR_IMAGES = {"recsys-serving": "Dockerfile.serving", "recsys-exporter": "Dockerfile.exporter"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}

# -- a minimal kustomize -------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


def _merge(base: Any, patch: Any, where: str) -> Any:
    """Strategic merge as deploy/ uses it: maps merge, named objects merge by name, scalar lists and null replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base[k], v, f"{where}.{k}") if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list):
        if not any(isinstance(x, dict | list) for x in base + patch):
            return patch  # lists of scalars (args, command) are replaced
        if not all(isinstance(x, dict) and "name" in x for x in base + patch):
            raise NotImplementedError(f"{where}: this renderer merges only lists of named objects; keep patches simple")
        merged = {x["name"]: x for x in base}
        for x in patch:
            merged[x["name"]] = _merge(merged[x["name"]], x, f"{where}[{x['name']}]") if x["name"] in merged else x
        return list(merged.values())
    return patch


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"] if kind == "Pod" else None


def render(kdir: Path) -> list[dict[str, Any]]:
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources", "patches", "namespace", "images"}
    assert not unknown, f"{kdir}/kustomization.yaml uses {sorted(unknown)}, which tests/test_deploy.py cannot render"
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = kdir / entry
        docs += render(path) if path.is_dir() else _docs(path)
    keys = [_key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"{kdir}: duplicate objects {sorted(k for k in keys if keys.count(k) > 1)}"
    for entry in kust.get("patches", []):
        assert set(entry) <= {"path", "patch"}, f"{kdir}: only path/patch patches are rendered here, got {entry}"
        text = entry["patch"] if "patch" in entry else (kdir / entry["path"]).read_text()
        for patch in (p for p in yaml.safe_load_all(text) if p):
            delete = patch.pop("$patch", None) == "delete"
            at = [i for i, d in enumerate(docs) if _key(d) == _key(patch)]
            assert len(at) == 1, f"{kdir}: patch target {_key(patch)} not found"
            if delete:
                del docs[at[0]]
            else:
                docs[at[0]] = _merge(docs[at[0]], patch, "/".join(_key(patch)))
    for doc in docs:
        if kust.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kust["namespace"]
        spec = pod_spec(doc)
        for image in kust.get("images", []) if spec else []:
            for c in spec["containers"]:
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


BASE = render(K8S / "base")
OVERLAY = render(K8S / "overlays" / "example")
RENDERS = {"base": BASE, "overlay": OVERLAY}
STANDALONE = sorted((K8S / "overlays" / "example" / "tools").glob("*.yaml"))
TOOLS = [d for path in STANDALONE for d in _docs(path)]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if (spec := pod_spec(doc)) is not None:
            yield doc, spec


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var["value"]
    return env


def service_config(env: dict[str, str], prefix: str) -> Any:
    """The service's config exactly as from_env builds it from this environment (validation included)."""
    return CONFIGS[prefix].from_env(env)


def module_of(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"] and command[2] in SERVICE_MODULES, f"unexpected command {command}"
    assert importlib.util.find_spec(f"{command[2]}.__main__") is not None, f"{command[2]} has no __main__"
    return command[2]


def parse_cli(args: list[str]) -> Any:
    """Parse as `recsys` would; a flag it does not know fails the test (argparse would exit 2 in the pod)."""
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`recsys {' '.join(args)}` is not a valid command line (see recsys_cli/main.py)")


def serving_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], Any]]:
    """(workload, container, config) for every service container (those started with `python -m <service>`)."""
    for doc, spec in workloads(docs):
        for c in spec["containers"]:
            if c.get("command", [""])[0] == "python":
                prefix = SERVICE_MODULES[module_of(c["command"])]
                yield doc, c, service_config(container_env(docs, c), prefix)


def listen_ports(config: Any) -> set[int]:
    return {getattr(config, f) for f in ("port", "http_port", "grpc_port") if hasattr(config, f)}


# -- Kubernetes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(version: str) -> None:
    docs = BASE + OVERLAY + TOOLS
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{'/'.join(_key(doc))}: {'.'.join(map(str, err.path))}: {err.message}")
    assert problems == []


def test_every_manifest_file_is_rendered() -> None:
    """A YAML file no kustomization reaches is never applied: it must be listed (or be a documented tool)."""
    used = set(STANDALONE)
    for kust in K8S.rglob("kustomization.yaml"):
        used.add(kust)
        spec = yaml.safe_load(kust.read_text())
        used |= {(kust.parent / e).resolve() for e in spec.get("resources", [])}
        used |= {(kust.parent / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
    assert {p.resolve() for p in K8S.rglob("*.yaml")} - {p.resolve() for p in used} == set()


def test_overlay_is_what_the_renderer_says() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in OVERLAY}
    assert ("Deployment", "retrieval") in {(d["kind"], d["metadata"]["name"]) for d in BASE}
    assert ("Deployment", "retrieval") not in names and ("Service", "retrieval") not in names
    assert {("Deployment", "retrieval-0"), ("Deployment", "retrieval-1"), ("StatefulSet", "redis")} <= names
    assert all(d["metadata"]["namespace"] == "recsys" for d in OVERLAY if d["kind"] != "Namespace")
    images = {c["image"] for _, spec in workloads(OVERLAY) for c in spec["containers"]}
    assert images == {
        "registry.example.com/recsys/serving:0.1.0",
        "registry.example.com/recsys/exporter:0.1.0",
        "redis:7.2.4-bookworm",
    }
    assert find(OVERLAY, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"] == 3


def test_images_are_ours_or_pinned() -> None:
    kust = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    assert {i["name"] for i in kust["images"]} == set(OUR_IMAGES), "an images: entry that matches nothing is a no-op"
    for name, dockerfile in OUR_IMAGES.items():
        assert (DOCKER / dockerfile).is_file(), f"{name} is built from deploy/docker/{dockerfile}"
    for _, spec in workloads(BASE + OVERLAY + TOOLS):
        for c in spec["containers"]:
            assert c["image"] in OUR_IMAGES or re.fullmatch(r"[\w./-]+:\d[\w.-]*", c["image"]), c["image"]


@pytest.mark.parametrize("render_name", [*RENDERS, "tools"])
def test_pods_are_locked_down_and_sized(render_name: str) -> None:
    for doc, spec in workloads(RENDERS.get(render_name, TOOLS)):
        where = "/".join(_key(doc))
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}: {part}"


@pytest.mark.parametrize("render_name", RENDERS)
def test_ports_probes_and_settings_match_what_the_services_bind(render_name: str) -> None:
    docs = RENDERS[render_name]
    seen = set()
    for doc, c, config in serving_containers(docs):
        where = f"{doc['metadata']['name']}/{c['name']}"
        seen.add(module_of(c["command"]))
        ports = {p["containerPort"]: p["name"] for p in c["ports"]}
        assert config.host == "0.0.0.0", f"{where}: a service bound to {config.host} is unreachable in a pod"
        assert listen_ports(config) <= set(ports), f"{where}: binds {listen_ports(config)}, declares {set(ports)}"
        # The gateway serves GET /metrics beside its REST API; the gRPC services on their own HTTP port.
        metrics_port = config.http_port if isinstance(config, GatewayConfig) else config.metrics_port
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == metrics_port and metrics_port in ports, where
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[probe_name]
            if "exec" in probe:  # healthcheck.py over TLS (test_probes_speak_tls_with_the_pods_own_files)
                args = healthcheck.build_parser().parse_args(probe["exec"]["command"][2:])
                action = {"port": int(args.address.rsplit(":", 1)[1]), "service": args.service}
            else:
                action = probe.get("grpc") or probe.get("httpGet")
            assert action["port"] in listen_ports(config), f"{where}: {probe_name} port {action['port']}"
            if "httpGet" in probe:
                assert action["path"] == "/healthz" and action["port"] == config.http_port, where
            else:
                assert action["service"] == "" and ports[action["port"]] == "grpc", where
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        bundles = next(m for m in mounts.values() if m["mountPath"] == str(config.bundles_dir))
        assert bundles["readOnly"] is True, where
        assert volumes[bundles["name"]]["persistentVolumeClaim"] == {"claimName": "recsys-bundles", "readOnly": True}
    assert seen == set(SERVICE_MODULES)


@pytest.mark.parametrize("render_name", RENDERS)
def test_shutdown_has_time_for_prestop_and_grace(render_name: str) -> None:
    for doc, c, config in serving_containers(RENDERS[render_name]):
        prestop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert prestop[0] == "sleep"
        # In-flight requests get grace_s after SIGTERM (the gateway drains REST and gRPC together).
        needed = float(prestop[1]) + config.grace_s + 2
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed, doc["metadata"]["name"]


@pytest.mark.parametrize("render_name", RENDERS)
def test_services_hpas_and_pdbs_point_at_one_workload(render_name: str) -> None:
    docs = RENDERS[render_name]
    pods = [(d, s, d["spec"]["template"]["metadata"]["labels"]) for d, s in workloads(docs) if d["kind"] != "CronJob"]

    def selected(selector: dict[str, str]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, str]]]:
        return [p for p in pods if selector.items() <= p[2].items()]

    for doc in docs:
        name = "/".join(_key(doc))
        if doc["kind"] == "Service":
            hits = selected(doc["spec"]["selector"])
            assert len(hits) == 1, f"{name} selects {len(hits)} workloads, not one"
            ports = {p[k] for c in hits[0][1]["containers"] for p in c["ports"] for k in ("name", "containerPort")}
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports, name
        elif doc["kind"] == "PodDisruptionBudget":
            assert len(selected(doc["spec"]["selector"]["matchLabels"])) == 1, name
        elif doc["kind"] == "HorizontalPodAutoscaler":
            target = find(docs, doc["spec"]["scaleTargetRef"]["kind"], doc["spec"]["scaleTargetRef"]["name"])
            assert "replicas" not in target["spec"], f"{name}: the HPA owns the count; an applied replicas resets it"
            assert 2 <= doc["spec"]["minReplicas"] <= doc["spec"]["maxReplicas"], name
        elif doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


@pytest.mark.parametrize("render_name", RENDERS)
def test_gateway_addresses_reach_the_right_shards(render_name: str) -> None:
    docs = RENDERS[render_name]
    (gateway,) = [(d, c, cfg) for d, c, cfg in serving_containers(docs) if isinstance(cfg, GatewayConfig)]
    config = gateway[2]

    def backend(address: str) -> Any:
        host, port = address.rsplit(":", 1)
        service = find(docs, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, address
        selector = service["spec"]["selector"].items()
        pods = [(d["spec"]["template"]["metadata"]["labels"], cfg) for d, _, cfg in serving_containers(docs)]
        hits = [cfg for labels, cfg in pods if selector <= labels.items()]
        assert len(hits) == 1, f"{address}: Service {host} selects {len(hits)} service workloads"
        assert int(port) in listen_ports(hits[0]), f"{address}: the pod binds {listen_ports(hits[0])}"
        return hits[0]

    shards = [backend(a) for a in config.retrieval_addrs]
    assert all(isinstance(s, RetrievalConfig) for s in shards)
    assert [s.shard for s in shards] == [f"{i}/{len(shards)}" for i in range(len(shards))]
    all_shards = sorted(cfg.shard for _, _, cfg in serving_containers(docs) if isinstance(cfg, RetrievalConfig))
    assert all_shards == sorted(s.shard for s in shards), "every shard Deployment is addressed by the gateway"
    assert isinstance(backend(config.ranking_addr), RankingConfig)
    if render_name == "overlay":
        assert len(shards) == 2
        redis = find(docs, "Service", "redis")
        assert config.state == f"redis://redis:{redis['spec']['ports'][0]['port']}/0"
        (container,) = pod_spec(find(docs, "StatefulSet", "redis"))["containers"]
        assert redis_is_durable(container["args"])


def redis_is_durable(command: list[str]) -> bool:
    """What gateway/store_redis.py demands of the server before it opens the store."""
    options = dict(zip(command[1::2], command[2::2], strict=False))
    durable = options.get("--appendonly") == "yes" and options.get("--appendfsync") == "always"
    return command[0] == "redis-server" and durable


# -- production mode: Secrets as files, mutual TLS, probes that speak it ------------------------------------

SECRETS_DIR = Path("/var/run/secrets/recsys")


def mounted_file(doc: dict[str, Any], container: dict[str, Any], path: Path) -> tuple[str, str, str]:
    """(kind, name, key) of the Secret or ConfigMap entry that appears at `path` inside the container.

    The path must lie under one of the container's read-only mounts, and that volume must project exactly this
    file (an item with its path), so a setting that names a file the pod does not have fails here.
    """
    spec = pod_spec(doc)
    mounts = [m for m in container.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{path}: under {len(mounts)} mounts of {doc['metadata']['name']}/{container['name']}"
    (mount,) = mounts
    assert mount.get("readOnly") is True and "subPath" not in mount, f"{path}: mount {mount['name']} must be read-only"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    relative = str(Path(path).relative_to(mount["mountPath"]))
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    hits = []
    for source in sources:
        for kind in ("secret", "configMap"):
            if kind in source:
                name = source[kind].get("secretName") or source[kind].get("name")
                hits += [(kind, name, i["key"]) for i in source[kind].get("items", []) if i["path"] == relative]
    assert len(hits) == 1, f"{path}: volume {volume['name']} provides it {len(hits)} times (list it in items)"
    return hits[0]


def file_settings(config: Any) -> dict[str, Path]:
    """The config's key and certificate files that are set (fields named *_file)."""
    names = [f.name for f in dataclasses.fields(config) if f.name.endswith("_file")]
    return {name: getattr(config, name) for name in names if getattr(config, name) is not None}


@pytest.mark.parametrize("render_name", RENDERS)
def test_file_settings_point_into_mounted_secrets(render_name: str) -> None:
    docs = RENDERS[render_name]
    for doc, c, config in serving_containers(docs):
        files = file_settings(config)
        assert files, f"{doc['metadata']['name']}: no key or certificate files"
        for name, path in files.items():
            kind, _, _ = mounted_file(doc, c, path)
            assert kind == "secret", f"{doc['metadata']['name']}: {name} must come from a Secret"
        assert all(Path(p).is_relative_to(SECRETS_DIR) for p in files.values())


@pytest.mark.parametrize("render_name", RENDERS)
def test_production_pods_have_everything_production_needs(render_name: str, tmp_path: Path) -> None:
    """Every service runs in production mode, and the code's own checks find nothing missing.

    Retrieval's and ranking's configs run recsys_common.tls.check_service_security when built (service_config
    would raise). The gateway's gateway.modes.production_problems also wants every file readable: each mounted
    file is materialized under tmp_path (mounted_file proves the pod has it) and the check runs on those paths.
    """
    docs = RENDERS[render_name]
    seen = set()
    for doc, c, config in serving_containers(docs):
        seen.add(type(config))
        assert config.mode == "production", doc["metadata"]["name"]
        assert config.tls_ca_file is not None, f"{doc['metadata']['name']}: mutual TLS needs the CA"
        local = {}
        for name, path in file_settings(config).items():
            mounted_file(doc, c, path)
            copy_at = tmp_path / doc["metadata"]["name"] / Path(path).relative_to("/")
            copy_at.parent.mkdir(parents=True, exist_ok=True)
            copy_at.write_text("placeholder\n")
            local[name] = copy_at
        if isinstance(config, GatewayConfig):
            assert config.user_key is None, "the user key comes from a file, never from the ConfigMap"
            assert production_problems(dataclasses.replace(config, **local)) == []
    assert seen == {GatewayConfig, RetrievalConfig, RankingConfig}


def test_production_checks_catch_a_missing_setting() -> None:
    """The test above can fail: drop one production setting from the rendered gateway and services."""
    for _, c, config in serving_containers(BASE):
        env = container_env(BASE, c)
        prefix = SERVICE_MODULES[module_of(c["command"])]
        del env[f"{prefix}BUNDLE_PUBLIC_KEY_FILE"]
        if isinstance(config, GatewayConfig):
            assert any("BUNDLE_PUBLIC_KEY_FILE" in p for p in production_problems(service_config(env, prefix)))
        else:
            with pytest.raises(ConfigError, match="BUNDLE_PUBLIC_KEY_FILE"):
                service_config(env, prefix)


def dialled_names(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Workload name -> the host names the gateway dials it by (its certificate must carry them as SANs)."""
    (config,) = [cfg for _, _, cfg in serving_containers(docs) if isinstance(cfg, GatewayConfig)]
    names: dict[str, set[str]] = {}
    for address in [*config.retrieval_addrs, config.ranking_addr]:
        host = address.rsplit(":", 1)[0]
        selector = find(docs, "Service", host)["spec"]["selector"].items()
        for doc, _ in workloads(docs):
            if doc["kind"] == "Deployment" and selector <= doc["spec"]["template"]["metadata"]["labels"].items():
                names.setdefault(doc["metadata"]["name"], set()).add(host)
    return names


@pytest.mark.parametrize("render_name", RENDERS)
def test_probes_speak_tls_with_the_pods_own_files(render_name: str) -> None:
    """The kubelet's grpc: probe has no TLS, so TLS ports are probed by healthcheck.py (exec) with the files the
    service itself uses: its certificate as the client certificate, the CA, and the name its clients dial."""
    docs = RENDERS[render_name]
    dialled = dialled_names(docs)
    for doc, c, config in serving_containers(docs):
        name = doc["metadata"]["name"]
        probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
        assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}, name
        for kind, probe in probes.items():
            assert "grpc" not in probe, f"{name} {kind}: the kubelet's grpc: probe cannot speak TLS"
            if "httpGet" in probe:
                assert isinstance(config, GatewayConfig) and probe["httpGet"]["port"] == config.http_port
                assert probe["httpGet"]["scheme"] == "HTTPS", f"{name} {kind}: REST is HTTPS with TLS files"
                continue
            command = probe["exec"]["command"]
            assert command[:2] == ["python", "/opt/recsys/healthcheck.py"], f"{name} {kind}"
            args = healthcheck.build_parser().parse_args(command[2:])
            assert args.kind == "grpc" and args.tls_ca == config.tls_ca_file, f"{name} {kind}"
            host, port = args.address.rsplit(":", 1)
            assert host == "127.0.0.1" and int(port) in listen_ports(config), f"{name} {kind}: {args.address}"
            assert probe["timeoutSeconds"] >= 3, f"{name} {kind}: a Python probe needs a few hundred ms to start"
            if isinstance(config, GatewayConfig):
                assert int(port) == config.grpc_port and args.server_name == name
            else:  # mutual TLS: without a client certificate the handshake fails
                assert (args.tls_cert, args.tls_key) == (config.tls_cert_file, config.tls_key_file), f"{name} {kind}"
                assert args.server_name in dialled[name], f"{name} {kind}: --server-name {args.server_name}"
    assert "/opt/recsys/healthcheck.py" in " ".join(dockerfile_lines("Dockerfile.serving"))


def test_key_material_is_created_out_of_band_and_documented() -> None:
    """No Secret in git; every Secret the pods mount has its kubectl command in deploy/README.md."""
    assert not [d for d in BASE + OVERLAY + TOOLS if d["kind"] == "Secret"], "no key material in git"
    readme = (DEPLOY / "README.md").read_text()
    secrets: dict[str, set[str]] = {}
    for _, spec in workloads(BASE + OVERLAY):
        for volume in spec.get("volumes", []):
            sources = volume["projected"]["sources"] if "projected" in volume else [volume]
            for source in (s["secret"] for s in sources if "secret" in s):
                name = source.get("secretName") or source.get("name")
                secrets.setdefault(name, set()).update(i["key"] for i in source["items"])
    assert {"recsys-user-key", "recsys-gateway-api-keys", "recsys-ca", "recsys-bundle-public-key"} <= set(secrets)
    assert {"recsys-bundle-signing-key", "recsys-gateway-tls", "recsys-retrieval-tls", "recsys-ranking-tls"} <= set(
        secrets
    )
    for name, keys in secrets.items():
        if keys == {"tls.crt", "tls.key"}:
            assert f"create secret tls {name} " in readme, f"README: how to create Secret {name}"
        else:
            for key in keys:
                assert re.search(rf"create secret generic {name} [^\n]*--from-file={re.escape(key)}=", readme), (
                    f"README: how to create Secret {name} with key {key}"
                )
    # The signing key reaches the exporter only; serving pods get the public key.
    for doc, spec in workloads(BASE + OVERLAY):
        text = yaml.safe_dump(spec)
        is_exporter = doc["kind"] == "CronJob"
        assert ("recsys-bundle-signing-key" in text) == is_exporter, doc["metadata"]["name"]


def test_retrieval_shards_do_not_drift_from_the_base() -> None:
    base = {d["kind"]: d for d in BASE if d["metadata"]["name"] == "retrieval"}
    shards = _docs(K8S / "overlays" / "example" / "retrieval-shards.yaml")
    assert len(shards) == 2 * len(base)
    for doc in shards:
        name = doc["metadata"]["name"]
        i = int(name.removeprefix("retrieval-"))
        normal = yaml.safe_dump(doc).replace(name, "retrieval")
        normal = normal.replace(f"value: {i}/2", "value: 0/1")
        expected = copy.deepcopy(base[doc["kind"]])
        if doc["kind"] == "HorizontalPodAutoscaler":
            expected["spec"] |= {k: doc["spec"][k] for k in ("minReplicas", "maxReplicas")}
        assert yaml.safe_load(normal) == expected, f"{doc['kind']}/{name} drifted from base/retrieval.yaml"


@pytest.mark.parametrize("render_name", RENDERS)
def test_exporter_job_writes_where_services_read(render_name: str) -> None:
    docs = RENDERS[render_name]
    cron = find(docs, "CronJob", "recsys-exporter")
    (c,) = pod_spec(cron)["containers"]
    args = parse_cli(c["args"])
    assert args.command == "export"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(cron)["volumes"]}
    out = mounts[str(args.out)]
    assert not out.get("readOnly") and volumes[out["name"]]["persistentVolumeClaim"]["claimName"] == "recsys-bundles"
    assert mounts[str(args.data)]["readOnly"] is True
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # Production-mode services serve only signed bundles: the exporter signs with a key from a Secret.
    assert args.signing_key is not None, "recsys export needs --signing-key"
    assert mounted_file(cron, c, args.signing_key)[:2] == ("secret", "recsys-bundle-signing-key")
    # The exporter's recall gate checks the index split the way the retrieval Deployments serve it.
    shards = {cfg.shard for _, _, cfg in serving_containers(docs) if isinstance(cfg, RetrievalConfig)}
    assert {args.index_shards} == {int(shard.split("/")[1]) for shard in shards}


def test_every_recsys_variable_is_a_config_field() -> None:
    names: dict[str, str] = {}
    for doc in BASE + OVERLAY:
        for key in doc.get("data", {}) if doc["kind"] == "ConfigMap" else []:
            names[key] = f"ConfigMap/{doc['metadata']['name']}"
        for c in (pod_spec(doc) or {}).get("containers", []):
            names |= {v["name"]: f"{doc['kind']}/{doc['metadata']['name']}" for v in c.get("env", [])}
    names |= {k: f"compose {s}" for s, spec in COMPOSE["services"].items() for k in spec.get("environment", {})}
    for dockerfile in OUR_IMAGES.values():
        names |= {k: dockerfile for k in dockerfile_env(dockerfile)}
    fields = {prefix + f.name.upper() for prefix, cls in CONFIGS.items() for f in dataclasses.fields(cls)}
    recsys = {n: where for n, where in names.items() if n.startswith("RECSYS_")}
    assert len(recsys) > 20
    unknown = {n: where for n, where in recsys.items() if n not in fields}
    assert unknown == {}, "not a field of RetrievalConfig/RankingConfig/GatewayConfig"


# -- compose ---------------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_env(service: str) -> dict[str, str]:
    spec = COMPOSE["services"][service]
    env = dockerfile_env(Path(spec["build"]["dockerfile"]).name)
    env |= {k: re.sub(r"\$\{[^}]*\}", "x" * 64, v) for k, v in spec.get("environment", {}).items()}
    return env


def test_compose_runs_the_stack_from_one_export() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"redis", "exporter", "retrieval", "ranking", "gateway"}
    assert set(COMPOSE["volumes"]) == {"bundles", "redis"}
    exporter = services["exporter"]
    args = parse_cli(exporter["command"])
    assert args.command == "export" and f"bundles:{args.out}" in exporter["volumes"]
    assert any(v.endswith(f":{args.data}:ro") for v in exporter["volumes"])
    for name in ("retrieval", "ranking", "gateway"):
        spec = services[name]
        prefix = SERVICE_MODULES[module_of(spec["command"])]
        config = service_config(compose_env(name), prefix)
        assert spec["depends_on"]["exporter"] == {"condition": "service_completed_successfully"}, name
        assert spec["volumes"] == [f"bundles:{config.bundles_dir}:ro"], name
        assert config.host == "0.0.0.0" and spec["read_only"] is True, name
        # Dev mode on a laptop: no keys, no TLS, and nothing published beyond this machine.
        assert config.mode == "dev" and not file_settings(config), name
        assert all(str(p).startswith("127.0.0.1:") for p in spec.get("ports", [])), f"{name}: {spec.get('ports')}"
        check = spec["healthcheck"]["test"]
        assert check[:3] == ["CMD", "python", "/opt/recsys/healthcheck.py"], name
        port = int(check[4].rsplit(":", 1)[1].split("/")[0])
        assert port in listen_ports(config), f"{name}: healthcheck on {port}, binds {listen_ports(config)}"
        assert (DEPLOY / spec["build"]["context"]).resolve() == ROOT, name
        assert (ROOT / spec["build"]["dockerfile"]).name == "Dockerfile.serving", name
    gateway = service_config(compose_env("gateway"), "RECSYS_GATEWAY_")
    assert gateway.state == "redis://redis:6379/0" and services["gateway"]["depends_on"]["redis"]["condition"] == (
        "service_healthy"
    )
    assert redis_is_durable(services["redis"]["command"])
    retrieval = service_config(compose_env("retrieval"), "RECSYS_RETRIEVAL_")
    ranking = service_config(compose_env("ranking"), "RECSYS_RANKING_")
    assert gateway.retrieval_addrs == [f"retrieval:{retrieval.port}"]
    assert gateway.ranking_addr == f"ranking:{ranking.port}"
    assert (ROOT / services["exporter"]["build"]["dockerfile"]).is_file()


# -- Dockerfiles -----------------------------------------------------------------------------------------


def dockerfile_lines(name: str) -> list[str]:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_env(name: str) -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form)."""
    lines = dockerfile_lines(name)
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    env = {}
    for line in lines[last:]:
        if line.startswith("ENV "):
            env |= dict(part.split("=", 1) for part in shlex.split(line[4:]))
    return env


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; a path is matched through any of its parents."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", sorted(OUR_IMAGES.values()))
def test_dockerfile_is_pinned_non_root_and_builds_from_existing_files(name: str) -> None:
    lines = dockerfile_lines(name)
    stages: set[str] = set()
    for line in (x for x in lines if x.startswith("FROM ")):
        words = line.split()
        image = words[1]
        assert image in stages or re.fullmatch(r"[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?", image), line
        if len(words) == 4 and words[2].upper() == "AS":
            stages.add(words[3])
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    users = [line.split()[1] for line in lines[last:] if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the final stage must run as non-root"
    ignore_file = DOCKER / f"{name}.dockerignore"
    patterns = [p for p in ignore_file.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for line in (x for x in lines if x.startswith("COPY ") and "--from=" not in x):
        for src in line.split()[1:-1]:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repository"
            assert not dockerignored(src, patterns), f"{name}: COPY {src} is excluded by {ignore_file.name}"
    assert dockerignored(".venv", patterns) and dockerignored("tests/test_deploy.py", patterns)


def test_serving_image_has_no_torch_and_exporter_has_the_cpu_build() -> None:
    serving = " ".join(dockerfile_lines("Dockerfile.serving"))
    exporter = " ".join(dockerfile_lines("Dockerfile.exporter"))
    installs = re.findall(r"pip install [^&]*", serving)
    assert installs and all(re.search(r"\s\.(\s|$)", i) and "[" not in i and "torch" not in i for i in installs)
    assert "COPY exporter" not in serving
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in exporter and "ARG EXTRAS=export" in exporter
    assert module_of(exec_form(serving, "CMD")) == "gateway"
    assert exec_form(exporter, "ENTRYPOINT") == ["recsys"] and parse_cli(exec_form(exporter, "CMD")).command == "export"


def exec_form(dockerfile: str, instruction: str) -> list[str]:
    """The JSON (exec) form of CMD or ENTRYPOINT; the shell form would not get SIGTERM in the service."""
    found = re.search(rf"\b{instruction} (\[.*?\])", dockerfile)
    assert found, f"no {instruction} in exec form"
    return list(yaml.safe_load(found.group(1)))


def test_constraints_satisfy_the_project_requirements() -> None:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["export"]:
        req = Requirement(spec)
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"constraints.txt does not pin {req.name}: regenerate it (deploy/README.md)"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} does not satisfy {req}"
    assert pins["torch"].startswith("2.13.0")


# -- the container healthcheck ---------------------------------------------------------------------------

_spec = importlib.util.spec_from_file_location("deploy_healthcheck", DOCKER / "healthcheck.py")
healthcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(healthcheck)


def test_healthcheck_reports_grpc_health() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("recsys.v1.Ranking", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 0
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}", "--service", "recsys.v1.Ranking"]) == 1
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}", "--service", "recsys.v1.Nope"]) == 1  # NOT_FOUND
        servicer.enter_graceful_shutdown()
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
    finally:
        server.stop(0).wait()
    assert healthcheck.main(["--timeout-s", "0.5", "grpc", f"127.0.0.1:{port}"]) == 1  # nothing listening


def test_healthcheck_reports_http_status() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/healthz"]) == 0
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/starting"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["--timeout-s", "0.5", "http", f"http://127.0.0.1:{port}/healthz"]) == 1


def test_healthcheck_speaks_mutual_tls(tmp_path: Path) -> None:
    """What the exec probes run against a server that requires client certificates, as retrieval and ranking do."""
    ca = CA(tmp_path, "deploy")
    server_leaf = ca.issue("retrieval", hosts=("retrieval", "retrieval-0"))
    client_leaf = ca.issue("retrieval-probe", hosts=("retrieval",))
    other = CA(tmp_path, "other").issue("stranger")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_leaf.key_file.read_bytes(), server_leaf.cert_file.read_bytes())],
        root_certificates=ca.cert_file.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    address = f"127.0.0.1:{port}"

    def probe(*extra: str) -> int:
        return healthcheck.main(["--timeout-s", "2", "grpc", address, "--tls-ca", str(ca.cert_file), *extra])

    client = ("--tls-cert", str(client_leaf.cert_file), "--tls-key", str(client_leaf.key_file))
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe(*client, "--server-name", "retrieval-0") == 0
        assert probe("--server-name", "retrieval-0") == 1  # no client certificate: the handshake fails
        assert probe(*client, "--server-name", "ranking") == 1  # not a name in the server's certificate
        assert probe(*client) == 1  # 127.0.0.1 is not in its SANs either
        stranger = ("--tls-cert", str(other.cert_file), "--tls-key", str(other.key_file))
        assert probe(*stranger, "--server-name", "retrieval") == 1  # a certificate from another CA
        assert healthcheck.main(["--timeout-s", "2", "grpc", address]) == 1  # plaintext
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe(*client, "--server-name", "retrieval") == 1
    finally:
        server.stop(0).wait()
    with pytest.raises(SystemExit):  # a certificate without its key is a usage error, not a silent plaintext check
        healthcheck.main(["grpc", address, "--tls-ca", str(ca.cert_file), *client[:2]])
