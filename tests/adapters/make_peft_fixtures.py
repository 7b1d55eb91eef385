"""Writes the PEFT fixtures in tests/adapters/fixtures/ with the real PEFT library (not needed by CI).

Each fixture directory holds what `PeftModel.save_pretrained` wrote (adapter_config.json,
adapter_model.safetensors) plus, written here with safetensors: the base model's weights (base.safetensors),
PEFT's own merged weights (merged.safetensors, from `merge_and_unload`), and an input with PEFT's output for
it (io.safetensors). Tests compare tf_lora against these numbers, produced by PEFT itself.

    python -m venv /tmp/peftvenv && /tmp/peftvenv/bin/pip install torch==2.13.0 peft safetensors numpy
    /tmp/peftvenv/bin/python tests/adapters/make_peft_fixtures.py [--only NAME ...]

`--check DIR` loads a directory that tf_lora.adapters.save_peft wrote (from the peft_f32 fixture) with PEFT
and checks that PEFT's output equals the fixture's (run 2026-11-21: max difference 0.0).
"""

import copy
import os

import peft
import torch
from safetensors.torch import save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 6)
        self.v = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.relu(self.q(x) + self.v(x)))


class Nested(torch.nn.Module):
    """Tiny one level down: module names with a path (block.q), as a transformer's layers have."""

    def __init__(self):
        super().__init__()
        self.block = Tiny()

    def forward(self, x):
        return self.block(x)


class TinyEmbedding(torch.nn.Module):
    """Token ids -> an embedding table -> q -> out: LoRA on an embedding, as PEFT defines it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.q = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 4)

    def forward(self, ids):
        return self.out(torch.relu(self.q(self.emb(ids))))


def make_embedding(name, use_dora=False):
    torch.manual_seed(0)
    base = TinyEmbedding()
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["emb", "q"], init_lora_weights=False, use_dora=use_dora
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # PEFT starts an embedding's A at zero even so; make the adapter matter
        for parameter_name, p in model.named_parameters():
            if "lora_embedding" in parameter_name:
                p.copy_(torch.randn_like(p))
            if "lora_magnitude_vector" in parameter_name:  # a trained magnitude, not ||w'||
                p.mul_(1.0 + 0.5 * torch.rand_like(p))
    path = os.path.join(HERE, name)
    model.save_pretrained(path)
    save_file(
        {k: v.contiguous() for k, v in base.state_dict().items()}, os.path.join(path, "base.safetensors")
    )
    ids = torch.randint(0, 20, (5, 3))
    with torch.no_grad():
        y = model(ids)
        merged = model.merge_and_unload()
    save_file(
        {k: v.contiguous() for k, v in merged.state_dict().items()}, os.path.join(path, "merged.safetensors")
    )
    save_file({"x": ids.to(torch.int32), "y": y}, os.path.join(path, "io.safetensors"))
    os.remove(os.path.join(path, "README.md"))
    print("wrote", path)


def make(
    name, dtype, target_modules=("q", "v", "out"), rank_pattern=None, alpha_pattern=None, model=Tiny, **lora
):
    torch.manual_seed(0)
    base = model()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=list(target_modules),
        rank_pattern=rank_pattern or {"v": 3},
        alpha_pattern=alpha_pattern or {"out": 8},
        init_lora_weights=False,  # random A and B: a non-zero adapter
        **lora,
    )
    model = peft.get_peft_model(copy.deepcopy(base), config).to(dtype)
    with torch.no_grad():  # what training would have moved beside the adapters: biases, saved modules
        for parameter_name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in parameter_name:
                p.add_(0.3 * torch.randn_like(p))
    path = os.path.join(HERE, name)
    model.save_pretrained(path)
    save_file(
        {k: v.contiguous() for k, v in base.to(dtype).state_dict().items()},
        os.path.join(path, "base.safetensors"),
    )
    x = torch.randn(5, 8).to(dtype)
    with torch.no_grad():
        y = model(x)
        merged = model.merge_and_unload()
    save_file(
        {k: v.contiguous() for k, v in merged.state_dict().items()}, os.path.join(path, "merged.safetensors")
    )
    save_file({"x": x, "y": y}, os.path.join(path, "io.safetensors"))
    # The files round-trip through PEFT itself (what save_peft must also produce).
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), path)
    with torch.no_grad():
        atol = 1e-6 if dtype == torch.float32 else 2e-2
        assert torch.allclose(reloaded(x).float(), y.float(), atol=atol)
    os.remove(os.path.join(path, "README.md"))  # PEFT's model card template
    print("wrote", path)


def check_saved(path):
    from safetensors.torch import load_file

    base = Tiny()
    base.load_state_dict(load_file(os.path.join(HERE, "peft_f32", "base.safetensors")))
    io = load_file(os.path.join(HERE, "peft_f32", "io.safetensors"))
    with torch.no_grad():
        y = peft.PeftModel.from_pretrained(base, path)(io["x"])
    print("PEFT loads", path, "- max |y - fixture y| =", float((y - io["y"]).abs().max()))
    assert torch.allclose(y, io["y"], atol=1e-6)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--check"]:
        check_saved(sys.argv[2])
        sys.exit(0)
    only = sys.argv[2:] if sys.argv[1:2] == ["--only"] else None
    fixtures = {
        "peft_f32": lambda name: make(name, torch.float32),
        "peft_rslora_f16": lambda name: make(name, torch.float16, use_rslora=True),
        "peft_bf16": lambda name: make(name, torch.bfloat16),
        # DoRA (lora_magnitude_vector), rsLoRA-free, on every layer.
        "peft_dora": lambda name: make(name, torch.float32, use_dora=True),
        # A classifier-style fine-tune: LoRA on q and out with their biases trained (bias="lora_only"), and
        # v trained in full (modules_to_save; PEFT matches its names by suffix, and "out" would also match
        # the LoRA layers' own "lora_dropout").
        "peft_lora_only_bias": lambda name: make(
            name, torch.float32, target_modules=("q", "out"), bias="lora_only", modules_to_save=["v"]
        ),
        # bias="all": every bias of the model trained, LoRA on q and out.
        "peft_all_bias": lambda name: make(name, torch.float32, target_modules=("q", "out"), bias="all"),
        # LoRA on an embedding table (lora_embedding_A / lora_embedding_B) beside a Linear.
        "peft_embedding": make_embedding,
        # DoRA on the embedding table and the Linear beside it.
        "peft_dora_embedding": lambda name: make_embedding(name, use_dora=True),
        # Pattern keys that are regexes with alternatives: PEFT matches `(.*\.)?(KEY)$`, so each alternative
        # gets the module-path prefix (q and v at rank 3; v and out at alpha 8).
        "peft_regex_patterns": lambda name: make(
            name, torch.float32, rank_pattern={"q|v": 3}, alpha_pattern={"v|out": 8}, model=Nested
        ),
    }
    for name, build in fixtures.items():
        if only is None or name in only:
            build(name)
