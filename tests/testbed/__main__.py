"""`python -m tests.testbed build|up|down`: the entry points behind `make testbed` and `make testbed-down`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .build import BuildFailed, GoUnavailable, ensure_binaries, pinned_versions
from .cluster import Testbed, TestbedError, stop_process_groups

REPO_ROOT = Path(__file__).resolve().parents[2]


def _build(_: Path) -> int:
    started = time.monotonic()
    binaries = ensure_binaries()
    for name, path in binaries.items():
        print(f"{name:25} {path}")
    for module, version in pinned_versions().items():
        print(f"{module:25} {version}")
    print(f"ready in {time.monotonic() - started:.1f}s")
    return 0


def _up(state_dir: Path) -> int:
    state_file = state_dir / "state.json"
    if state_file.exists():
        print(
            f"a testbed is already recorded in {state_file}; run `make testbed-down` first", file=sys.stderr
        )
        return 1
    binaries = ensure_binaries()
    workdir = state_dir / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # Keeps the whole state directory out of git without touching the repository's .gitignore.
    (state_dir / ".gitignore").write_text("*\n")
    testbed = Testbed(workdir, binaries)
    started = time.monotonic()
    try:
        testbed.start()
    except TestbedError:
        testbed.stop()
        raise
    state_file.write_text(
        json.dumps(
            {
                "pids": testbed.pids,
                "binaries": {name: str(binaries[name]) for name in testbed.pids},
                "server": testbed.server,
            },
            indent=2,
        )
    )
    shutil.copyfile(testbed.kubeconfig, state_dir / "kubeconfig")
    (state_dir / "kubeconfig").chmod(0o600)
    bin_dir = state_dir / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("kubectl", "helm"):
        link = bin_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to(binaries[name])
    elapsed = time.monotonic() - started
    print(f"""testbed healthy in {elapsed:.1f}s: API server {testbed.server}, logs in {workdir / "logs"}

  export KUBECONFIG={state_dir / "kubeconfig"} PATH={bin_dir}:$PATH
  kubectl get nodes

stop it with `make testbed-down` (python -m tests.testbed down)""")
    return 0


def _down(state_dir: Path) -> int:
    state_file = state_dir / "state.json"
    if not state_file.exists():
        print(f"no testbed recorded in {state_dir}")
        return 0
    state = json.loads(state_file.read_text())
    stop_process_groups(state["pids"], state["binaries"])
    shutil.rmtree(state_dir / "run", ignore_errors=True)
    shutil.rmtree(state_dir / "bin", ignore_errors=True)
    (state_dir / "kubeconfig").unlink(missing_ok=True)
    state_file.unlink()
    print(f"testbed stopped (pids {', '.join(map(str, state['pids'].values()))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    parser.add_argument("command", choices=("build", "up", "down"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=REPO_ROOT / ".testbed",
        help="where `up` records PIDs, the admin kubeconfig and bin/ (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        return {"build": _build, "up": _up, "down": _down}[args.command](args.state_dir.resolve())
    except (GoUnavailable, BuildFailed, TestbedError) as error:
        print(f"testbed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
