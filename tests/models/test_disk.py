"""models/disk.py: a cache file is built by one process at a time; the others wait and
read it."""

from __future__ import annotations

import select
import subprocess
import sys

from metapeft_dist.models.disk import building

# A process that needs the cache: under the build lock, it builds the file (one line in
# the log, then half a second of "work") unless another process already did.
_NEEDS_CACHE = """
import sys, time
from pathlib import Path
from metapeft_dist.models.disk import building
target, log = Path(sys.argv[1]), Path(sys.argv[2])
with building(target, "the test cache"):
    if not target.is_file():
        with log.open("a") as f:
            f.write("built\\n")
        time.sleep(0.5)
        target.write_text("states")
print(target.read_text())
"""


def test_processes_needing_one_cache_build_it_once(tmp_path):
    target, log = tmp_path / "cache" / "states.safetensors", tmp_path / "log"
    with building(target, "the test cache"):  # held here while both start and wait
        procs = [subprocess.Popen([sys.executable, "-c", _NEEDS_CACHE, str(target), str(log)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for p in procs:  # each says it waits, then blocks until the lock is free
            assert select.select([p.stderr], [], [], 60)[0], "no line in 60 s"
            assert p.stderr.readline() == ("metapeft: waiting for another process building "
                                           "the test cache\n")
        assert not log.exists()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert log.read_text() == "built\n"  # one of them built it
    assert [out for out, _ in outs] == ["states\n", "states\n"]  # both read it
