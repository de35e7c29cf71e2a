"""The .deb as the README's build command makes it, read with dpkg-deb as a Debian
maintainer would check it: where every file lands, what it depends on, and what its
maintainer scripts do. (tests/test_systemd_e2e.py installs the same file and uses it.)
"""

from __future__ import annotations

import subprocess
import tomllib

import debpkg
import pytest

from uniond import config


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def deb():
    return debpkg.build()


@pytest.fixture(scope="module")
def files(deb) -> list[str]:
    # "-rw-r--r-- root/root 954 2026-11-23 02:47 ./usr/share/..." -> "/usr/share/..."
    return [line.split(maxsplit=5)[5][1:] for line in dpkg_deb("-c", str(deb)).splitlines()]


def field(deb, name: str) -> str:
    return dpkg_deb("-f", str(deb), name).strip()


def test_files_land_in_debian_places(files):
    for path in [
        "/usr/bin/uniond",
        "/usr/lib/python3/dist-packages/uniond/service/daemon.py",
        "/lib/systemd/system/uniond.service",
        "/usr/share/dbus-1/system.d/org.uniond1.conf",
        "/usr/share/dbus-1/system-services/org.uniond1.service",
        "/usr/share/dbus-1/interfaces/org.uniond1.Manager.xml",
        "/usr/share/dbus-1/interfaces/org.uniond1.Mount.xml",
        "/usr/share/polkit-1/actions/org.uniond1.policy",
        "/usr/lib/tmpfiles.d/uniond.conf",
        "/etc/uniond/uniond.conf",
        "/etc/uniond/mounts.d/",  # declared mounts, one NAME.toml each
        "/usr/share/man/man8/uniond.8.gz",
        "/usr/bin/unionctl",
        "/usr/lib/python3/dist-packages/uniond/client/cli.py",
        "/usr/share/bash-completion/completions/unionctl",
        "/usr/share/zsh/vendor-completions/_unionctl",
        "/usr/share/man/man1/unionctl.1.gz",
        "/usr/share/doc/uniond/copyright",
        "/usr/share/doc/uniond/README.md",  # uniond.service's Documentation=
    ]:
        assert path in files, f"{path} is not in the package"
    regular = [f for f in files if not f.endswith("/")]
    names = [f.rsplit("/", 1)[1] for f in regular if f.rsplit("/", 1)[1].startswith("org.uniond1.")]
    assert len(names) == 5, names
    # Each D-Bus file once, at its Debian path: none left where pyproject's data-files
    # would put them for pip, nothing under /usr/local or /usr/etc.
    assert len(names) == len(set(names)), sorted(names)
    assert not [f for f in regular if f.startswith(("/usr/local/", "/usr/etc/"))]
    assert not [f for f in regular if "__pycache__" in f]


def test_depends_on_debian_python_libraries(deb):
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    assert "python3-dbus-next (>= 0.2.3)" in depends
    assert "python3-sdnotify (>= 0.3.1)" in depends
    assert "python3-click (>= 8.1.3)" in depends and "python3-tqdm (>= 4.64)" in depends
    assert any(d.startswith("python3:any") or d.startswith("python3 ") for d in depends), depends
    assert "dbus-system-bus | dbus" in depends
    assert field(deb, "Architecture") == "all"
    assert field(deb, "Version") == "0.1.0-1"


def test_configuration_is_a_conffile_and_all_defaults(deb, tmp_path):
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/uniond/uniond.conf"]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "root")], check=True)
    shipped = tmp_path / "root/etc/uniond/uniond.conf"
    # Commented out throughout: the shipped file changes nothing, and what it shows
    # in comments are the real defaults and a valid file once uncommented.
    assert config.load(str(shipped), required=True) == config.Config()
    uncommented = "\n".join(line[1:] for line in shipped.read_text().splitlines() if line.startswith("#log_level"))
    assert tomllib.loads(uncommented) == {"log_level": config.Config().log_level}


def test_maintainer_scripts(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path)], check=True)
    postinst = (tmp_path / "postinst").read_text()
    postrm = (tmp_path / "postrm").read_text()
    prerm = (tmp_path / "prerm").read_text()
    for script in (postinst, postrm):
        assert "busctl --system call org.freedesktop.DBus /org/freedesktop/DBus" in script
        assert "ReloadConfig" in script
        assert "systemctl --system daemon-reload" in script
    assert "systemd-tmpfiles ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} --create uniond.conf" in postinst
    assert "deb-systemd-helper enable 'uniond.service'" in postinst
    # An upgrade restarts uniond (it adopts its mounts); removal stops it, which leaves
    # the mounts in place.
    assert "_dh_action=restart" in postinst
    assert "deb-systemd-invoke stop 'uniond.service'" in prerm
    assert "deb-systemd-helper purge 'uniond.service'" in postrm
    for name in ("postinst", "postrm", "prerm"):
        subprocess.run(["sh", "-n", str(tmp_path / name)], check=True)


@pytest.mark.parametrize("page, needles", [
    ("man8/uniond.8.gz", ["systemctl reload uniond", "STATE_DIRECTORY", "ExportDiff", "org.uniond1.conf"]),
    ("man1/unionctl.1.gz", ["unionctl export", "EXIT STATUS", "--json", "MountAdded"]),
])
def test_man_pages_render_cleanly(deb, tmp_path, page, needles):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    page = tmp_path / "usr/share/man" / page
    result = subprocess.run(f"zcat {page} | groff -man -ww -z", shell=True, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    rendered = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                              env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}).stdout
    for needle in needles:
        assert needle in " ".join(rendered.split()), needle
