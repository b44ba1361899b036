from vaa.config import resolvers as _resolvers  # noqa: F401  (${vaa.run_id:} in hydra.run.dir)
