"""The paper presets run the setting they name (issue 12 item 2; baselines.md §0, §3-4;
protocol.md §10): the VAA-setting values of RepNoise and Booster in experiment=paper_llama2 /
paper_qwen, and protocol=reference's alignment-set size (1,000 for Booster and RepNoise, 2,000
for the others) and RepNoise's token-difference mask. Composed with Hydra's compose API."""

from __future__ import annotations

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR

# experiment → (RepNoise option, its α) — the VAA scripts' values (baselines.md §3)
PAPER = {"paper_llama2": ("repnoise_vaa", 0.001), "paper_qwen": ("repnoise_vaa_qwen", 1e-4)}


def _swept_methods(experiment: str) -> list[str]:
    raw = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")
    return str(raw.hydra.sweeper.params.method).split(",")


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_presets_sweep_the_vaa_setting_baselines(compose, experiment):
    repnoise, alpha = PAPER[experiment]
    methods = _swept_methods(experiment)
    assert methods == ["sft", "vaa", "vaccine", repnoise, "booster_vaa"]
    rn = compose([f"experiment={experiment}", f"method={repnoise}"])
    assert (rn.method.name, rn.method.noise_weight, rn.method.ascent_weight) == (repnoise, 0.1, alpha)
    assert rn.method.mask == "response"  # protocol=paper: response labels (protocol.md §10)
    assert rn.protocol.name == "paper" and rn.align.n == 2000  # paper: one n for every method
    bo = compose([f"experiment={experiment}", "method=booster_vaa"])
    assert (bo.method.lam, bo.method.alpha, bo.method.harmful_batch_size) == (1.0, 0.001, 10)
    assert bo.method.variant == "upstream" and bo.align.n == 2000


def test_vaa_setting_method_files_carry_exactly_the_spec_values(compose):
    for option, alpha in (("repnoise_vaa", 0.001), ("repnoise_vaa_qwen", 1e-4)):
        m = compose([f"method={option}"]).method
        assert (m.name, m.noise_weight, m.ascent_weight, m.mask) == (option, 0.1, alpha, "response")
    up = compose(["method=repnoise"]).method
    assert (up.noise_weight, up.ascent_weight) == (0.001, 1.0)  # upstream values stay upstream
    b = compose(["method=booster_vaa"]).method
    assert (b.name, b.lam, b.alpha) == ("booster_vaa", 1.0, 0.001)


def _method_options_of(classes: tuple[str, ...], compose) -> list[str]:
    out = []
    for f in sorted((CONF_DIR / "method").glob("*.yaml")):
        cls = get_class(compose([f"method={f.stem}"]).method._target_).__name__
        if cls in classes:
            out.append(f.stem)
    return out


def test_reference_protocol_aligns_booster_and_repnoise_on_1000_rows(compose):
    small = _method_options_of(("Booster", "RepNoise"), compose)
    assert {"booster", "booster_vaa", "repnoise", "repnoise_vaa", "repnoise_vaa_qwen"} <= set(small)
    for option in small:  # every Booster / RepNoise YAML, so a new variant cannot be forgotten
        cfg = compose(["protocol=reference", "data=real_files", f"method={option}"])
        assert cfg.align.n == 1000, option
        assert cfg.extra_data.alignment.stop == 1000  # Lisa's stream follows the same n
    for option in ("sft", "vaa", "vaccine"):
        assert compose(["protocol=reference", "data=real_files", f"method={option}"]).align.n == 2000
    for option in ("booster_vaa", "sft"):
        assert compose(["protocol=paper", "data=real_files", f"method={option}"]).align.n == 2000


def test_reference_protocol_uses_repnoise_token_difference_mask(compose):
    for option in ("repnoise", "repnoise_vaa", "repnoise_vaa_qwen"):
        assert compose(["protocol=reference", "data=real_files", f"method={option}"]).method.mask == "diff_tokens"
        assert compose([f"method={option}"]).method.mask == "response"
    # an explicit choice on the command line wins over the protocol's
    cfg = compose(["protocol=reference", "data=real_files", "method=repnoise_vaa", "method.mask=response"])
    assert cfg.method.mask == "response"
    cfg = compose(["protocol=reference", "data=real_files", "method=booster_vaa", "align.n=500"])
    assert cfg.align.n == 500
