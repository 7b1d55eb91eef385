"""Rewrites of trained models (TF2 and TF1 SavedModels, MetaGraphDefs, GraphDefs): inspect, verify, fold,
inject, replace-embedding, densify, swap-adapter (`tf-lora --help` for the command line).

Each command is a function here, defined in a module named for what it does (`folding`, `injection`,
`inspection`, `verification`, `embedding_replacement`, `densification`, `adapter_swap`); the modules under
them read models (`model_files`, `variables`, `graph_defs`, `constant_eval`, `lora_patterns`,
`einsum_kernels`), edit them (`graph_edit`, `tf1_session`) and write them (`saved_model_writer`,
`output_dir`).
"""

from tf_lora.rewrite.adapter_swap import SwapReport, swap_adapter
from tf_lora.rewrite.densification import Densified, DensifyReport, densify
from tf_lora.rewrite.embedding_replacement import Replaced, replace_embedding
from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.folding import Fold, FoldReport, fold
from tf_lora.rewrite.injection import Injected, inject
from tf_lora.rewrite.inspection import inspect
from tf_lora.rewrite.verification import verify

__all__ = [
    "Densified",
    "DensifyReport",
    "Fold",
    "FoldReport",
    "Injected",
    "Replaced",
    "RewriteError",
    "SwapReport",
    "densify",
    "fold",
    "inject",
    "inspect",
    "replace_embedding",
    "swap_adapter",
    "verify",
]
