"""Range rules of every config group, each a function ``(Checker) -> None`` (vaa/config/checker.py).

What each value means is documented where the value is defined (vaa/config/schema.py, the
method modules' schemas, vaa/restore/schema.py); the rules here say which values a stage can
use. Data sizes and files: vaa/config/data_rules.py.

Epochs: a training stage runs ``max_steps`` steps when ``max_steps > 0``, else ``epochs`` full
passes; so ``epochs`` must be >= 1 unless ``max_steps`` is set (there is no "0 epochs = skip").
"""

from __future__ import annotations

from omegaconf import OmegaConf

from vaa.config.checker import Checker

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # vaa/training/optim.py
PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "16-true", "16", "bf16-mixed", "bf16-true",
              "bf16", "transformer-engine", "transformer-engine-float16")
DTYPES = ("float32", "bfloat16", "float16")


def recipe(c: Checker, *, what: str) -> None:
    """A TrainRecipe (align, attack, model.pretrain): AdamW settings and the stage's length."""
    c.positive("lr")
    c.count("batch_size", meaning=f"sequences per {what} step")
    if not (isinstance(c.get("max_steps"), int) and c.get("max_steps") > 0):
        c.count("epochs", meaning="passes over the data; or set max_steps > 0")
    c.nonneg("weight_decay", "grad_clip")
    if c.has("schedule"):
        c.one_of("schedule", SCHEDULES)
    if c.has("optimizer"):
        c.one_of("optimizer", OPTIMIZERS)
    if c.has("warmup_ratio"):
        c.unit("warmup_ratio", meaning="share of the steps spent warming up")
    betas = c.get("betas")
    if betas is not None and (len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                                         for b in betas)):
        c.fail("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]", list(betas))


def align(c: Checker) -> None:
    recipe(c, what="alignment")
    c.count("n", optional=True, meaning="alignment rows used; null: all")


def attack(c: Checker) -> None:
    recipe(c, what="fine-tuning")
    c.count("n", meaning="rows of the harmful fine-tuning set")
    c.unit("harmful_ratio", meaning="the share of harmful rows in the attack, e.g. 0.1")


def evaluation(c: Checker) -> None:
    c.count("hs_max_new_tokens", meaning="tokens generated per harmful prompt")
    c.count("batch_size", meaning="prompts decoded together")
    c.count("n_hs_prompts", optional=True, meaning="null: every held-out harmful prompt")


def model(c: Checker) -> None:
    c.count("max_length", "max_prompt_length", meaning="tokens")
    c.one_of("dtype", DTYPES, optional=True)
    if c.has("pad_token"):
        c.one_of("pad_token", ("add", "eos"))
    lora = c.at("lora")
    if lora.node is not None and lora.get("enabled"):
        lora.count("r")
        lora.positive("alpha")
        lora.between("dropout", 0.0, 1.0, hi_open=True)
        lora.one_of("finetune_adapter", ("new_lora", "continue_lora", "full"))
    arch = c.at("arch")
    builds = not (c.get("path") or c.get("hub_name") or c.get("gguf_file"))
    if builds and arch.node is not None:  # the tiny model is built (and pretrained) from `arch`
        arch.count("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "max_position_embeddings")
        h, heads, kv = (arch.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
        if all(isinstance(v, int) and v > 0 for v in (h, heads, kv)):
            arch.require(h % heads == 0, "hidden_size", f"must be a multiple of num_attention_heads={heads}")
            arch.require(heads % kv == 0, "num_key_value_heads",
                         f"must divide num_attention_heads={heads}")
        arch.positive("rms_norm_eps", "initializer_range")
        if c.get("pretrain") is not None:
            recipe(c.at("pretrain"), what="pretraining")


def trainer(c: Checker) -> None:
    if c.has("precision"):
        c.one_of("precision", PRECISIONS)
    d = c.get("devices")
    ok = (d in ("auto", -1) or (isinstance(d, int) and not isinstance(d, bool) and d >= 1)
          or (isinstance(d, str) and d.replace(",", "").strip().isdigit()) or OmegaConf.is_list(d))
    c.require(ok, "devices", "must be an integer >= 1, a list of device ids or auto")
    if c.has("log_every_n_steps"):
        c.count("log_every_n_steps")
    if c.has("checkpoint_every_n_steps"):
        c.count("checkpoint_every_n_steps", minimum=0, meaning="0: no checkpoints inside a stage")


def dro(c: Checker) -> None:
    """VAA stage 2 (sampler, SAM, curriculum); stage 1 is checked when it runs (validate.py)."""
    s = c.at("sampler")
    s.nonneg("eta")
    s.one_of("feedback", ("bandit", "full"))
    init = s.get("init")
    if isinstance(init, str):
        s.one_of("init", ("uniform", "empirical"))
    clip = s.get("clip")
    if clip is not None:
        lo_hi = list(clip)
        if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi) \
                or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            s.fail("clip", "must be null or [lo, hi] with 0 <= lo <= hi <= 1", lo_hi)
    sam = c.at("sam")
    sam.nonneg("rho")
    sam.one_of("restore", ("copy", "subtract"))
    c.unit("lambda_max", meaning="the curriculum's final perturbation weight")
    c.one_of("lambda_schedule", ("linear", "constant"))
    c.one_of("lambda_mixing", ("bernoulli", "weighted"))


def estimate(c: Checker) -> None:
    """VAA stage 1 (dro.estimate): proxy fine-tuning runs and their probes."""
    c.count("n", meaning="rows of each proxy run")
    c.positive("lr")
    c.count("epochs", "batch_size", "checkpoints")
    c.nonneg("weight_decay")
    c.one_of("definition", ("first_vs_t0", "transitions"))
    c.one_of("aggregate", ("union", "intersection"))
    proxies = c.get("proxies") or []
    if not proxies:
        c.fail("proxies", "needs at least one proxy run", [])
    for i in range(len(proxies)):
        c.at(f"proxies.{i}").unit("harmful_ratio")


# --- restore (vaa/restore/schema.py): rules by schema field, applied when the field exists -----
def restore(c: Checker) -> None:
    for k in ("n_task", "batch_size", "outer_steps", "n_hvp", "iters", "num_proj_layers", "bits",
              "epochs", "probe_steps"):
        if c.has(k):
            c.count(k, minimum=0 if k == "num_proj_layers" else 1)
    if c.has("n_harmful"):
        c.count("n_harmful", optional=True)
    for k in ("lam", "rho", "mu", "probe_l1"):
        if c.has(k):
            c.nonneg(k)
    for k in ("lr", "clamp"):
        if c.has(k):
            c.positive(k)
    if c.has("alpha") and c.get("name") == "merge":
        c.unit("alpha", meaning="0 = the aligned model, 1 = the fine-tuned one")
    for k in ("drop", "dense_ratio"):
        if c.has(k):
            c.between(k, 0.0, 1.0, hi_open=True)
    if c.has("density"):
        c.between("density", 0.0, 1.0, lo_open=True)
    if c.has("step"):
        st = c.at("step")
        st.positive("trust_radius", "harmful_clamp")
        st.nonneg("task_guard")
        st.count("n_val")
        st.count("influence_n", optional=True)
        st.count("max_backtracks", minimum=0)
    if c.has("curvature"):
        cv = c.at("curvature")
        cv.nonneg("damping")
        cv.positive("tol")
        cv.one_of("backend", ("identity", "diag_fisher", "kfac", "cg", "lbfgs_ihvp"))
        cv.one_of("hvp", ("exact", "ggn"))


GROUP_RULES = {"align": align, "attack": attack, "eval": evaluation, "model": model,
               "trainer": trainer, "dro": dro}
