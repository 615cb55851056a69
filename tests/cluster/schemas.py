"""Strict validation of Kubernetes objects, offline: built-in kinds with kubernetes-validate (pinned version),
Knative Services and KEDA ScaledObjects with the real CRDs' openAPIV3Schema (copied into ``specs/``).

Strict as ``kubectl apply --validate=strict``: a field the schema does not know is an error (the API server
would silently drop it, which hides typos such as ``minReplicas`` for ``minReplicaCount``). Subtrees the CRD marks
``x-kubernetes-preserve-unknown-fields`` (Knative's feature-flagged pod fields) stay open, as on the server.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"  # what the docs' kind/k3s clusters run; kubernetes-validate ships its schemas
SPECS = Path(__file__).parent / "specs"
CRD_FILES = {
    ("serving.knative.dev/v1", "Service"): "knative-serving-v1-service-crd.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-v1alpha1-scaledobject-crd.yaml",
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((SPECS / CRD_FILES[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            schema["properties"].pop("status", None)  # written by controllers, never by us
            return _strict(schema)
    raise KeyError(f"{api_version} not served by {CRD_FILES[(api_version, kind)]}")


def _check_metadata(obj: dict[str, Any]) -> None:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    # Namespaced objects' names are DNS subdomains; the kinds we render for functions need DNS labels.
    assert DNS_SUBDOMAIN.match(name), f"{obj['kind']} name {name!r} is not a DNS subdomain"
    if obj["kind"] in ("Service", "Namespace"):
        assert DNS_LABEL.match(name), f"{obj['kind']} name {name!r} is not a DNS label"
    unknown = set(meta) - {"name", "namespace", "labels", "annotations", "generateName"}
    assert not unknown, f"unexpected metadata fields {unknown}"
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            assert isinstance(value, str), f"{field} {key} must be a string, got {value!r}"
    for value in (meta.get("labels") or {}).values():
        assert len(value) <= 63, f"label value {value!r} is longer than 63"


def validate(obj: dict[str, Any]) -> None:
    """Raise (AssertionError or the validator's error) unless OBJ would be accepted strictly."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in CRD_FILES:
        jsonschema.Draft7Validator(crd_schema(*key)).validate(obj)
        _check_metadata(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
