"""Imports and exports attacked as a hostile project admin over HTTPS (issue 11, findings 2, 3 and image names).

A remote tenant never names a path on the daemon's host: it uploads what it imports, or names a file the
administrator put in the project's import directory, and it downloads what it exports. Every attack asserts the
refusal, that the answer tells nothing about the host (no content, no size, no existence), and that nothing was
written on the host. The positive tests upload real images (the tiny image's own kernel, initrd and disk), boot
one, and stream an export back to the client and import it again."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import unique

SECRET = "TOPSECRET-do-not-leak-4242"
IMPORT_DIR = Path(tempfile.mkdtemp(prefix="corral-import-dir-"))
OUTSIDE = Path(tempfile.mkdtemp(prefix="corral-outside-"))  # host files a tenant must never reach
MAX_UPLOAD = 256 << 20


@pytest.fixture(scope="module")
def daemon_config() -> dict[str, object]:
    return {"import_dir": str(IMPORT_DIR), "max_upload_size": MAX_UPLOAD}


@pytest.fixture(scope="module")
def host_files() -> dict[str, Path]:
    """A root-only secret, an import directory with a good file, links and a FIFO, and pb's own files."""
    secret = OUTSIDE / "secret.img"
    secret.write_bytes(SECRET.encode().ljust(1 << 20, b"\0"))  # would pass as a raw disk if it were read
    secret.chmod(0o600)
    for project in ("pa", "pb"):
        (IMPORT_DIR / project).mkdir(exist_ok=True)
    good = IMPORT_DIR / "pa" / "good.img"
    good.write_bytes(b"corral-import-dir".ljust(2 << 20, b"\1"))
    (IMPORT_DIR / "pa" / "shadow-link").symlink_to("/etc/shadow")
    (IMPORT_DIR / "pa" / "secret-link").symlink_to(secret)
    (IMPORT_DIR / "pa" / "dir-link").symlink_to(IMPORT_DIR / "pb")
    os.mkfifo(IMPORT_DIR / "pa" / "fifo")
    (IMPORT_DIR / "pb" / "theirs.img").write_bytes(b"pb-data".ljust(1 << 20, b"\2"))
    return {"secret": secret, "good": good}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _host_state(tenants) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    home = tenants.daemon.home
    return {part: _files(home / part) for part in ("images", "uploads", "exports", "pools")}


def _images(tenants, who: str) -> set[str]:  # type: ignore[no-untyped-def]
    with tenants.https(who) as client:
        return {(i["name"], i["id"]) for i in client.get("/images").json()}


def _upload(tenants, who: str, data: bytes | Path) -> str:  # type: ignore[no-untyped-def]
    body = data.read_bytes() if isinstance(data, Path) else data
    with tenants.https(who) as client:
        answer = client.post("/uploads", content=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def _assert_reveals_nothing(answer: httpx.Response, *paths: str) -> None:
    """A refusal: a problem body with a hint, no secret, no host path the caller did not write itself, no size."""
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.text
    body = answer.json()
    assert body.get("hint"), body
    text = answer.text
    assert SECRET not in text and "root:" not in text
    assert str(OUTSIDE) not in text or any(str(OUTSIDE) in p for p in paths)
    for word in ("/var/lib/corral", "uploads/", str(IMPORT_DIR), "bytes of raw data", "does not exist"):
        assert word not in text, (word, text)


def _new_vm(tenants, who: str, prefix: str) -> str:  # type: ignore[no-untyped-def]
    """A stopped VM of ``who``'s project (an export needs no boot)."""
    name = unique(prefix)
    with tenants.https(who) as client:
        answer = client.post("/vms", json={"spec": {"name": name, "image": "tiny"}})
    assert answer.status_code == 202, answer.text
    assert tenants.wait(who, answer.json()["job"]["id"])["state"] == "succeeded"
    return name


def _raw_post(tenants, declared: int, body: bytes, answer: bool = True) -> bytes:  # type: ignore[no-untyped-def]
    """POST /uploads as pa-admin on a bare TLS socket: declare ``declared`` bytes, send ``body``, then read the
    first bytes of the answer (or, without ``answer``, hang up: an upload that ends early)."""
    context = ssl.create_default_context(cadata=tenants.daemon.certificate)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", tenants.daemon.port)) as raw, context.wrap_socket(raw) as tls:
        head = (f"POST /uploads HTTP/1.1\r\nHost: corral\r\nAuthorization: Bearer {tenants.tokens['pa-admin']}\r\n"
                f"Content-Length: {declared}\r\nContent-Type: application/octet-stream\r\n\r\n")  # fmt: skip
        tls.settimeout(10)
        try:
            tls.sendall(head.encode() + body)
            if not answer:
                time.sleep(0.5)
                return b""
            return tls.recv(64)
        except OSError:
            return b""


def _qcow2(path: Path, *options: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "64M"], check=True)
    return path


# -- remote callers name no host path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("file", "/etc/shadow"),
        ("file", "ROOT_ONLY"),  # a root-only file of the host, by its absolute path
        ("file", "/proc/self/environ"),
        ("file", "/nonexistent/disk.img"),
        ("file", "/var/lib/corral/../../../etc/passwd"),
        ("kernel", "/etc/shadow"),
        ("initrd", "/proc/self/environ"),
    ],
)
def test_image_import_of_a_host_path_is_refused_alike_for_any_path(tenants, host_files, field, value) -> None:  # type: ignore[no-untyped-def]
    value = str(host_files["secret"]) if value == "ROOT_ONLY" else value
    before, images = _host_state(tenants), _images(tenants, "pa-admin")
    body: dict[str, object] = {"name": unique("steal")}
    if field == "file":
        body["file"] = value
    else:
        body["upload"] = _upload(tenants, "pa-admin", b"\0" * (1 << 20))
    if field == "initrd":
        body.update(kernel_upload=_upload(tenants, "pa-admin", b"k" * 4096), initrd=value)
    elif field == "kernel":
        body[field] = value
    with tenants.https("pa-admin") as client:
        answer = client.post("/images/import", json=body)
    assert answer.status_code == 403, answer.text
    assert "local admin" in answer.json()["detail"]
    _assert_reveals_nothing(answer, value)
    # The same words whether the path exists or not: no oracle.
    assert answer.json()["detail"].replace(field if field != "file" else "image file", "X") in {
        "a X cannot be read from a path on the server: that is for the local admin",
    }
    assert _images(tenants, "pa-admin") == images
    after = _host_state(tenants)
    assert after["images"] == before["images"] and after["pools"] == before["pools"]
    with tenants.https("pa-admin") as client:  # the uploads this refusal left unused
        for key in ("upload", "kernel_upload"):
            if key in body:
                assert client.delete(f"/uploads/{body[key]}").status_code == 204


def test_vm_import_of_another_projects_export_by_path_is_refused(tenants, host_files) -> None:  # type: ignore[no-untyped-def]
    """pb's export lies on the host (the local admin wrote it there); pa names its path."""
    name = unique("pbvm")
    tenants.daemon.cli("--project", "pb", "vm", "create", name, "--image", "tiny")
    archive = OUTSIDE / f"{name}.tar"
    tenants.daemon.cli("--project", "pb", "vm", "export", name, str(archive))
    assert archive.is_file()
    before = _host_state(tenants)
    with tenants.https("pa-admin") as client:
        vms = client.get("/vms").json()
        answer = client.post("/vms/import", json={"file": str(archive), "name": "stolen"})
        assert answer.status_code == 403, answer.text
        _assert_reveals_nothing(answer, str(archive))
        traversal = client.post("/vms/import", json={"file": f"../pb/{archive.name}"})
        assert traversal.status_code == 403, traversal.text
        dots = client.post("/vms/import", json={"file": ".."})
        assert dots.status_code == 422, dots.text
        assert client.get("/vms").json() == vms
    assert _host_state(tenants) == before


@pytest.mark.parametrize("target", ["/etc/cron.d/corral-x", "/root/corral-x.tar", "/tmp/corral-x.tar", "relative.tar"])
def test_export_to_a_host_path_is_refused(tenants, target) -> None:  # type: ignore[no-untyped-def]
    name = _new_vm(tenants, "pa-admin", "exp")
    before = _host_state(tenants)
    with tenants.https("pa-admin") as client:
        answer = client.post(f"/vms/{name}/export", json={"file": target})
    assert answer.status_code == 403, answer.text
    _assert_reveals_nothing(answer, target)
    assert not Path(target).exists() and not Path(target).with_name(f".{Path(target).name}.partial").exists()
    assert _host_state(tenants) == before


def test_a_long_or_bad_export_name_is_a_422_never_a_500(tenants) -> None:  # type: ignore[no-untyped-def]
    name = _new_vm(tenants, "pa-admin", "long")
    with tenants.https("pa-admin") as client:
        long_vm = client.post(f"/vms/{'v' * 300}/export", json={})
        assert long_vm.status_code in (404, 422), long_vm.text
        long_file = client.post(f"/vms/{name}/export", json={"file": "/tmp/" + "x" * 300 + ".tar"})
        assert long_file.status_code == 403, long_file.text  # a remote caller: refused before any look
        huge = client.post(f"/vms/{name}/export", json={"file": "/" + "x" * 5000})
        assert huge.status_code == 422, huge.text
        for bad in ("ghost", "0" * 31, "../" + "0" * 32):
            assert client.get(f"/exports/{bad}").status_code == 404
    # The local admin may pick a path, and a name over 255 bytes is still one line, a 422's exit code, no traceback.
    local = tenants.daemon.cli("--project", "pa", "vm", "export", name, "/tmp/" + "y" * 300 + ".tar", check=False)
    assert local.returncode == 2, local.stderr
    assert "too long" in local.stderr and "Traceback" not in local.stderr


def test_uploads_need_a_token_a_role_and_fit_the_limit(tenants) -> None:  # type: ignore[no-untyped-def]
    uploads = tenants.daemon.home / "uploads"
    before = _files(uploads)
    with tenants.https(None) as anonymous:
        assert anonymous.post("/uploads", content=b"x" * 4096).status_code == 401
    with tenants.https("pa-viewer") as viewer:
        assert viewer.post("/uploads", content=b"x" * 4096).status_code == 403
    # Declared larger than max_upload_size: refused before a byte of the body is read.
    assert _raw_post(tenants, MAX_UPLOAD + 1, b"").startswith(b"HTTP/1.1 413")
    with tenants.https("pa-admin") as client:
        assert client.delete("/uploads/" + "0" * 32).status_code == 404
    assert _files(uploads) == before


def test_an_upload_that_ends_early_leaves_nothing(tenants) -> None:  # type: ignore[no-untyped-def]
    uploads = tenants.daemon.home / "uploads" / "pa"
    before = _files(uploads)
    _raw_post(tenants, 8 << 20, b"z" * (1 << 20), answer=False)
    deadline = time.monotonic() + 20
    while _files(uploads) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _files(uploads) == before


# -- formats: only raw and qcow2, never probed, nothing that points at another file ------------------------------


def _import_fails(tenants, data: bytes | Path, words: str, disk_format: str | None = None) -> None:  # type: ignore[no-untyped-def]
    before, images = _host_state(tenants), _images(tenants, "pa-admin")
    upload = _upload(tenants, "pa-admin", data)
    body = {"name": unique("bad"), "upload": upload, **({"format": disk_format} if disk_format else {})}
    with tenants.https("pa-admin") as client:
        answer = client.post("/images/import", json=body)
    assert answer.status_code == 202, answer.text
    job = tenants.wait("pa-admin", answer.json()["job"]["id"])
    assert job["state"] == "failed", job
    assert words in job["error"], job["error"]
    assert SECRET not in str(job) and "root:" not in str(job) and "/var/lib/corral" not in str(job)
    assert _images(tenants, "pa-admin") == images
    after = _host_state(tenants)
    assert after["images"] == before["images"]
    assert after["uploads"] == before["uploads"]  # the upload was consumed, and nothing else left


def test_a_qcow2_with_a_backing_file_is_refused(tenants, host_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for target in ("/etc/shadow", str(host_files["secret"])):
        disk = _qcow2(tmp_path / unique("back"), "-b", target, "-F", "raw", "-u")
        _import_fails(tenants, disk, "it has a backing file")


def test_a_qcow2_with_an_external_data_file_is_refused(tenants, host_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data.raw"
    disk = _qcow2(tmp_path / "df.qcow2", "-o", f"data_file={data}")
    data.write_bytes(SECRET.encode())  # what the image would read, were its data file followed
    _import_fails(tenants, disk, "external data file")
    raw = _qcow2(tmp_path / "dfr.qcow2", "-o", f"data_file={tmp_path / 'data2.raw'},data_file_raw=on")
    _import_fails(tenants, raw, "external data file")


def test_a_qcow2_named_as_raw_and_other_formats_are_refused(tenants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _import_fails(tenants, _qcow2(tmp_path / "q.qcow2"), "given as raw", disk_format="raw")
    _import_fails(tenants, b"\0" * (2 << 20), "is not a qcow2 image", disk_format="qcow2")
    _import_fails(tenants, b"QFI\xfb" + b"\0" * 60 + b"junk" * 1000, "corrupt qcow2")
    with tenants.https("pa-admin") as client:
        answer = client.post("/images/import", json={"name": "v", "upload": "0" * 32, "format": "vmdk"})
    assert answer.status_code == 422, answer.text


def test_a_vmdk_descriptor_is_only_bytes(tenants) -> None:  # type: ignore[no-untyped-def]
    """A guest wrote `RW 2 FLAT "/etc/shadow" 0` to its serial log; uploaded, it is a (too small) raw file, and
    padded to a disk's size it imports as a raw disk holding the descriptor's text, not /etc/shadow."""
    descriptor = (b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                  b'RW 2 FLAT "/etc/shadow" 0\n')  # fmt: skip
    _import_fails(tenants, descriptor, "is not a disk image")
    name = unique("vmdk")
    with tenants.https("pa-admin") as client:
        upload = _upload(tenants, "pa-admin", descriptor.ljust(1 << 20, b"\0"))
        answer = client.post("/images/import", json={"name": name, "upload": upload})
        job = tenants.wait("pa-admin", answer.json()["job"]["id"])
        assert job["state"] == "succeeded", job
        image = client.get(f"/images/{name}").json()
    assert image["virtual_size"] == 1 << 20
    disk = tenants.daemon.home / "images" / image["id"] / "disk.qcow2"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600
    copy = OUTSIDE / f"{name}.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(copy)], check=True)
    content = copy.read_bytes()
    copy.unlink()
    assert content.startswith(descriptor) and b"root:" not in content


# -- the import directory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file,status,words",
    [
        ("shadow-link", 422, "is a link"),
        ("secret-link", 422, "is a link"),
        ("fifo", 422, "not a regular file"),
        ("missing.img", 404, "no file"),
        ("..", 422, "invalid"),
        (".", 422, "invalid"),
        ("dir-link/theirs.img", 403, "local admin"),
        ("../pb/theirs.img", 403, "local admin"),
    ],
)
def test_import_dir_names_links_and_traversal_are_refused(tenants, host_files, file, status, words) -> None:  # type: ignore[no-untyped-def]
    before, images = _host_state(tenants), _images(tenants, "pa-admin")
    with tenants.https("pa-admin") as client:
        answer = client.post("/images/import", json={"name": unique("dir"), "file": file})
        vm_answer = client.post("/vms/import", json={"file": file})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]
    assert vm_answer.status_code == status, vm_answer.text
    _assert_reveals_nothing(answer)
    assert _images(tenants, "pa-admin") == images and _host_state(tenants) == before


def test_import_dir_file_is_imported_through_its_descriptor(tenants, host_files) -> None:  # type: ignore[no-untyped-def]
    name = unique("fromdir")
    with tenants.https("pa-admin") as client:
        answer = client.post("/images/import", json={"name": name, "file": "good.img", "format": "raw"})
        assert answer.status_code == 202, answer.text
        job = tenants.wait("pa-admin", answer.json()["job"]["id"])
        assert job["state"] == "succeeded", job
        image = client.get(f"/images/{name}").json()
    assert image["virtual_size"] == 2 << 20 and image["source"] == "import-dir:good.img"
    assert host_files["good"].is_file()  # the administrator's file stays; only uploads are consumed
    with tenants.https("pb-admin") as client:  # pb's directory is its own: pa's file is not there
        answer = client.post("/images/import", json={"name": unique("x"), "file": "good.img"})
        assert answer.status_code == 404, answer.text


# -- what a tenant can do: upload, import, boot, export to the client, import back -------------------------------


def _tiny_files(tenants) -> tuple[dict, Path]:  # type: ignore[no-untyped-def]
    with tenants.daemon.client() as corral:
        tiny = corral.request("GET", "/images/tiny")
    return tiny, tenants.daemon.home / "images" / tiny["id"]


def test_cli_uploads_a_kernel_image_with_progress_boots_it_and_exports_to_the_client(tenants, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tiny, directory = _tiny_files(tenants)
    name = unique("mine")
    made = tenants.cli_as("pa-admin", "image", "import", name, str(directory / "rootfs.qcow2"),
                          "--kernel", str(directory / "vmlinuz"), "--initrd", str(directory / "initrd.img"),
                          "--cmdline", tiny["cmdline"])  # fmt: skip
    assert made.returncode == 0, made.stderr
    for part in ("rootfs.qcow2", "vmlinuz", "initrd.img"):
        assert f"uploading {part}: 100%" in made.stderr, made.stderr
    assert _files(tenants.daemon.home / "uploads" / "pa") == set()  # consumed by the import
    with tenants.https("pa-admin") as client:
        image = client.get(f"/images/{name}").json()
    assert image["kind"] == "kernel" and image["source"].startswith("upload:")
    stored = tenants.daemon.home / "images" / image["id"]
    for part, mode in (("vmlinuz", 0o640), ("initrd.img", 0o640), ("disk.qcow2", 0o600)):
        info = (stored / part).stat()
        assert info.st_uid == 0 and not info.st_mode & 0o007, (part, oct(info.st_mode))
        assert stat.S_IMODE(info.st_mode) & ~mode == 0, (part, oct(info.st_mode))

    vm = unique("boot")
    created = tenants.cli_as("pa-admin", "vm", "create", vm, "--image", name, "--start", "--wait")
    assert created.returncode == 0, created.stderr
    ran = tenants.cli_as("pa-admin", "vm", "exec", vm, "--", "sh", "-c", "echo exported > /root/m; sync")
    assert ran.returncode == 0, ran.stderr

    archive = tmp_path / "out.tar"
    exported = tenants.cli_as("pa-admin", "vm", "export", vm, str(archive))
    assert exported.returncode == 0, exported.stderr
    assert "downloading out.tar: 100%" in exported.stderr, exported.stderr
    assert archive.is_file() and stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert _files(tenants.daemon.home / "exports" / "pa") == set()  # deleted once downloaded
    for private in ("uploads", "uploads/pa", "exports", "exports/pa"):  # root's alone
        assert stat.S_IMODE((tenants.daemon.home / private).stat().st_mode) == 0o700, private
    again = tenants.cli_as("pa-admin", "vm", "export", vm, str(archive))
    assert again.returncode != 0 and "already exists" in again.stderr

    copy = unique("copy")
    imported = tenants.cli_as("pa-admin", "vm", "import", str(archive), "--name", copy)
    assert imported.returncode == 0, imported.stderr
    assert "uploading out.tar: 100%" in imported.stderr
    started = tenants.cli_as("pa-admin", "vm", "start", copy, "--wait")
    assert started.returncode == 0, started.stderr
    seen = tenants.cli_as("pa-admin", "vm", "exec", copy, "--", "cat", "/root/m")
    assert seen.returncode == 0 and "exported" in seen.stdout, seen.stderr
    for gone in (vm, copy):
        tenants.cli_as("pa-admin", "vm", "delete", gone, "--force")


def test_exports_and_uploads_of_another_project_are_not_found(tenants) -> None:  # type: ignore[no-untyped-def]
    name = _new_vm(tenants, "pb-admin", "pbexp")
    with tenants.https("pb-admin") as client:
        answer = client.post(f"/vms/{name}/export", json={})
        assert answer.status_code == 202, answer.text
        job = tenants.wait("pb-admin", answer.json()["job"]["id"])
        assert job["state"] == "succeeded", job
        assert "file" not in job["result"]  # no host path in the answer
        export = job["result"]["export"]
    upload = _upload(tenants, "pb-admin", b"\0" * (1 << 20))
    with tenants.https("pa-admin") as client:
        assert client.get(f"/exports/{export}").status_code == 404
        assert client.delete(f"/exports/{export}").status_code == 404
        assert client.delete(f"/uploads/{upload}").status_code == 404
        stolen = client.post("/images/import", json={"name": unique("s"), "upload": upload})
        assert stolen.status_code == 404, stolen.text
        assert client.post("/vms/import", json={"upload": upload}).status_code == 404
    with tenants.https("pb-admin") as client:
        download = client.get(f"/exports/{export}")
        assert download.status_code == 200 and download.content.startswith(b"manifest.json")
        assert client.delete(f"/exports/{export}").status_code == 204
        assert client.delete(f"/uploads/{upload}").status_code == 204


# -- image names are per project ---------------------------------------------------------------------------------


def test_image_names_are_per_project_and_tell_nothing_of_others(tenants) -> None:  # type: ignore[no-untyped-def]
    name = unique("same")
    ids = {}
    for who in ("pb-admin", "pa-admin"):  # pb first: pa must be able to take the name all the same
        upload = _upload(tenants, who, b"\0" * (1 << 20))
        with tenants.https(who) as client:
            answer = client.post("/images/import", json={"name": name, "upload": upload})
            assert answer.status_code == 202, answer.text
            assert tenants.wait(who, answer.json()["job"]["id"])["state"] == "succeeded"
            ids[who] = client.get(f"/images/{name}").json()["id"]
    assert ids["pa-admin"] != ids["pb-admin"]
    only_pb = unique("pbonly")
    with tenants.https("pb-admin") as client:
        upload = _upload(tenants, "pb-admin", b"\0" * (1 << 20))
        answer = client.post("/images/import", json={"name": only_pb, "upload": upload})
        assert tenants.wait("pb-admin", answer.json()["job"]["id"])["state"] == "succeeded"
    with tenants.https("pa-admin") as client:
        never = unique("never")
        missing = client.get(f"/images/{never}")
        theirs = client.get(f"/images/{only_pb}")
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["detail"].replace(only_pb, "N") == missing.json()["detail"].replace(never, "N")
        assert client.delete(f"/images/{only_pb}").status_code == 404
        vm = client.post("/vms", json={"spec": {"name": unique("v"), "image": only_pb}})
        assert vm.status_code == 404, vm.text
        # The catalog (the default project's tiny) is shared; building it again is a no-op, not a squat.
        built = client.post("/images/build", json={"recipe": "tiny"})
        assert built.status_code == 202 and built.json()["job"] is None
    with tenants.https("pb-admin") as client:
        assert client.get(f"/images/{name}").json()["id"] == ids["pb-admin"]
