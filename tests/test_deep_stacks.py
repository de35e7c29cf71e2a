"""Deep stacks: hundreds of lowers with long paths, far over the 4 KiB option page (M2),
mounted through one ``lowerdir+`` per layer; more than the kernel's 500 is refused."""

from __future__ import annotations

import os
import time

import pytest
from harness import CallError, is_mounted

from uniond import constants

E = constants.ERROR_PREFIX


def make_lowers(base, count: int) -> list:
    """``count`` layers, top-most first, each about 230 bytes of path: layer i holds
    its own file and a shared ``who`` (the top-most one shows)."""
    lowers = []
    for i in range(count):
        d = base / f"layer-{i:03d}-{'x' * 180}" / "content"
        d.mkdir(parents=True)
        (d / f"f{i:03d}").write_text(str(i))
        (d / "who").write_text(str(i))
        lowers.append(d)
    return lowers


@pytest.mark.parametrize("count", [128, 256, 500])
def test_deep_stack_mounts_updates_and_unmounts(client, layers, tmp_path, count):
    t = layers
    lowers = make_lowers(tmp_path / "deep", count)
    size = sum(len(str(p)) + 1 for p in lowers)
    assert size > 4096 * 6, "the layer list is far over one page"
    started = time.monotonic()
    path = client.mount(lowers, t / "upper", t / "merge")
    mounted = time.monotonic() - started
    assert client.props(path)["LowerDirs"] == [str(p) for p in lowers]
    names = os.listdir(t / "merge")
    assert len(names) == count + 1 and "f000" in names and f"f{count - 1:03d}" in names
    assert (t / "merge/who").read_text() == "0", "the first lower is the top-most (M1)"
    (t / "merge/new").write_text("n")
    started = time.monotonic()
    client.call("Update", "oasa{sv}", path, [str(p) for p in reversed(lowers)], {})
    updated = time.monotonic() - started
    assert (t / "merge/who").read_text() == str(count - 1)
    assert (t / "merge/new").read_text() == "n"
    client.unmount(path)
    assert not is_mounted(t / "merge")
    print(f"{count} lowers, {size} bytes of paths: Mount {mounted * 1000:.0f} ms, Update {updated * 1000:.0f} ms")


def test_more_than_500_lowers_is_refused(client, layers, tmp_path):
    lowers = make_lowers(tmp_path / "deep", 501)
    with pytest.raises(CallError) as e:
        client.mount(lowers, "", layers / "merge")
    assert e.value.name == f"{E}.InvalidArgument"
    assert "501 given; the kernel stacks at most 500" in e.value.text
    assert client.list() == [] and not is_mounted(layers / "merge")
