"""The pipeline's stages. Each builds one artifact into a directory given by the cache.

world → base → aligned → finetuned, with an evaluation of every model. A stage reads
its inputs from upstream artifact directories and its settings from the config.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaa.data.datamodule import hft_mix
from vaa.data.groups_file import groups_for, import_reference_indices, read_groups
from vaa.data.reference_indices import alignment_provenance
from vaa.data.sources import DATASET_FORMATS, FolderSource, extra_examples
from vaa.data.templates import TEXT_TEMPLATES
from vaa.eval.evaluate import evaluate
from vaa.eval.scorers import build_scorer
from vaa.data.hub import build_real_data, is_real_data
from vaa.eval.pairwise import build_pairwise_scorer
from vaa.models.build import build_tiny_llama, load_model, save_model
from vaa.models.hf import is_hf_model, prepare_for_training, resolve_dtype, to_eval_device, write_base
from vaa.models.tokenizer import build_word_tokenizer
from vaa.pipeline.cache import ArtifactCache
from vaa.restore.base import restore_stage
from vaa.training.fit import fit
from vaa.training.module import AlignModule, FinetuneModule, PretrainModule
from vaa.world.generator import WorldSizes, write_world


@dataclass
class Context:
    cfg: DictConfig
    cache: ArtifactCache
    keys: dict[str, str]
    run_dir: Path
    dirs: dict[str, Path] = field(default_factory=dict)
    # training stage -> example list -> counts of targets cut at max_length (encode.Truncation)
    truncation: dict[str, dict] = field(default_factory=dict)

    @property
    def source(self) -> FolderSource:
        return FolderSource(self.dirs["world"])

    def work_dir(self, stage: str) -> Path | None:  # resumable checkpoints of an unfinished stage
        return self.cache.work_dir(self.keys[stage]) if stage in self.keys else None


def build_world(ctx: Context, out: Path) -> None:
    if is_real_data(ctx.cfg.data):  # real datasets: the protocol's slices, same layout
        build_real_data(ctx.cfg.data, out)
        return
    sizes = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    sizes.pop("name")
    write_world(WorldSizes(**sizes), out)


def world_texts(source: FolderSource) -> list[str]:
    """Everything the model will read or write: every split of every dataset, as templated
    prompts and targets, so the tokenizer has a word for each."""
    texts = [t.format(instruction="x", input="y") for t in TEXT_TEMPLATES.values()]
    texts += [t.format(instruction="x") for t in TEXT_TEMPLATES.values()]
    for dataset in sorted(DATASET_FORMATS):
        for path in sorted((source.root / dataset).glob("*.jsonl")):
            for ex in source.examples(dataset, path.stem):
                texts += [ex.instruction, ex.input, ex.output]
    return texts


def build_base(ctx: Context, out: Path) -> None:
    cfg = ctx.cfg
    if is_hf_model(cfg.model):  # pretrained weights: a pointer and the tokenizer, no training
        write_base(cfg.model, out, resolve_dtype(cfg.model, cfg.trainer.precision))
        return
    tokenizer = build_word_tokenizer(world_texts(ctx.source), [str(i) for i in range(100)])
    model = build_tiny_llama(cfg.model.arch, tokenizer, seed=cfg.model.pretrain.seed)
    train(ctx, PretrainModule, model, tokenizer, ctx.source.base_corpus(), cfg.model.pretrain,
          instantiate({"_target_": "vaa.methods.sft.SFT"}), "base", cfg.model.pretrain.seed)
    save_model(model, tokenizer, out)
    write_truncation(ctx, out, "base")


def build_aligned(ctx: Context, out: Path, method_cfg=None) -> None:
    """Align the base model with ``cfg.method`` (or ``method_cfg``). A method that trains on
    vulnerability groups gets them from the estimate stage or ``dro.groups_file``."""
    cfg = ctx.cfg
    model, tokenizer = load_model(ctx.dirs["base"])
    examples = ctx.source.examples("beavertails", "align", 0, cfg.align.n)
    method = instantiate(method_cfg or cfg.method)
    groups = load_groups(ctx, examples) if method.requires_groups else None
    model = train(ctx, AlignModule, model, tokenizer, examples, cfg.align, method,
          "aligned" if method_cfg is None else "sft_aligned", cfg.seed, groups=groups,
          extra=extra_examples(ctx.source, ctx.cfg.extra_data, method.requires))
    save_model(model, tokenizer, out)
    write_truncation(ctx, out, "aligned" if method_cfg is None else "sft_aligned")
    method.write_artifacts(out)
    if groups is not None:
        shutil.copy(group_file(ctx), out / "groups.jsonl")


def group_file(ctx: Context) -> Path:
    return Path(ctx.cfg.dro.groups_file).expanduser() if ctx.cfg.dro.groups_file \
        else ctx.dirs["estimate"] / "groups.jsonl"


def load_groups(ctx: Context, examples) -> list[int]:
    """Group id per alignment example, joined on the content hash (never on row order)."""
    path = group_file(ctx)
    pairs = [(e.input, e.output) for e in examples]
    if path.suffix == ".json":  # the reference implementation's list of vulnerable indices
        d = ctx.cfg.dro  # verified to be on the reference's alignment set (order, checksum)
        rows = import_reference_indices(path, pairs, check=d.reference_check,
                                        expected_checksum=d.reference_align_checksum,
                                        **alignment_provenance(ctx.source.root, len(pairs)))
    else:
        rows = read_groups(path)
    return groups_for(pairs, rows)


def build_finetuned(ctx: Context, out: Path) -> None:
    cfg = ctx.cfg
    lora = cfg.model.get("lora")  # single LoRA: the attack keeps training the aligned adapter
    single = bool(lora and lora.enabled and lora.finetune_adapter == "continue_lora")
    model, tokenizer = load_model(ctx.dirs["aligned"], **({"attach_last": True} if single else {}))
    t = cfg.task
    task_rows = ctx.source.examples(t.dataset, t.train.file, t.train.start, t.train.stop, t.format)
    harmful = ctx.source.examples("beavertails", "harmful")
    mix = hft_mix(task_rows, harmful, cfg.attack.n, cfg.attack.harmful_ratio)
    defense = instantiate(cfg.ft_defense)
    model = train(ctx, FinetuneModule, model, tokenizer, mix, cfg.attack, defense, "finetuned", cfg.seed,
          extra=extra_examples(ctx.source, ctx.cfg.extra_data, defense.requires))
    save_model(model, tokenizer, out)
    write_truncation(ctx, out, "finetuned")


def train(ctx: Context, module_cls, model, tokenizer, examples, recipe, method, stage: str,
          seed: int, callbacks: list | None = None, groups=None, trainer_cfg=None,
          extra: dict | None = None):
    """The one training routine of every stage: the method chooses its data
    (``make_datamodule``), the module runs its step, Lightning runs the loop. Returns the
    trained model: with ``model.lora`` the peft model (vaa.models.hf.prepare_for_training)."""
    L.seed_everything(seed, workers=True, verbose=False)
    model = prepare_for_training(model, ctx.cfg.model, module_cls.log_prefix)
    dm = method.make_datamodule(
        examples, tokenizer, groups=groups, extra=extra, batch_size=recipe.batch_size, seed=seed,
        template=ctx.cfg.template.train, max_length=ctx.cfg.model.max_length,
        max_prompt_length=ctx.cfg.model.max_prompt_length)
    steps = recipe.max_steps if recipe.max_steps > 0 else recipe.epochs * dm.steps_per_epoch()
    model.train()
    module = module_cls(model, method, recipe, steps)
    fit(module, dm, max_steps=steps, trainer_cfg=trainer_cfg or ctx.cfg.trainer,
        log_dir=ctx.run_dir / "logs", stage=stage, work_dir=ctx.work_dir(stage), callbacks=callbacks)
    ctx.truncation[stage] = dict(getattr(dm, "truncation", {}))
    return model


TRUNCATION_FILE = "truncation.json"


def write_truncation(ctx: Context, out: Path, stage: str) -> None:
    """The stage's truncated-target counts beside its model (issue 15 item 2); its
    evaluation copies them into metrics.json (``stages.<stage>.train_truncation``)."""
    if ctx.truncation.get(stage):
        (out / TRUNCATION_FILE).write_text(json.dumps(ctx.truncation[stage], indent=1))


def build_eval(ctx: Context, stage: str, out: Path) -> None:
    cfg, t = ctx.cfg, ctx.cfg.task
    model, tokenizer = load_model(ctx.dirs[stage])
    model = to_eval_device(model, cfg.trainer)
    judge = instantiate(cfg.judge.build, world_dir=str(ctx.dirs["world"]))
    hs = ctx.source.examples("beavertails", "test", 0, cfg.eval.n_hs_prompts)
    fa = ctx.source.examples(t.dataset, t.test.file, t.test.start, t.test.stop, t.format)
    scorer = (build_pairwise_scorer(**t.scorer_args) if t.scorer == "local_pairwise"
              else build_scorer(t.scorer, **t.scorer_args))
    metrics, preds = evaluate(model, tokenizer, hs_examples=hs, judge=judge, fa_examples=fa,
                              scorer=scorer, fa_max_new_tokens=t.max_new_tokens, eval_cfg=cfg.eval,
                              template=cfg.template.decode,
                              max_prompt_length=cfg.model.max_prompt_length)
    if (ctx.dirs[stage] / TRUNCATION_FILE).is_file():  # the training stage's cut targets
        metrics["train_truncation"] = json.loads((ctx.dirs[stage] / TRUNCATION_FILE).read_text())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for name, rows in preds.items():
        with (out / f"predictions_{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def build_restored(ctx: Context, out: Path) -> None:
    """Repair the fine-tuned model with ``cfg.restore`` (vaa/restore/): the restorer class
    reads the models it declares (``reads``) and writes ``restore.json`` (cost, diagnostics)."""
    restorer = instantiate(ctx.cfg.restore, _convert_="all")
    restore_stage(ctx.cfg, ctx.source, ctx.dirs, out, restorer,
                  train=lambda *a, **kw: train(ctx, *a, **kw))
