"""The Kubernetes manifests in deploy/k8s parse and agree with each other, with `k4serve serve` and its endpoints."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from k4serve.cli import build_parser

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def load_objects() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [obj for obj in load_objects() if obj["kind"] == kind]


def triton_container() -> dict:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_every_object_is_complete():
    objects = load_objects()
    assert {obj["kind"] for obj in objects} == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for obj in objects:
        assert obj["apiVersion"] and obj["metadata"]["name"], obj


def serve_arguments():
    """The container's command as `k4serve serve` parses it."""
    command = triton_container()["command"]
    assert command[:2] == ["k4serve", "serve"]
    return build_parser().parse_args(command[1:])


def test_deployment_runs_supervised_triton_on_all_gpus_of_a_host():
    (deployment,) = by_kind("Deployment")
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"  # one pod per GPU host
    container = triton_container()
    args = serve_arguments()
    assert str(args.tritonserver) == "/opt/tritonserver/bin/tritonserver"
    assert str(args.model_repository) == "/opt/k4serve/model_repository"
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert isinstance(limits["nvidia.com/gpu"], int) and limits["nvidia.com/gpu"] >= 1
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]  # extended resources cannot overcommit
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == TRITON_PORTS
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {"K4SERVE_WEIGHTS": "/weights", "K4SERVE_PRESET": "flash-512"}


def test_image_is_past_the_2025_python_backend_security_fixes():
    # NVIDIA's August 2025 bulletin (CVE-2025-23319/23320/23334, the Python backend's shared memory): fixed from
    # 25.07 (Triton 2.59.1) on; the image tag starts with the NGC release it is built from.
    release = re.search(r":(\d\d)\.(\d\d)-", triton_container()["image"])
    assert release and (int(release.group(1)), int(release.group(2))) >= (25, 7)


def test_probes_use_the_launchers_honest_health():
    container = triton_container()
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready"}
    expected["livenessProbe"] = "/v2/health/live"
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup, readiness = container["startupProbe"], container["readinessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load takes minutes
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 5  # a dead stage leaves the Service fast


def test_termination_grace_covers_the_drain():
    (deployment,) = by_kind("Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    exit_timeout = 30  # ServerOptions.exit_timeout_s: tritonserver's own stop, after the drain
    assert grace > serve_arguments().drain_timeout + exit_timeout


def test_network_policy_opens_each_port_to_its_clients_only():
    (deployment,) = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = by_kind("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"] and spec["egress"] == []  # it connects nowhere
    opened = {port["port"]: rule["from"] for rule in spec["ingress"] for port in rule["ports"]}
    assert set(opened) == set(TRITON_PORTS)  # every port named by the container, none other
    assert opened["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert opened["grpc"] == opened["http"] and all(source for source in opened["grpc"])


def test_volumes_resolve():
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in triton_container()["volumeMounts"]:
        assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
    claims = {
        volume["persistentVolumeClaim"]["claimName"] for volume in volumes.values() if "persistentVolumeClaim" in volume
    }
    assert claims <= {claim["metadata"]["name"] for claim in by_kind("PersistentVolumeClaim")}
    shm = next(mount for mount in triton_container()["volumeMounts"] if mount["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_services_select_the_pods_and_name_their_ports():
    (deployment,) = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {port["name"] for port in triton_container()["ports"]}
    services = {service["metadata"]["name"]: service["spec"] for service in by_kind("Service")}
    for name, spec in services.items():
        assert spec["selector"].items() <= pod_labels.items(), f"Service {name} selects no Triton pod"
        for port in spec["ports"]:
            assert port["targetPort"] in container_ports and port["port"] == TRITON_PORTS[port["targetPort"]]
    assert {port["port"] for port in services["k4serve-triton"]["ports"]} == set(TRITON_PORTS.values())
    headless = services["k4serve-triton-headless"]
    assert headless["clusterIP"] == "None" and [port["port"] for port in headless["ports"]] == [8001]
    for budget in by_kind("PodDisruptionBudget"):
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
