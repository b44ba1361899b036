"""Small stand-ins shared by the tests/test_methods_mutants*.py files: a module with what a
method sees of its LightningModule (SGD lr 1, no clip), fixed-batch streams, toy networks
(an MLP, a residual stack whose blocks match ``layers.<i>.self_attn``, a causal-LM stand-in)
and independent reference gradients."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf


def params_with_grads(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(3, 4, generator=g).to(dtype)),
          torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return ps


def module_with_strategy(name):
    return SimpleNamespace(_trainer=SimpleNamespace(strategy=type(name, (), {})()))


class FixedStream:
    """Fixed batch per group; counts the draws of each group."""

    def __init__(self, batches):
        self.batches, self.calls = batches, [0, 0]

    def next_batch(self, group):
        self.calls[group] += 1
        return dict(self.batches[group])


class ToyModule:
    """What VAA sees of AlignModule: SGD with lr 1, no clip, no trainer (fp32)."""

    def __init__(self, model, total_steps=10, clip=0.0):
        self.model, self.device = model, torch.device("cpu")
        self.global_step, self.total_steps = 0, total_steps
        self.recipe = SimpleNamespace(grad_clip=clip)
        self.opt = torch.optim.SGD(model.parameters(), lr=1.0)
        self.forwards = 0

    def lm_loss(self, batch):
        self.forwards += 1
        x, y = batch["x"], batch["y"]
        return torch.nn.functional.mse_loss(self.model(x), y)

    def manual_backward(self, loss):
        loss.backward()

    def all_reduce_mean(self, t):
        return t

    def optimizers(self):
        return self.opt

    def lr_schedulers(self):
        return None


def toy_vaa(sizes=(6, 4), total_steps=10, **dro):
    from vaa.config.schema import DROConfig
    from vaa.methods.vaa import VAA

    cfg = OmegaConf.merge(OmegaConf.structured(DROConfig),
                          {"sampler": {"eta": 0.5, "clip": None}, "sam": {"rho": 0.3}}, dro)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(5, 3, generator=g), "y": torch.randn(5, 1, generator=g)} for _ in range(2)]
    method = VAA(dro=cfg, seed=0)
    module = ToyModule(model, total_steps)
    stream = FixedStream(batches)
    method.setup(module, SimpleNamespace(stream=stream, group_sizes=lambda: list(sizes)))
    return method, module, stream, batches


def grad_at(model, batch, shift=None):
    m = copy.deepcopy(model)
    if shift is not None:
        with torch.no_grad():
            for p, s in zip(m.parameters(), shift):
                p.add_(s)
    loss = torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])
    return float(loss.detach()), torch.autograd.grad(loss, list(m.parameters()))


def sam_eps(g, rho):
    n = math.sqrt(sum(float(t.square().sum()) for t in g))
    return [rho * t / (n + 1e-7) for t in g]


def expected_sampler(method, group, loss):
    from vaa.methods.dro.sampler import EXP3Sampler

    s = EXP3Sampler(num_groups=2, eta=0.5, clip=None, seed=0)
    s.draw()
    s.update(group, loss)
    return s.probs


def net_at(model, theta):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, t in zip(m.parameters(), theta):
            p.copy_(t)
    return m


def toy_booster(**kw):
    from vaa.methods.booster import Booster

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    g = torch.Generator().manual_seed(2)
    batches = [{"x": torch.randn(5, 3, generator=g), "y": torch.randn(5, 1, generator=g)} for _ in range(2)]
    method = Booster(**kw)
    module = ToyModule(model)
    method.setup(module, SimpleNamespace(streams={"harmful": FixedStream([batches[0]])}))
    return method, module, batches


class ToyAttn(torch.nn.Module):
    def __init__(self, out="tuple"):
        super().__init__()
        self.lin, self.out = torch.nn.Linear(4, 4), out

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return (h, None) if self.out == "tuple" else [h, None] if self.out == "list" else h


class ToyLayer(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.self_attn = ToyAttn(out)


class ToyStack(torch.nn.Module):
    """Residual stack whose blocks are found by the default ``layers.<i>.self_attn`` pattern."""

    def __init__(self, outs=("tuple", "list", "plain")):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(ToyLayer(o) for o in outs)
        self.head = torch.nn.Linear(4, 1)
        self.config = SimpleNamespace(num_hidden_layers=len(outs))

    def forward(self, x, eps=None):
        for i, layer in enumerate(self.layers):
            out = layer.self_attn(x)
            h = out if torch.is_tensor(out) else out[0]
            x = x + (h if eps is None or eps[i] is None else h + eps[i])
        return self.head(x)


def toy_batch():
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, 3, 4, generator=g), "y": torch.randn(2, 3, 1, generator=g)}


class ToyLM(torch.nn.Module):
    """A causal-LM stand-in: logits from embeddings, the attention mask zeroing padded rows."""

    def __init__(self, vocab=7):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.seen_masks = []

    def forward(self, input_ids, attention_mask=None):
        self.seen_masks.append(attention_mask)
        logits = self.emb(input_ids)
        if attention_mask is not None:
            logits = logits * attention_mask.unsqueeze(-1)
        return SimpleNamespace(logits=logits)


def toy_gdro(**sampler):
    from vaa.config.schema import DROConfig
    from vaa.methods.gdro import GroupDRO

    dro = OmegaConf.merge(OmegaConf.structured(DROConfig), {"sampler": {"eta": 0.5, **sampler}})
    return GroupDRO(dro=dro)


class CountingSched:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def xy_batch(seed=4):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 3, generator=g), "y": torch.randn(5, 1, generator=g)}


class WordTok:
    """Whitespace 'tokenizer': one id per word; decode joins with spaces."""

    def __init__(self):
        self.vocab: list[str] = []
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append(add_special_tokens)
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab.append(w)
            ids.append(self.vocab.index(w))
        return {"input_ids": ids}

    def decode(self, ids, clean_up_tokenization_spaces=True):
        self.calls.append(("clean", clean_up_tokenization_spaces))
        return " ".join(self.vocab[i] for i in ids)


def tiny_grad_toy():
    """A stack whose loss is scaled so that ‖∂f/∂e‖ is ~1e-7: the +1e-7 of ε's denominator shows."""
    model, batch = ToyStack(), toy_batch()
    module = ToyModule(model)
    module.lm_loss = lambda b: 1e-7 * torch.nn.functional.mse_loss(model(b["x"]), b["y"])
    return model, module, batch


class SkipToy(ToyStack):
    """Block 1 runs but its output is not used: its ε is None (allow_unused)."""

    def forward(self, x, eps=None):
        x = x + self.layers[0].self_attn(x)[0]
        self.layers[1].self_attn(x)
        out = self.layers[2].self_attn(x)
        return self.head(x + out)


def bf16_module(model):
    module = ToyModule(model)
    module._trainer = SimpleNamespace(log_every_n_steps=1, precision="bf16-true", strategy=None)
    return module
