"""Builds the pinned testbed binaries from Go modules and caches them per version.

Each directory under gomod/ is a tiny Go module pinning one upstream module. Its binaries are built once
into <cache>/<name>-<version>-<digest>/, where the digest covers go.mod, go.sum, the Go version and the
build flags, so a changed pin (or toolchain) builds afresh and an unchanged one costs nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GOMOD_DIR = Path(__file__).resolve().parent / "gomod"
# Server side (component-base) and client side (client-go, what kubectl reports) version variables.
_KUBE_VERSION_VARS = tuple(
    f"{package}.{assignment}"
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    for assignment in ("gitVersion={version}", "gitMajor={major}", "gitMinor={minor}", "gitTreeState=clean")
)


class GoUnavailable(RuntimeError):
    """The binaries are not cached and there is no Go toolchain to build them."""


class BuildFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class GoModule:
    directory: str
    module: str
    # binary name -> Go package; all packages of a module are built by one `go build` to share compilation.
    binaries: dict[str, str]
    # Go variables stamped with the pinned version as the projects' release builds do; a plain `go build`
    # leaves placeholders such as "v0.0.0-master", which breaks clients' version checks (helm's kubeVersion).
    version_vars: tuple[str, ...] = ()
    # Go build tags, e.g. to leave out code the tests never run (and its build time).
    tags: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return GOMOD_DIR / self.directory

    @property
    def version(self) -> str:
        match = re.search(
            rf"^require {re.escape(self.module)} (\S+)", (self.path / "go.mod").read_text(), re.M
        )
        if match is None:
            raise BuildFailed(f"{self.path}/go.mod does not require {self.module} on a single line")
        return match.group(1)

    @property
    def build_flags(self) -> list[str]:
        major, minor = self.version.lstrip("v").split(".")[:2]
        stamps = [
            f"-X {var.format(version=self.version, major=major, minor=minor)}" for var in self.version_vars
        ]
        tags = [f"-tags={','.join(self.tags)}"] if self.tags else []
        return ["-trimpath", *tags, f"-ldflags={' '.join(['-s', '-w', *stamps])}"]


MODULES = (
    GoModule("etcd", "go.etcd.io/etcd/server/v3", {"etcd": "go.etcd.io/etcd/server/v3"}),
    GoModule(
        "kubernetes",
        "k8s.io/kubernetes",
        {
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
            "kubelet": "k8s.io/kubernetes/cmd/kubelet",
        },
        _KUBE_VERSION_VARS,
    ),
    GoModule("kwok", "sigs.k8s.io/kwok", {"kwok": "sigs.k8s.io/kwok/cmd/kwok"}),
    # The real node: containerd (CRI), its runc shim and ctr; the CNI plugins that give pods a network.
    GoModule(
        "containerd",
        "github.com/containerd/containerd/v2",
        {
            "containerd": "github.com/containerd/containerd/v2/cmd/containerd",
            "containerd-shim-runc-v2": "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
            "ctr": "github.com/containerd/containerd/v2/cmd/ctr",
        },
    ),
    GoModule(
        "cni",
        "github.com/containernetworking/plugins",
        {
            "bridge": "github.com/containernetworking/plugins/plugins/main/bridge",
            "host-local": "github.com/containernetworking/plugins/plugins/ipam/host-local",
            "loopback": "github.com/containernetworking/plugins/plugins/main/loopback",
            "portmap": "github.com/containernetworking/plugins/plugins/meta/portmap",
        },
    ),
    GoModule(
        "helm",
        "helm.sh/helm/v3",
        {"helm": "helm.sh/helm/v3/cmd/helm"},
        ("helm.sh/helm/v3/internal/version.version={version}",),
    ),
    # Prometheus scrapes the operator and the sidecars and evaluates the chart's rules; promtool tests them.
    # Of the service discoveries only Kubernetes' is built (the scrape configs mirror the chart's monitors).
    GoModule(
        "prometheus",
        "github.com/prometheus/prometheus",
        {
            "prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
            "promtool": "github.com/prometheus/prometheus/cmd/promtool",
        },
        tags=("remove_all_sd", "enable_kubernetes_sd"),
    ),
)


def apt_install(*packages: str) -> None:
    """Installs Debian packages the testbed needs beside the Go builds (runc, buildah, mmdebstrap)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BuildFailed(f"{', '.join(packages)} not installed, and apt-get cannot install them here")
    _log(f"installing {', '.join(packages)} from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
    install = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        capture_output=True,
        text=True,
        env=env,
    )
    if install.returncode != 0:
        raise BuildFailed(f"apt-get install {' '.join(packages)} failed:\n{update.stderr}{install.stderr}")


def pinned_versions() -> dict[str, str]:
    return {m.module: m.version for m in MODULES}


def cache_root() -> Path:
    if override := os.environ.get("SLUICEGATE_TESTBED_CACHE"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluicegate-testbed"


def _go_version(go: str) -> str:
    return subprocess.run(
        [go, "env", "GOVERSION", "GOOS", "GOARCH"], check=True, capture_output=True, text=True
    ).stdout


def _cache_dir(module: GoModule, go_version: str) -> Path:
    digest = hashlib.sha256()
    for part in ((module.path / "go.mod").read_bytes(), (module.path / "go.sum").read_bytes()):
        digest.update(part)
    digest.update(go_version.encode())
    digest.update(" ".join(module.build_flags).encode())
    digest.update(" ".join(sorted(module.binaries.values())).encode())
    return cache_root() / f"{module.directory}-{module.version}-{digest.hexdigest()[:10]}"


def _cached(module: GoModule) -> Path | None:
    """The newest complete cache entry for the pinned version; lets machines without Go reuse a build."""
    pattern = f"{module.directory}-{module.version}-*"
    candidates = [c for c in cache_root().glob(pattern) if c.is_dir()]
    for candidate in sorted(candidates, key=lambda c: c.stat().st_mtime, reverse=True):
        if all((candidate / b).is_file() for b in module.binaries):
            return candidate
    return None


def _log(message: str) -> None:
    print(f"[testbed] {message}", file=sys.stderr, flush=True)


def _build(module: GoModule, go: str, target: Path) -> None:
    lock_path = target.with_name(target.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        # Two test sessions starting together on a cold machine must not both spend 15 minutes building.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # With several packages `-o` must name a directory; with one it names the binary.
        out = f"{staging}/" if len(module.binaries) > 1 else str(staging / next(iter(module.binaries)))
        env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
        _log(f"building {module.module} {module.version} ({', '.join(module.binaries)}); first run only")
        started = time.monotonic()
        result = subprocess.run(
            [go, "build", *module.build_flags, "-o", out, *module.binaries.values()],
            cwd=module.path,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise BuildFailed(f"go build for {module.module} failed:\n{result.stdout}{result.stderr}")
        missing = [b for b in module.binaries if not (staging / b).is_file()]
        if missing:
            raise BuildFailed(f"go build for {module.module} did not produce {missing}")
        staging.rename(target)
        _log(f"built {module.module} in {time.monotonic() - started:.0f}s -> {target}")


def ensure_binaries() -> dict[str, Path]:
    """Returns binary name -> path, building whatever the cache lacks."""
    go = shutil.which("go")
    go_version = _go_version(go) if go else ""
    paths: dict[str, Path] = {}
    for module in MODULES:
        directory = _cache_dir(module, go_version) if go else _cached(module)
        if directory is None:
            raise GoUnavailable(
                f"no cached build of {module.module} {module.version} under {cache_root()} "
                "and no `go` on PATH to build it (install Go >= 1.26)"
            )
        if not directory.is_dir():
            assert go is not None
            _build(module, go, directory)
        paths.update({b: directory / b for b in module.binaries})
    return paths
