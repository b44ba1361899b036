"""Group DRO components of VAA stage 2 (specs/vaa.md §3, §6): the EXP3 group sampler and the
Sagawa-style loss-reweighting Group DRO of the ``gdro_reweight`` ablation."""

from vaa.methods.dro.reweight import GroupLossReweighter, per_sample_token_mean_ce
from vaa.methods.dro.sampler import INV, VUL, EXP3Sampler

__all__ = ["EXP3Sampler", "GroupLossReweighter", "per_sample_token_mean_ce", "INV", "VUL"]
