"""The OCI tools uniond's layers and images meet, run for real: umoci, skopeo, podman
and buildah from Debian. Their storage lives in the test's temporary directory (and
the private mount namespace `./dev test` makes), never the machine's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class Peers:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        root = directory / "storage"
        root.mkdir(parents=True)
        run = Path(tempfile.mkdtemp(prefix="uniond-peers-"))  # podman takes at most 50 characters here
        self.runroot = run
        (directory / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{root}"\nrunroot = "{run}"\n'
        )
        (directory / "containers.conf").write_text('[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n')
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(directory / "storage.conf"),
            "CONTAINERS_CONF": str(directory / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(directory / "registries.conf"),
            "TMPDIR": str(directory),
            "HOME": str(directory),
        }
        (directory / "registries.conf").write_text("")
        self.storage = ["--root", str(root), "--runroot", str(run), "--storage-driver", "vfs"]

    def close(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def run(self, *argv: str) -> str:
        done = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, cwd=self.dir)
        assert done.returncode == 0, f"{argv}: {done.stderr}"
        return done.stdout

    def umoci(self, *argv: str) -> str:
        return self.run("umoci", *argv)

    def skopeo(self, *argv: str) -> str:
        return self.run("skopeo", "--insecure-policy", *argv)

    def podman(self, *argv: str) -> str:
        return self.run("podman", *self.storage, *argv)

    def buildah(self, *argv: str) -> str:
        return self.run("buildah", *self.storage, *argv)


def oci_manifest(layout: Path, ref: str) -> tuple[str, dict, dict]:
    """(manifest digest, manifest, config) of ``ref`` in an OCI layout directory."""
    index = json.loads((layout / "index.json").read_text())
    named = "org.opencontainers.image.ref.name"
    (desc,) = [m for m in index["manifests"] if m.get("annotations", {}).get(named) == ref]
    manifest = json.loads(blob(layout, desc["digest"]))
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    return desc["digest"], manifest, config


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()
