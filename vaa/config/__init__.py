from vaa.config import resolvers as _resolvers  # noqa: F401  (${vaa.run_id:} in hydra.run.dir)

import warnings as _warnings

# conf/hydra/launcher/submitit_local.yaml spells out the plugin's config of the same name (so it
# still works once Hydra drops automatic schema matching); Hydra 1.3 warns that it matches.
_warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/submitit_local' is validated against ConfigStore schema")
