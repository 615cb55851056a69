"""Deploy through the real API: what is refused at upload (400/409/413), what fails later with a reason, and what
a successful deploy leaves behind."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import deploy, example, make_tenant, oip_body, outputs_of, wait_status


@pytest.fixture
def acme(platform):
    return make_tenant(platform, "acme")


def upload(tenant, name: str, archive: bytes, config: dict | None = None, filename: str = "model.tar.gz"):
    return tenant.http.post(
        f"/v1/tenants/{tenant.name}/functions",
        data={"name": name, "config": json.dumps(config or {})},
        files={"model": (filename, archive, "application/octet-stream")},
    )


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def model_tar(model: Path, wrap: str = "") -> bytes:
    return tar_of([file_entry(f"{wrap}{p.name}", p.read_bytes()) for p in sorted(model.iterdir())])


def test_traversal_and_links_are_refused_at_upload_and_leave_nothing_behind(platform, acme, models):
    evil = tar_of([file_entry("../../escape.txt", b"x")])
    r = upload(acme, "evil", evil)
    assert r.status_code == 400 and "outside the archive" in r.json()["error"]

    link = tarfile.TarInfo("model.pdmodel")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    r = upload(acme, "linked", tar_of([(link, None)]))
    assert r.status_code == 400 and "links are not allowed" in r.json()["error"]

    assert not (platform.data_dir.parent / "escape.txt").exists()
    assert not list((platform.data_dir / "tenants").glob("acme/functions/*/*"))
    assert acme.http.get("/v1/tenants/acme/functions").json()["functions"] == []


def test_an_archive_without_a_model_says_which_files_to_upload(acme):
    r = upload(acme, "empty", tar_of([file_entry("README.txt", b"hello")]))
    assert r.status_code == 400
    assert "model.pdmodel + model.pdiparams" in r.json()["error"]

    r = upload(acme, "junk", b"this is not an archive")
    assert r.status_code == 400 and ".tar.gz" in r.json()["error"]


def test_bad_names_and_configs_are_400s_that_say_what_to_change(acme, models):
    archive = model_tar(models["mlp"])
    r = upload(acme, "Not_A_DNS_Label", archive)
    assert r.status_code == 400 and "not valid" in r.json()["error"]

    r = upload(acme, "fine", archive, {"max_scale": 0})
    assert r.status_code == 400 and "max_scale" in r.json()["error"]

    r = upload(acme, "fine", archive, {"no_such_option": 1})
    assert r.status_code == 400 and "no_such_option" in r.json()["error"]

    r = upload(acme, "fine", archive, {"device": "tpu"})
    assert r.status_code == 400 and "device" in r.json()["error"]


def test_a_model_wrapped_in_one_folder_deploys_and_a_second_deploy_of_the_name_is_a_409(acme, models):
    r = upload(acme, "wrapped", model_tar(models["mlp"], wrap="mlp/"))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "deploying"
    assert r.json()["url"].endswith("/t/acme/v2/models/wrapped")
    assert wait_status(acme, "wrapped")["status"] == "ready"

    again = upload(acme, "wrapped", model_tar(models["mlp"]))
    assert again.status_code == 409 and "already exists" in again.json()["error"]


def test_a_model_whose_outputs_do_not_match_its_examples_fails_with_a_reason(acme, models, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(models["mlp"], tampered)
    _, outputs = example(models["mlp"])
    np.savez(tampered / "example_outputs.npz", **{k: v + 0.5 for k, v in outputs.items()})

    fn = deploy(acme, "tampered", tampered)
    assert fn["status"] == "failed"
    assert "softmax_0.tmp_0" in fn["error"] and "differ" in fn["error"]
    r = acme.http.post("/t/acme/v2/models/tampered/infer", json=oip_body(example(models["mlp"])[0]))
    assert r.status_code in (404, 409) and "failed" in r.json()["error"]


def test_patch_changes_config_and_delete_removes_the_function_and_its_artifacts(platform, acme, models):
    deploy(acme, "classify", models["mlp"])
    r = acme.http.patch("/v1/tenants/acme/functions/classify", json={"idle_timeout_s": 120, "max_scale": 3})
    assert r.status_code == 200, r.text
    assert r.json()["config"]["idle_timeout_s"] == 120 and r.json()["config"]["max_scale"] == 3
    r = acme.http.patch("/v1/tenants/acme/functions/classify", json={"min_scale": 5, "max_scale": 2})
    assert r.status_code == 400 and "min_scale" in r.json()["error"]

    inputs, expected = example(models["mlp"])
    r = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert r.status_code == 200
    np.testing.assert_allclose(
        outputs_of(r.json())["softmax_0.tmp_0"], expected["softmax_0.tmp_0"], rtol=1e-5
    )

    assert acme.http.delete("/v1/tenants/acme/functions/classify").status_code == 204
    assert acme.http.get("/v1/tenants/acme/functions/classify").status_code == 404
    assert acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs)).status_code == 404
    assert not list((platform.data_dir / "tenants" / "acme" / "functions").glob("classify/*"))


def test_prepare_reports_its_stages_before_the_manifest(models, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "runtime.prepare", str(models["mlp"]), str(tmp_path / "out"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    stages = [line["stage"] for line in lines[:-1]]
    assert stages[:3] == ["loading", "optimising", "golden check"]
    assert stages[-1] == "converting for Paddle Lite"
    assert "spec" in lines[-1] and "stage" not in lines[-1]  # the manifest comes last


def test_a_deploy_in_progress_shows_its_stage(acme, models):
    r = upload(acme, "staged", model_tar(models["mlp"]))
    assert r.status_code == 202
    seen = []
    while (fn := acme.http.get("/v1/tenants/acme/functions/staged").json())["status"] == "deploying":
        if fn["stage"] and (not seen or seen[-1] != fn["stage"]):
            seen.append(fn["stage"])
    assert fn["status"] == "ready" and fn["stage"] is None
    known = ["queued", "loading", "optimising", "golden check", "converting for Paddle Lite"]
    assert seen and all(s in known for s in seen)
    assert [known.index(s) for s in seen] == sorted(known.index(s) for s in seen)  # in order
