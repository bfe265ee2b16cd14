"""A small kustomize renderer for the subset of kustomization.yaml these manifests use (no kubectl needed).

``python deploy/k8s/render.py deploy/k8s/overlays/site0`` prints the rendered objects as a YAML stream, like
``kubectl kustomize``. Supported: ``resources`` (files and directories), ``patches`` (strategic merge, or
JSON 6902 with a ``target``), ``namespace``, ``labels`` (``pairs``, ``includeTemplates``), ``images``. Anything else
in a kustomization is an error, so the renderer never silently renders something different from kustomize.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "RuntimeClass"}
# strategic-merge keys of the list fields these manifests patch (k8s.io/api patchMergeKey tags)
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name", "sources": None,
              "tolerations": None, "args": None, "command": None}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(ValueError):
    pass


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"no kustomization.yaml in {directory}")


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _id(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata", {})
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def render(directory: str | Path) -> list[dict]:
    """Render one kustomization directory into a list of objects (resource order kept)."""
    directory = Path(directory).resolve()
    kfile = _kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported kustomization keys {sorted(unknown)}")
    objects: list[dict] = []
    for res in k.get("resources", []):
        if Path(res).is_absolute():
            raise KustomizeError(f"{kfile}: resource paths must be relative ({res})")
        path = (directory / res).resolve()
        objects += render(path) if path.is_dir() else _load_docs(path)
    seen: set = set()
    for obj in objects:
        if _id(obj) in seen:
            raise KustomizeError(f"{kfile}: duplicate resource {_id(obj)}")
        seen.add(_id(obj))
    for patch in k.get("patches", []):
        _apply_patch(objects, patch, directory)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        extra = set(entry) - {"pairs", "includeTemplates", "includeSelectors"}
        if extra or entry.get("includeSelectors"):
            raise KustomizeError(f"{kfile}: unsupported labels options {sorted(extra) or ['includeSelectors']}")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and obj["kind"] in POD_TEMPLATE_KINDS:
                template = obj["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(entry["pairs"])
    for entry in k.get("images", []):
        _set_image(objects, entry)
    return objects


def _split_image(image: str) -> tuple[str, str]:
    """(name, suffix) where suffix is ':tag', '@digest', ':tag@digest' or ''."""
    at = image.find("@")
    base, digest = (image[:at], image[at:]) if at >= 0 else (image, "")
    colon = base.rfind(":")
    if colon > base.rfind("/"):
        return base[:colon], base[colon:] + digest
    return base, digest


def _set_image(objects: list[dict], entry: dict) -> None:
    if set(entry) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"unsupported images options {sorted(set(entry) - {'name', 'newName', 'newTag', 'digest'})}")
    for obj in objects:
        for c in containers(obj):
            name, suffix = _split_image(c["image"])
            if name != entry["name"]:
                continue
            if "digest" in entry:
                suffix = "@" + entry["digest"]
            elif "newTag" in entry:
                suffix = ":" + str(entry["newTag"])
            c["image"] = entry.get("newName", name) + suffix


# ------------------------------------------------------------------------------------------------ patches


def _apply_patch(objects: list[dict], patch: dict, directory: Path) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"unsupported patch options {sorted(set(patch) - {'path', 'patch', 'target'})}")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    target = patch.get("target")
    if isinstance(body, list):
        if not target:
            raise KustomizeError("a JSON 6902 patch needs a target")
        matched = [o for o in objects if _matches(o, target)]
        for obj in matched:
            _json6902(obj, body)
    else:
        target = target or {"kind": body["kind"], "name": body["metadata"]["name"]}
        matched = [o for o in objects if _matches(o, target)]
        for obj in matched:
            merged = strategic_merge(obj, body)
            obj.clear()
            obj.update(merged)
    if not matched:
        raise KustomizeError(f"patch {patch.get('path', '<inline>')} matches no resource ({target})")


def _matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unknown:
        raise KustomizeError(f"unsupported patch target fields {sorted(unknown)}")
    group, _, version = obj["apiVersion"].rpartition("/")
    meta = obj.get("metadata", {})
    checks = {"kind": obj["kind"], "name": meta.get("name"), "namespace": meta.get("namespace"),
              "group": group, "version": version}
    return all(checks[key] == value for key, value in target.items())


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge for maps and for the keyed lists in MERGE_KEYS; other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise KustomizeError("$patch directives are not supported")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        if field not in MERGE_KEYS:
            raise KustomizeError(f"strategic merge of list field {field!r} is not supported by this renderer")
        key = MERGE_KEYS[field]
        if key is None:
            return copy.deepcopy(patch)
        # kustomize (kyaml) order: the patch's items first (merged into their base item), then the rest of base
        patched = {item.get(key) for item in patch}
        out = []
        for item in patch:
            old = next((b for b in base if b.get(key) == item.get(key)), None)
            out.append(copy.deepcopy(item) if old is None else strategic_merge(old, item, field))
        return out + [copy.deepcopy(b) for b in base if b.get(key) not in patched]
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind not in {"add", "replace", "remove", "test"}:
            raise KustomizeError(f"unsupported JSON 6902 op {kind!r}")
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            elif node[index] != op["value"]:
                raise KustomizeError(f"JSON 6902 test failed at {op['path']}")
        else:
            if kind in ("replace", "remove", "test") and last not in node:
                raise KustomizeError(f"JSON 6902 {kind}: {op['path']} does not exist")
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            elif node[last] != op["value"]:
                raise KustomizeError(f"JSON 6902 test failed at {op['path']}")


# ------------------------------------------------------------------------------------- reading rendered pods


def pod_spec(obj: dict) -> dict | None:
    """The pod spec of a workload object (Deployment, StatefulSet, Job, ...), or None."""
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in POD_TEMPLATE_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers(obj: dict) -> list[dict]:
    """The init containers and containers of a workload object."""
    spec = pod_spec(obj) or {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def expand_env(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: $$ escapes, unknown variables stay as written."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            end = text.index(")", i)
            name = text[i + 2:end]
            out.append(env.get(name, text[i:end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def container_argv(container: dict, env_override: dict[str, str] | None = None) -> list[str]:
    """command + args as the kubelet runs them (literal env values expanded, in definition order)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand_env(str(var["value"]), env)
    env.update(env_override or {})
    return [expand_env(str(a), env) for a in container.get("command", []) + container.get("args", [])]


def dump(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python deploy/k8s/render.py DIR")
    sys.stdout.write(dump(render(sys.argv[1])))
