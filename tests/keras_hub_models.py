"""Small keras-hub backbones built from configs (random weights; nothing is downloaded), shared by the
tests of LoRA on keras-hub models: GPT-2 (query kernels [hidden, heads, head_dim]), Llama (grouped-query
attention) and Gemma (query kernels [heads, hidden, head_dim])."""

import keras

KINDS = ["gpt2", "llama", "gemma"]
VOCAB = 64


def tiny_backbone(kind, num_layers=2, seed=0):
    import keras_hub  # noqa: PLC0415 - tests that need it skip without it

    keras.utils.set_random_seed(seed)
    if kind == "gpt2":
        return keras_hub.models.GPT2Backbone(
            vocabulary_size=VOCAB,
            num_layers=num_layers,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            max_sequence_length=32,
        )
    if kind == "llama":
        return keras_hub.models.LlamaBackbone(
            vocabulary_size=VOCAB,
            num_layers=num_layers,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
        )
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
