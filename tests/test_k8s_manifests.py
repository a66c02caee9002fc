"""The Kubernetes manifests in deploy/k8s parse and agree with each other and with Triton's endpoints."""

from __future__ import annotations

from pathlib import Path

import yaml

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
    }
    for obj in objects:
        assert obj["apiVersion"] and obj["metadata"]["name"], obj


def test_deployment_runs_triton_on_all_gpus_of_a_host():
    (deployment,) = by_kind("Deployment")
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"  # one pod per GPU host
    container = triton_container()
    assert container["command"][0] == "tritonserver"
    assert any(arg.startswith("--model-repository=") for arg in container["command"])
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert isinstance(limits["nvidia.com/gpu"], int) and limits["nvidia.com/gpu"] >= 1
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]  # extended resources cannot overcommit
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == TRITON_PORTS
    for flag, port in TRITON_PORTS.items():
        assert f"--{flag}-port={port}" in container["command"]


def test_probes_use_triton_health_endpoints():
    container = triton_container()
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready"}
    expected["livenessProbe"] = "/v2/health/live"
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load takes minutes


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
