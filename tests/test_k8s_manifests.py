"""The Kubernetes manifests: every overlay renders, validates strictly offline against a pinned Kubernetes
version, and keeps the deployment's policies (GPU, read-only data, non-root, network isolation, secrets)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
SITES = [name for name in OVERLAYS if name != "coordinator"]
# every kind the manifests may contain; a new kind (a CRD, say) must be added here on purpose
KNOWN_KINDS = {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy", "Job"}
API_PORT = 8000
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def _load_renderer():
    spec = importlib.util.spec_from_file_location("histodiff_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render.render(K8S / "overlays" / name) for name in OVERLAYS}


def _one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _env(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _workloads(objects):
    return [o for o in objects if render.pod_spec(o) is not None]


def _resource(container, section, key):
    return str(container.get("resources", {}).get(section, {}).get(key, ""))


# ---------------------------------------------------------------------------------------- layout, render


def test_example_overlays_exist():
    assert "coordinator" in OVERLAYS
    assert len(SITES) >= 4, SITES


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_its_own_namespace(rendered, overlay):
    objects = rendered[overlay]
    ns = _one(objects, "Namespace")["metadata"]["name"]
    assert ns == f"histodiff-{overlay}"
    assert _one(objects, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == ns, obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly_offline(rendered, overlay):
    import kubernetes_validate

    unknown = {o["kind"] for o in rendered[overlay]} - KNOWN_KINDS
    assert not unknown, f"kinds without an explicit decision (CRDs are not validated offline): {unknown}"
    for obj in rendered[overlay]:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:  # would mean a CRD or a removed API version
            pytest.fail(f"no Kubernetes {K8S_VERSION} schema for {obj['apiVersion']} {obj['kind']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(rendered, overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: only the project's renderer is checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        pytest.fail(out.stderr)

    def canon(objs):
        return sorted(json.dumps(o, sort_keys=True) for o in objs)

    assert canon(yaml.safe_load_all(out.stdout)) == canon(rendered[overlay])


def test_images_transformer_matches_kubectl(tmp_path):
    """An overlay that moves the images to a site's own registry (the README's way to set the registry)."""
    overlay = tmp_path / "mysite"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(K8S / 'overlays' / 'site3', overlay)}]\n"
        "images:\n"
        "  - {name: registry.example.org/histodiff/histodiff-fed-gpu, newName: reg.hospital.example/hd/gpu, newTag: 0.1.1}\n")
    objects = render.render(overlay)
    images = {c["image"] for o in objects for c in render.containers(o)}
    assert images == {"reg.hospital.example/hd/gpu:0.1.1"}
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        canon = lambda objs: sorted(json.dumps(o, sort_keys=True) for o in objs if o)  # noqa: E731
        assert canon(yaml.safe_load_all(out.stdout)) == canon(objects)


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: [{name: x}]\n")
    with pytest.raises(render.KustomizeError, match="configMapGenerator"):
        render.render(tmp_path)


def test_strategic_merge_and_json6902_semantics():
    base = {"spec": {"containers": [{"name": "a", "args": ["x"], "env": [{"name": "A", "value": "1"}]}]}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["y"], "env": [{"name": "B", "value": "2"}]}]}}
    merged = render.strategic_merge(base, patch)
    assert merged["spec"]["containers"][0]["args"] == ["y"]  # plain lists are replaced
    assert [e["name"] for e in merged["spec"]["containers"][0]["env"]] == ["B", "A"]  # keyed lists merge
    obj = {"spec": {"args": ["a"]}}
    render._json6902(obj, [{"op": "add", "path": "/spec/args/-", "value": "b"},
                           {"op": "replace", "path": "/spec/args/0", "value": "c"}])
    assert obj["spec"]["args"] == ["c", "b"]


def test_env_expansion_follows_kubernetes_rules():
    assert render.expand_env("$(A):$(B)/$$(A)", {"A": "x"}) == "x:$(B)/$(A)"


# ---------------------------------------------------------------------------------------------- policies


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_read_only_with_limits(rendered, overlay):
    for obj in _workloads(rendered[overlay]):
        spec = render.pod_spec(obj)
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0 and ctx["runAsGroup"] != 0
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():  # the volume types the `restricted` Pod Security Standard allows
            assert set(v) - {"name"} <= RESTRICTED_VOLUME_TYPES, v
        for c in render.containers(obj):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged")
            for section in ("requests", "limits"):
                assert _resource(c, section, "cpu") and _resource(c, section, "memory"), (c["name"], section)
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{c['name']}: no writable /tmp"
            env = _env(c)
            assert env.get("HOME", "").startswith("/tmp"), "HOME must be writable with a read-only root"
            assert ":latest" not in c["image"] and ":" in c["image"].rsplit("/", 1)[-1], c["image"]


@pytest.mark.parametrize("site", SITES)
def test_site_pods_request_a_gpu_and_mount_data_read_only(rendered, site):
    objects = rendered[site]
    workloads = _workloads(objects)
    assert workloads
    for obj in workloads:
        spec = render.pod_spec(obj)
        assert spec["nodeSelector"], "site pods must land on GPU nodes"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        data = volumes["site-data"]["persistentVolumeClaim"]
        assert data["readOnly"] is True
        for c in render.containers(obj):
            gpu_req, gpu_lim = _resource(c, "requests", "nvidia.com/gpu"), _resource(c, "limits", "nvidia.com/gpu")
            assert gpu_req and gpu_req == gpu_lim and int(gpu_req) >= 1, c["name"]
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["site-data"].get("readOnly") is True
            assert mounts["work"].get("readOnly") is not True, "the work volume must be writable"
            if "credentials" in mounts:
                assert mounts["credentials"]["readOnly"] is True
                assert "secret" in volumes["credentials"]
            # every path the command reads under the data mount is inside the read-only mount
            argv = render.container_argv(c)
            for flag in ("--data", "--test-data", "--test"):
                if flag in argv:
                    assert argv[argv.index(flag) + 1].startswith(mounts["site-data"]["mountPath"] + "/")
    pvc = _one(objects, "PersistentVolumeClaim", "histodiff-site-data")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("site", SITES)
def test_one_supernode_per_site_with_its_key_and_the_ca(rendered, site):
    deploy = _one(rendered[site], "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    c = next(x for x in render.containers(deploy) if x["name"] == "supernode")
    argv = render.container_argv(c)
    assert argv[:3] == ["python", "-m", "client.run"]
    assert "--insecure" not in argv
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["credentials"]
    assert argv[argv.index("--root-certificates") + 1] == f"{mount}/ca.crt"
    assert argv[argv.index("--auth-key") + 1] == f"{mount}/site.key"
    assert argv[argv.index("--site") + 1] == site, "SITE_NAME must be the overlay's (and the key's) name"
    probe = c["livenessProbe"]["exec"]["command"]
    assert f":{argv[argv.index('--port') + 1]}/health" in probe[-1], "the probe must ask this SuperNode's port"


def test_superlink_is_single_with_persistent_state_and_health_probes(rendered):
    objects = rendered["coordinator"]
    deploy = _one(objects, "Deployment", "histodiff-superlink")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    spec = render.pod_spec(deploy)
    c = spec["containers"][0]
    argv = render.container_argv(c)
    assert argv[:3] == ["python", "-m", "server.superlink"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = int(argv[argv.index("--port") + 1])
    assert port == API_PORT
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    db = argv[argv.index("--database") + 1]
    state_mount = next(p for p in mounts if db.startswith(p + "/"))
    claim = volumes[mounts[state_mount]]["persistentVolumeClaim"]["claimName"]
    _one(objects, "PersistentVolumeClaim", claim)
    container_port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["scheme"] == "HTTPS"  # Flower 1.42: GET /health on the API port
        assert container_port[get["port"]] == port
    service = _one(objects, "Service", "histodiff-superlink")
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    # the coordinator Job shares the run directory: its --resume-or-start path lies on the same claim
    job = _one(objects, "Job", "histodiff-coordinator")
    job_spec = render.pod_spec(job)
    run = render.container_argv(job_spec["containers"][0])
    run_dir = run[run.index("--resume-or-start") + 1]
    job_mounts = {m["mountPath"]: m["name"] for m in job_spec["containers"][0]["volumeMounts"]}
    job_mount = next(p for p in job_mounts if run_dir.startswith(p + "/"))
    job_volumes = {v["name"]: v for v in job_spec["volumes"]}
    assert job_volumes[job_mounts[job_mount]]["persistentVolumeClaim"]["claimName"] == claim
    assert job_mount == state_mount, "the ServerApp (in the SuperLink pod) and the Job must see the same run dir"
    assert job["spec"]["suspend"] is True


def test_sites_dial_the_superlink_service_and_coordinator_registers_every_site(rendered):
    coord = rendered["coordinator"]
    service = _one(coord, "Service", "histodiff-superlink")
    address = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{API_PORT}"
    job_spec = render.pod_spec(_one(coord, "Job", "histodiff-coordinator"))
    sources = next(v for v in job_spec["volumes"] if v["name"] == "credentials")["projected"]["sources"]
    registered = {i["path"] for s in sources for i in s["secret"].get("items", [])}
    assert "ca.crt" in registered
    for site in SITES:
        c = render.pod_spec(_one(rendered[site], "Deployment"))["containers"][0]
        argv = render.container_argv(c)
        assert argv[argv.index("--superlink") + 1] == address, site
        assert f"sites/{site}.pub" in registered, f"{site} is not registered by the coordinator overlay"
    for c in render.containers(_one(coord, "Job", "histodiff-coordinator")):
        argv = render.container_argv(c)
        assert argv[argv.index("--superlink") + 1].split(":")[-1] == str(API_PORT)


def test_exactly_the_labeled_sites_run_augmentation(rendered):
    coord_job = render.pod_spec(_one(rendered["coordinator"], "Job", "histodiff-coordinator"))
    run_dir = render.container_argv(coord_job["containers"][0])
    run_name = Path(run_dir[run_dir.index("--resume-or-start") + 1]).name
    labeled = []
    for site in SITES:
        objects = rendered[site]
        c = render.pod_spec(_one(objects, "Deployment"))["containers"][0]
        argv = render.container_argv(c)
        role = argv[argv.index("--role") + 1]
        jobs = [o for o in objects if o["kind"] == "Job"]
        if role == "labeled":
            labeled.append(site)
            assert "--test-data" in argv
            job = _one(objects, "Job", "histodiff-augment")
            assert job["spec"]["suspend"] is True
            aug = render.container_argv(render.pod_spec(job)["containers"][0])
            assert aug[:3] == ["python", "-m", "client.augment"]
            work = argv[argv.index("--work") + 1]
            assert aug[aug.index("--model") + 1] == f"{work}/{run_name}/global_model"
        else:
            assert role == "unlabeled" and not jobs and "--test-data" not in argv
    assert len(labeled) == 1, labeled


def test_network_policies_isolate_sites_and_open_only_the_api_port(rendered):
    coord = [o for o in rendered["coordinator"] if o["kind"] == "NetworkPolicy"]
    deny = [p for p in coord if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and "Ingress" in deny[0]["spec"]["policyTypes"]
    opened = [(p, rule) for p in coord for rule in p["spec"].get("ingress", [])]
    assert len(opened) == 1
    policy, rule = opened[0]
    assert rule["ports"] == [{"protocol": "TCP", "port": API_PORT}]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "superlink"
    for site in SITES:
        policies = [o for o in rendered[site] if o["kind"] == "NetworkPolicy"]
        assert any(p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"] for p in policies)
        assert not any(p["spec"].get("ingress") for p in policies), f"{site}: something may connect in"
        egress_ports = {(port["protocol"], port["port"]) for p in policies for rule in p["spec"].get("egress", [])
                        for port in rule.get("ports", [])}
        assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", API_PORT)}


def test_no_secret_material_in_manifests_or_config_maps(rendered):
    markers = ("PRIVATE KEY", "BEGIN CERTIFICATE", "ecdsa-sha2-nistp384")
    for overlay, objects in rendered.items():
        assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created out of band (README)"
        text = render.dump(objects)
        for marker in markers:
            assert marker not in text, f"{overlay}: {marker} in a manifest"
        for obj in _workloads(objects):
            for c in render.containers(obj):
                for var in c.get("env", []):
                    assert "secretKeyRef" not in var.get("valueFrom", {}), "keys are mounted as files, not env"


def test_renderer_cli_prints_a_yaml_stream():
    out = subprocess.run([sys.executable, str(K8S / "render.py"), str(K8S / "overlays" / "site0")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert any(d["kind"] == "Deployment" for d in yaml.safe_load_all(out.stdout) if d)
