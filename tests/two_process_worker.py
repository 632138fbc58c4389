"""One process of a real 2-process job on 127.0.0.1 (gloo CPU collectives)."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_threefry_partitionable", True)


def main(port: int, process_id: int, workdir: str, out: str):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  from ldm_jax.training import loop
  from tests import toy
  config = toy.toy_config(mesh=[("data", -1), ("fsdp", 1), ("tensor", 1)])
  res = loop.run(toy.ToyTask(config), config, workdir,
                 toy.make_data(config, jax.process_index(), jax.process_count()))
  from jax.experimental import multihost_utils
  params = multihost_utils.process_allgather(res["state"]["params"], tiled=True)
  if process_id == 0:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat},
             losses=np.array([m["loss"] for _, m in res["logged"]]))
  jax.distributed.shutdown()


def cache_main(port: int, process_id: int, workdir: str):
  """Both processes encode their shards of one pass into one latent cache."""
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  from ldm_jax import parallel
  from ldm_jax.training import latent_cache
  from tests.test_latent_cache import cache_worker_config, pool
  c = cache_worker_config(workdir)
  mesh = parallel.make_mesh(c)
  encode = jax.jit(lambda x: (pool(x), None), out_shardings=parallel.batch_sharding(mesh))
  latent_cache.build(c, encode, mesh, os.path.join(workdir, "latents"), batch_size=8,
                     source={})
  jax.distributed.shutdown()


if __name__ == "__main__":
  if sys.argv[4] == "cache":
    cache_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
  else:
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
