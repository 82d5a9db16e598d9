"""Two jax.distributed CPU processes on localhost read one dataset through the loader.

Each process has 2 local CPU devices; the mesh (data=2, fsdp=2) spans both. The test
checks that the hosts' records are disjoint and together cover the data, that each
global jax.Array has the global batch, and that gathering it gives host 0's batch
followed by host 1's.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_pipelines import fake_shards

N = 24
GLOBAL_BATCH = 4
STEPS = N // GLOBAL_BATCH  # one epoch

CHILD = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import ml_collections
    from jax.experimental import multihost_utils

    port, pid, path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=2, process_id=pid)
    from data_pipelines import loaders
    assert jax.process_count() == 2 and jax.local_device_count() == 2
    cfg = ml_collections.ConfigDict({"data": dict(
        path=path, global_batch_size=%d, image_size=8, id_fields=["id_dlib"],
        id_dims=[128], exp_field="exp_fer", exp_dim=7, seed=0, num_workers=0,
        latent_field="latent", latent_channels=4, latent_downsample=4)})
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
    it = loaders.make_train_iterator(cfg, mesh)
    local, gathered, shapes = [], [], []
    for _ in range(%d):
        b = next(it)
        shapes.append(list(b["bkg_image"].shape))
        ids = b["src"]["bkg"]
        local.append(np.concatenate([np.asarray(s.data) for s in sorted(
            ids.addressable_shards, key=lambda s: s.index[0].start)]).tolist())
        full = multihost_utils.process_allgather(ids, tiled=True)
        emb = multihost_utils.process_allgather(b["id"]["id_dlib"], tiled=True)
        assert (np.asarray(emb)[:, 0] == np.asarray(full)).all()
        gathered.append(np.asarray(full).tolist())
    json.dump({"local": local, "gathered": gathered, "shapes": shapes,
               "process_index": jax.process_index()}, open(out, "w"))
""") % (GLOBAL_BATCH, STEPS)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multihost
def test_two_hosts_read_disjoint_covering_shards(tmp_path):
  data = str(tmp_path / "ds")
  fake_shards.write_dataset(data, N, records_per_shard=7)
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  port = _free_port()
  outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), data, outs[i]],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  res = [json.load(open(o)) for o in outs]
  assert [r["process_index"] for r in res] == [0, 1]
  for r in res:
    assert r["shapes"] == [[GLOBAL_BATCH, 8, 8, 3]] * STEPS
    assert all(len(b) == GLOBAL_BATCH // 2 for b in r["local"])
  host = [set(np.concatenate(r["local"]).tolist()) for r in res]
  assert not host[0] & host[1]
  assert host[0] | host[1] == set(range(N))
  for step in range(STEPS):
    want = res[0]["local"][step] + res[1]["local"][step]
    assert res[0]["gathered"][step] == want == res[1]["gathered"][step]
