"""Post-fine-tuning repair (the ``restore`` stage, specs/restoration.md): one class per method
on :class:`vaa.restore.base.Restorer`, one YAML per method in ``conf/restore/``."""
