"""Perplexity of any causal LM on a text file, computed with the repository's ``token_perplexity`` metric."""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

METRIC_DIR = Path(__file__).parent / "metrics" / "token_perplexity"


def load_perplexity_metric() -> evaluate.EvaluationModule:
    return evaluate.load(str(METRIC_DIR))


def block_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-block summed NLL and predicted-token count: logits [B, S, V], labels [B, S] -> [B, 2] float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")  # [B, S-1]
    mask = shift_labels != -100
    return torch.stack([(nll * mask).sum(-1), mask.sum(-1).float()], dim=-1)


def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
    """``Trainer`` hook: reduce [B, S, V] logits to [B, 2] (NLL sum, tokens) before they are gathered."""
    if isinstance(logits, (tuple, list)):  # MoE outputs put aux_loss before logits
        logits = next(t for t in logits if isinstance(t, torch.Tensor) and t.dim() == 3)
    return block_nll(logits, labels)


def compute_metrics(eval_pred) -> dict[str, float]:
    """``Trainer`` hook: perplexity from the gathered [N, 2] (NLL sum, tokens) rows."""
    rows = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 2)
    result = load_perplexity_metric().compute(predictions=rows[:, 0].tolist(), references=rows[:, 1].astype(np.int64).tolist())
    return {"perplexity": result["perplexity"], "lm_loss": result["mean_nll"]}


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, blocks, batch_size: int = 8) -> dict[str, float]:
    """``{"eval_loss", "perplexity", "tokens"}`` of ``model`` over packed ``blocks`` (with ``input_ids``/``labels``)."""
    metric = load_perplexity_metric()
    model.eval()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(blocks), batch_size), desc="evaluating", leave=False):
        batch = blocks[start : start + batch_size]
        input_ids = torch.tensor(batch["input_ids"], device=device)
        labels = torch.tensor(batch["labels"], device=device)
        rows = block_nll(model(input_ids=input_ids).logits, labels).cpu()
        metric.add_batch(predictions=rows[:, 0].double().tolist(), references=rows[:, 1].long().tolist())
    result = metric.compute()
    return {"eval_loss": result["mean_nll"], "perplexity": result["perplexity"], "tokens": result["tokens"]}
