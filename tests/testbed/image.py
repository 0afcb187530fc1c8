"""Builds the project's container image from the Dockerfile without a daemon, and runs containers from it.

The base is Debian bookworm made by mmdebstrap (no registry is reachable, so `python:3.11-slim-bookworm`
cannot be pulled), imported into a private containers storage under <cache>/image/ and passed to the
Dockerfile as its `PYTHON` build arg; a second base with a C compiler and Python's headers stands in for
`python:3.11-bookworm` as its `BUILD` arg. `buildah bud` then builds the Dockerfile users build with
`docker build`. The result is pushed to a docker-archive, which keeps the tag through
`ctr -n k8s.io images import`.

Both steps are cached by content: each base under base-<digest>/ keyed on its mmdebstrap recipe, the
image under sluicegate-<version>-<digest>/ keyed on the Dockerfile, the packaging files, every file the
image copies from native/, sdk/, sidecar/ and operator/, the build flags and the bases' digests. The
storage driver is overlay as root, vfs otherwise. `python -m tests.testbed.image` prebuilds (`make servers`
runs it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .build import BuildFailed, apt_install, cache_root
from .cluster import stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "localhost/sluicegate"
BASE_NAME = "localhost/sluicegate-base"
SUITE = "bookworm"
# python-is-python3: the Dockerfile runs `python`, which the official python images provide.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# What Debian's slim images leave out too; the copyright files stay for the licences.
_DPKG_EXCLUDES = (
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale", "lintian")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
)
# The Dockerfile's build stage (its `BUILD` arg): the same, with what compiling the native reader needs.
BUILD_PACKAGES = (*BASE_PACKAGES, "gcc", "libc6-dev", "python3-dev")


def _recipe(packages: Sequence[str]) -> tuple[str, ...]:
    return ("mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", *_DPKG_EXCLUDES, SUITE)


# The environment Debian's own container images declare; a scratch image has none, and the Dockerfile
# extends PATH.
BASE_CONFIG = (
    "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "--env=LANG=C.UTF-8",
    "--cmd=python3",
)
IMAGE_INPUTS = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "constraints.txt",
    "README.md",
    "hatch_build.py",
)
IMAGE_TREES = ("native", "sdk", "sidecar", "operator")
# `buildah bud` raises its RUN steps' rlimits (nproc to 32768 by default), which fails where that exceeds
# the machine's hard limit; these fit any machine and are plenty for pip.
ULIMITS = ("--ulimit=nofile=1024:1024", "--ulimit=nproc=4096:4096")
# The Dockerfile's pip reaches PyPI; it must trust the CAs this machine trusts (an egress proxy may
# re-sign TLS), which pip's own certifi bundle does not know. Bound in for the build's RUN steps only.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUD_FLAGS = ("--isolation=chroot", "--network=host", "--pull=never", *ULIMITS, "--file=Dockerfile")
# docker-archive rather than oci-archive: `ctr images import` keeps its tag as the image's name.
ARCHIVE_TRANSPORT = "docker-archive"


class ImageUnavailable(RuntimeError):
    """buildah or mmdebstrap is missing and cannot be installed here."""


class ImageBuildFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    # The tag in the archive: the reference containerd lists after `ctr images import`.
    name: str
    # docker-archive (uncompressed layers), accepted by `ctr images import` and `docker load`.
    archive: Path
    # Sum of the uncompressed layers: what the image takes unpacked on a node.
    size_bytes: int
    # The image ID in the private storage (run_container starts it), where `name` may name a newer build.
    ref: str
    # The image config's USER, which run_container runs as (a runtime would).
    user: str


def _log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def _image_dir() -> Path:
    return cache_root() / "image"


def _storage_env() -> dict[str, str]:
    """Points buildah at a storage of its own under the cache, leaving the machine's containers alone."""
    root = _image_dir()
    conf = root / "storage.conf"
    # overlay needs root; rootless buildah could only use it through fuse-overlayfs, vfs always works.
    driver = "overlay" if os.geteuid() == 0 else "vfs"
    text = f'[storage]\ndriver = "{driver}"\ngraphroot = "{root / "storage"}"\nrunroot = "{root / "run"}"\n'
    if not conf.is_file() or conf.read_text() != text:
        root.mkdir(parents=True, exist_ok=True)
        staging = conf.with_name(f".storage.conf.{os.getpid()}")
        staging.write_text(text)
        staging.rename(conf)
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}


def buildah(*args: str, check: bool = True, timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    """`buildah` on the private storage."""
    result = subprocess.run(
        ["buildah", *args], env=_storage_env(), capture_output=True, text=True, timeout=timeout_s
    )
    if check and result.returncode != 0:
        raise ImageBuildFailed(
            f"buildah {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}{result.stderr}"
        )
    return result


def _ensure_tools() -> None:
    missing = [tool for tool in ("buildah", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if not missing:
        return
    try:
        apt_install(*missing)
    except BuildFailed as exc:
        raise ImageUnavailable(str(exc)) from exc


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git_files(*trees: str) -> list[str]:
    """Tracked plus untracked-but-not-ignored files under ``trees``: what a checkout would build from."""
    listed: set[str] = set()
    for extra in ((), ("--others", "--exclude-standard")):
        result = subprocess.run(
            ["git", "ls-files", "-z", *extra, "--", *trees],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        listed.update(p for p in result.stdout.split("\0") if p)
    return sorted(listed)


def _image_key(*base_digests: str) -> str:
    digest = hashlib.sha256("\0".join((*base_digests, *BUD_FLAGS, ARCHIVE_TRANSPORT)).encode())
    for rel in (*IMAGE_INPUTS, *_git_files(*IMAGE_TREES)):
        path = REPO_ROOT / rel
        # Deleted but still tracked: the build context lacks it as well.
        if path.is_file():
            digest.update(f"{rel}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def version() -> str:
    """The version pyproject.toml declares: what the image installs (installed metadata may be stale)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])


def _has_image(ref: str) -> bool:
    return buildah("inspect", "--type=image", ref, check=False).returncode == 0


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A fresh directory beside ``target``, renamed to it on success, so a killed build leaves no entry."""
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _base(packages: Sequence[str]) -> tuple[str, str]:
    """A base image with ``packages``: its reference in the private storage and its rootfs digest."""
    recipe = _recipe(packages)
    key = hashlib.sha256("\0".join(recipe + BASE_CONFIG).encode()).hexdigest()[:12]
    directory = _image_dir() / f"base-{SUITE}-{key}"
    if not directory.is_dir():
        with _staging(directory) as staging:
            _log(f"building a {SUITE} base with mmdebstrap ({', '.join(packages)}); first run only")
            started = time.monotonic()
            result = subprocess.run(
                [*recipe, "--quiet", str(staging / "rootfs.tar")], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise ImageBuildFailed(f"mmdebstrap exited {result.returncode}:\n{result.stderr[-4000:]}")
            (staging / "digest").write_text(_sha256_file(staging / "rootfs.tar"))
            _log(f"built the base rootfs in {time.monotonic() - started:.0f}s")
    digest = (directory / "digest").read_text()
    ref = f"{BASE_NAME}:{SUITE}-{digest[:12]}"
    if not _has_image(ref):
        started = time.monotonic()
        container = buildah("from", "--pull=never", "scratch").stdout.strip()
        try:
            buildah("add", container, str(directory / "rootfs.tar"), "/")
            buildah("config", *BASE_CONFIG, container)
            buildah("commit", "--quiet", container, ref)
        finally:
            buildah("rm", container, check=False)
        _log(f"imported the base as {ref} in {time.monotonic() - started:.0f}s")
    return ref, digest


def _archive_manifest(archive: Path) -> tuple[list[str], int]:
    """The archive's tags and the image's uncompressed size (docker-archive stores layers as plain tars)."""
    with tarfile.open(archive) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        (manifest,) = json.load(manifest_file)
        return list(manifest["RepoTags"]), sum(tar.getmember(layer).size for layer in manifest["Layers"])


def _trust_host_cas(staging: Path) -> list[str]:
    """`buildah bud` volumes giving the build's pip this machine's CA bundle (none if it has none)."""
    if not HOST_CA_BUNDLE.is_file():
        return []
    pip_conf = staging / "pip.conf"
    pip_conf.write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
    return [f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro", f"--volume={pip_conf}:/etc/pip.conf:ro"]


def _build(base: str, build_base: str, directory: Path, name: str) -> None:
    with _staging(directory) as staging:
        _log(f"building {name} from the Dockerfile on {base}")
        started = time.monotonic()
        iidfile = staging / "iid"
        buildah(
            "bud",
            *BUD_FLAGS,
            *_trust_host_cas(staging),
            f"--build-arg=PYTHON={base}",
            f"--build-arg=BUILD={build_base}",
            f"--tag={name}",
            f"--iidfile={iidfile}",
            str(REPO_ROOT),
        )
        (staging / "pip.conf").unlink(missing_ok=True)
        image_id = iidfile.read_text().strip().removeprefix("sha256:")
        iidfile.unlink()
        built = time.monotonic()
        archive = staging / "sluicegate.tar"
        # Pushed by ID: pushing by a name adds that name to the archive's tags as well.
        buildah("push", "--quiet", image_id, f"{ARCHIVE_TRANSPORT}:{archive}:{name}")
        tags, size = _archive_manifest(archive)
        # containerd names an imported docker-archive after its RepoTags.
        if tags != [name]:
            raise ImageBuildFailed(f"{archive} is tagged {tags}, not [{name!r}]")
        (staging / "image.json").write_text(json.dumps({"size_bytes": size, "id": image_id}))
        _log(
            f"built {name} in {built - started:.0f}s, archived in {time.monotonic() - built:.0f}s: "
            f"{size / 2**20:.0f} MiB -> {directory}"
        )


def _prune(keep: Path, kept: int = 2) -> None:
    """Each change to the sources builds a new image of ~1.3 GB (archive and storage): keep the newest
    `kept` builds, `keep` among them, and drop the others from the cache and the storage."""
    builds = sorted(
        (d for d in _image_dir().glob("sluicegate-*") if d.is_dir() and d != keep),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in builds[kept - 1 :]:
        with contextlib.suppress(OSError, ValueError, KeyError):
            image_id = json.loads((old / "image.json").read_text())["id"]
            buildah("rmi", "--force", image_id, check=False)
        shutil.rmtree(old, ignore_errors=True)


def _user(image_id: str) -> str:
    config = json.loads(buildah("inspect", "--type=image", image_id).stdout)["OCIv1"]["config"]
    return str(config.get("User") or "0:0")


def ensure_image() -> Image:
    """The image built from the working tree, building whatever the cache lacks."""
    started = time.monotonic()
    _ensure_tools()
    _image_dir().mkdir(parents=True, exist_ok=True)
    with (_image_dir() / "build.lock").open("w") as lock:
        # Two sessions on a cold machine must not both spend minutes building the same image.
        fcntl.flock(lock, fcntl.LOCK_EX)
        base, base_digest = _base(BASE_PACKAGES)
        build_base, build_digest = _base(BUILD_PACKAGES)
        key = _image_key(base_digest, build_digest)[:12]
        name = f"{NAME}:{version()}"
        directory = _image_dir() / f"sluicegate-{version()}-{key}"
        if not directory.is_dir():
            _build(base, build_base, directory, name)
            _prune(keep=directory)
        archive = directory / "sluicegate.tar"
        meta_file = directory / "image.json"
        meta = json.loads(meta_file.read_text())
        if not _has_image(meta["id"]):
            # The storage was cleared while the archive stayed: load it back for run_container.
            pulled = buildah("pull", "--quiet", f"{ARCHIVE_TRANSPORT}:{archive}").stdout.split()[-1]
            meta["id"] = pulled.removeprefix("sha256:")
            meta_file.write_text(json.dumps(meta))
    _log(f"{name} (image {meta['id'][:12]}) ready in {time.monotonic() - started:.1f}s")
    return Image(
        name=name, archive=archive, size_bytes=meta["size_bytes"], ref=meta["id"], user=_user(meta["id"])
    )


@contextlib.contextmanager
def run_container(
    image: Image,
    command: Sequence[str],
    *,
    volumes: Sequence[tuple[Path, str]] = (),
) -> Iterator[subprocess.Popen[str]]:
    """A container of ``image`` running ``command`` under runc, as the image's USER with its environment,
    on the host's network, with ``volumes`` (host path, container path) bound read-only. Yields the
    `buildah run` process (stdout and stderr merged into ``stdout``); the container is removed on exit."""
    container = f"sluicegate-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--pull=never", f"--name={container}", image.ref)
    argv = [
        "buildah",
        "run",
        "--isolation=oci",
        "--runtime=runc",
        "--network=host",
        f"--user={image.user}",
        *(f"--volume={host}:{inside}:ro" for host, inside in volumes),
        container,
        "--",
        *command,
    ]
    proc = subprocess.Popen(
        argv,
        env=_storage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, for stop_process_group
    )
    try:
        yield proc
    finally:
        stop_process_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        buildah("rm", container, check=False)


def run_in_image(
    image: Image,
    command: Sequence[str],
    *,
    timeout_s: float = 60,
    volumes: Sequence[tuple[Path, str]] = (),
) -> subprocess.CompletedProcess[str]:
    """Runs ``command`` to completion in a container of ``image``; its exit status and merged output."""
    with run_container(image, command, volumes=volumes) as proc:
        output, _ = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


if __name__ == "__main__":
    built = ensure_image()
    print(f"name    {built.name}\nref     {built.ref}\narchive {built.archive}")
    print(f"size    {built.size_bytes} bytes ({built.size_bytes / 2**20:.0f} MiB)")
