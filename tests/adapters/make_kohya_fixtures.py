"""Writes the kohya fixtures in tests/adapters/fixtures/kohya/ with LyCORIS (not needed by CI).

LyCORIS (`lycoris-lora` on PyPI) is the LoRA/LoCon network that kohya's sd-scripts trains with; its
`save_weights` writes the kohya format (`<prefix>_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`).
The network here wraps three Linear layers (q, v, out: out(relu(q(x) + v(x)))) and a 1x1 Conv2d (proj,
outside the forward), with rank 4 and alpha 2 (scale 0.5), prefix `lora_unet` as sd-scripts uses, and
random lora_up weights (LyCORIS starts them at zero). Beside its files (float32 and float16, as
`--save_precision fp16` writes), with safetensors: the base weights (base.safetensors), LyCORIS's own
merged weights (merged.safetensors, from `merge_to`), and an input with the network's output (io.safetensors).

    python -m venv /tmp/peftvenv
    /tmp/peftvenv/bin/pip install torch==2.13.0 lycoris-lora==4.1.3 safetensors
    /tmp/peftvenv/bin/python tests/adapters/make_kohya_fixtures.py
"""

import os

import torch
from lycoris import LycorisNetwork, create_lycoris
from safetensors.torch import save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "kohya")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 6)
        self.v = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 4)
        self.proj = torch.nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.out(torch.relu(self.q(x) + self.v(x)))


def main():
    os.makedirs(HERE, exist_ok=True)
    torch.manual_seed(0)
    model = Tiny()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(HERE, "base.safetensors")
    )
    LycorisNetwork.apply_preset({"target_name": ["q", "v", "out", "proj"], "lora_prefix": "lora_unet"})
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo="lora")
    network.apply_to()
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.normal_()
    network.save_weights(os.path.join(HERE, "lycoris_f32.safetensors"), torch.float32, None)
    network.save_weights(os.path.join(HERE, "lycoris_f16.safetensors"), torch.float16, None)
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = model(x)
        network.merge_to(1.0)
    network.restore()  # the original modules, now holding the merged weights
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(HERE, "merged.safetensors")
    )
    save_file({"x": x, "y": y}, os.path.join(HERE, "io.safetensors"))
    print(sorted(network.state_dict()))


if __name__ == "__main__":
    main()
